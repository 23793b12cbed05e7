"""Reading a store in training: random access (:func:`open_store`), streaming (:func:`stream`), and the
drop-in per-image loader (:func:`load_cached_vggt_features`).

``open_store`` serves either layout. For a shard store it looks a key up in the memory-mapped index and
reads only that record's bytes with ``os.pread``; shard files are opened lazily (so a store object created
before a DataLoader forks its workers is safe to use inside them) and kept in a small LRU.

``stream`` is a torch ``IterableDataset`` built from webdataset pipeline stages. Splitting strategy: the
index's live records are laid out shard by shard, with the shard order shuffled per (seed, epoch); that
sequence is cut into ``world_size * num_workers`` contiguous, nearly equal slices (sizes differ by at most
one record) and each (rank, worker) reads its slice, which covers whole shards and at most two partial
ones, sequentially. So every record is read exactly once per epoch on exactly one rank and worker, with any
number of shards (fewer shards than consumers included), and no consumer gets nothing unless the store has
fewer records than consumers. Superseded records (a key rebuilt into a later shard) are never yielded,
because only index entries are read.
"""

from __future__ import annotations

import collections
import logging
import os
import random
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds

from featstore.env import data_root_override, dist_env, store_path, use_vggt_cache
from featstore.errors import RecordError, StoreError
from featstore.formats.index import INDEX_NAME, Index, IndexEntry
from featstore.formats.keys import RECORD_EXT, encode_key, key_for_path, key_under, root_prefixes
from featstore.formats.manifest import PER_IMAGE_SUFFIX, find_manifest, new_manifest, read_manifest
from featstore.formats.perimage import cache_path_for, read_pt
from featstore.formats.record import FEATURES, Record, decode_record
from featstore.formats.shards import SHARDS_DIR
from featstore.fsutil import is_temp_name

log = logging.getLogger("featstore")
DEFAULT_MAX_OPEN = 64
DEFAULT_SHUFFLE_BUFFER = 1000


# --- samples ---------------------------------------------------------------------------------------------
def record_to_sample(rec: Record) -> dict[str, Any]:
    """The training sample of a record: ``key``, ``path``, ``features`` and any other stored tensors."""
    sample: dict[str, Any] = {"key": rec.key, "path": rec.path}
    sample.update(rec.tensors)
    return sample


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a webdataset sample (``{"__key__", "fsr": bytes, ...}``) from featstore shards into a training sample.

    Usable in any plain pipeline: ``wds.WebDataset(urls).map(featstore.loader.decode_sample)``.
    """
    data = sample.get(RECORD_EXT)
    if data is None:
        raise RecordError(f"webdataset sample {sample.get('__key__')!r} has no {RECORD_EXT!r} field (found "
                          f"{sorted(k for k in sample if not k.startswith('__'))}); is this a featstore shard?")
    return record_to_sample(decode_record(data, verify=False))


# --- random access ---------------------------------------------------------------------------------------
class _Lookup:
    """What ``store[x]``, ``x in store`` and ``store.get(x)`` accept: a key, an absolute image path, or a path
    relative to the current directory, resolved under the data root (and under the manifest's original data
    root when the store was opened with another ``data_root``)."""

    data_root: str | None
    manifest: dict[str, Any]

    def _has_key(self, key: str) -> bool:
        raise NotImplementedError

    def _root_prefixes(self) -> list[tuple[str, ...]]:
        cached = self.__dict__.get("_prefixes")
        if cached is None:
            roots = dict.fromkeys(str(r) for r in (self.data_root, self.manifest.get("data_root")) if r)
            cached = self.__dict__["_prefixes"] = [root_prefixes(r) for r in roots]
        return cached

    def _keys_of_path(self, absolute: str) -> list[str]:
        """Keys of an absolute path under each data root (through links only when the plain path is under none)."""
        keys = [key_under(absolute, pre) for pre in self._root_prefixes() if absolute.startswith(pre)]
        if not keys:
            real = os.path.realpath(absolute)
            keys = [key_under(real, pre) for pre in self._root_prefixes() if real.startswith(pre)]
        return keys + [Path(absolute).as_posix()]

    def _candidates(self, image: str | os.PathLike[str]) -> list[str]:
        p = os.fspath(image)
        if not isinstance(p, str):
            raise TypeError(f"expected a key or a path, not {type(image).__name__}")
        keys = [] if os.path.isabs(p) else [Path(p).as_posix().removeprefix("./")]
        return keys + self._keys_of_path(os.path.abspath(p))

    def lookup(self, image: Any) -> str | None:
        """The stored key ``image`` (a key or an image path) stands for, or None when the store lacks it."""
        try:
            candidates = self._candidates(image)
        except TypeError:
            return None
        return next((k for k in candidates if self._has_key(k)), None)

    def key_for(self, image_path: str | os.PathLike[str]) -> str:
        """The key of an image (a key, an absolute path, or a path relative to the current directory): the stored
        key it stands for, else its posix path relative to the data root (absolute outside it)."""
        found = self.lookup(image_path)
        if found is not None:
            return found
        p = os.fspath(image_path)
        return key_for_path(os.path.abspath(p), self.data_root) if os.path.isabs(p) or os.path.exists(p) \
            else key_for_path(p, self.data_root)

    def __contains__(self, image: object) -> bool:
        return self.lookup(image) is not None

    def _key_or_error(self, image: Any) -> str:
        key = self.lookup(image)
        if key is None:
            raise KeyError(image)
        return key

    def get(self, image: str | os.PathLike[str], default: Any = None) -> torch.Tensor | Any:
        """The features of an image (key or path, see the class docs), or ``default`` when the store lacks it."""
        key = self.lookup(image)
        return self.features_of(key) if key is not None else default

    def __getitem__(self, image: str | os.PathLike[str]) -> torch.Tensor:
        return self.features_of(self._key_or_error(image))

    def features_of(self, key: str) -> torch.Tensor:
        """The ``features`` tensor stored under exactly ``key``."""
        raise NotImplementedError


class ShardStore(_Lookup):
    """Random access to a shard store: index lookup, then one ``pread`` of the record's bytes."""

    layout = "shards"

    def __init__(self, root: Path, manifest: dict[str, Any], max_open: int = DEFAULT_MAX_OPEN,
                 data_root: str | os.PathLike[str] | None = None):
        self.root = Path(root)
        self.manifest = manifest
        self.data_root = os.path.abspath(data_root) if data_root else (manifest.get("data_root") or None)
        self.max_open = max(1, int(max_open))
        self._lock = threading.Lock()
        self._pid = -1
        self._index: Index | None = None
        self._files: collections.OrderedDict[str, Any] = collections.OrderedDict()
        if not (self.root / INDEX_NAME).is_file():
            raise StoreError(f"shard store {self.root} has no {INDEX_NAME}; run `featstore merge {self.root}`")

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned DataLoader workers: carry the location only, reopen there.
        d = self.__dict__.copy()
        d.update(_lock=None, _index=None, _files=collections.OrderedDict(), _pid=-1)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _check_pid(self) -> None:
        # After a fork the parent's file handles are shared state: drop them and reopen lazily.
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._files = collections.OrderedDict()
            self._index = None
            self._pid = os.getpid()

    @property
    def index(self) -> Index:
        """The memory-mapped index (opened on first use in this process)."""
        self._check_pid()
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._index = Index(self.root / INDEX_NAME)
        return self._index

    def _file(self, shard: str) -> Any:
        with self._lock:
            f = self._files.get(shard)
            if f is not None:
                self._files.move_to_end(shard)
                return f
            f = open(self.root / SHARDS_DIR / shard, "rb", buffering=0)
            self._files[shard] = f
            while len(self._files) > self.max_open:
                # Dropped, not closed: a thread still reading keeps its reference; CPython closes it after.
                self._files.popitem(last=False)
            return f

    def read_bytes(self, e: IndexEntry) -> bytes:
        """The stored bytes of one record (exactly ``e.length`` of them, or RecordError)."""
        self._check_pid()
        f = self._file(e.shard)  # keep this reference until pread returns: an LRU eviction may drop the dict's
        data = os.pread(f.fileno(), e.length, e.offset)
        del f
        if len(data) != e.length:
            raise RecordError(f"shard {e.shard} is truncated: record {e.key!r} needs {e.length} bytes at offset "
                              f"{e.offset}, got {len(data)}; run `featstore verify {self.root}`")
        return data

    def entry(self, key: str) -> IndexEntry:
        """The index entry for ``key`` (KeyError if absent)."""
        e = self.index.get(key)
        if e is None:
            raise KeyError(key)
        return e

    def record(self, key: str) -> Record:
        """Every tensor and the metadata of ``key``'s record (a key or an image path, like ``store[x]``)."""
        return decode_record(self.read_bytes(self.entry(self._key_or_error(key))), verify=False)

    def features_of(self, key: str) -> torch.Tensor:
        """The ``features`` tensor stored under exactly ``key``."""
        return decode_record(self.read_bytes(self.entry(key)), only=(FEATURES,), verify=False).tensors[FEATURES]

    def _has_key(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[str]:
        """All keys, sorted."""
        return self.index.keys()

    def close(self) -> None:
        """Close open shard files (the store reopens them on next use)."""
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()


class PerImageStore(_Lookup):
    """Random access to per-image ``<image>.vggt_cache.pt`` caches (featstore-written or legacy)."""

    layout = "per-image"

    def __init__(self, root: Path, manifest: dict[str, Any], data_root: str | os.PathLike[str] | None = None):
        self.manifest = manifest
        # The manifest lies in the cache root (mirrored caches) or the data root (caches beside the images):
        # where it is now wins over the paths it recorded, so a copied store still works.
        mirrored = bool(manifest.get("cache_root"))
        self.cache_root = Path(root) if mirrored else None
        self.data_root = os.path.abspath(data_root) if data_root else (
            manifest.get("data_root") or str(root) if mirrored else str(root))
        self.root = self.cache_root or Path(self.data_root)
        self._keys: list[str] | None = None

    def path_for(self, key: str) -> Path:
        """The cache file that holds ``key``."""
        return cache_path_for(key, Path(self.data_root), self.cache_root)

    def record(self, key: str) -> Record:
        """Every tensor and the metadata of ``key``'s cache file (a key or an image path, like ``store[x]``)."""
        key = self._key_or_error(key)
        try:
            return read_pt(self.path_for(key), key=key)
        except FileNotFoundError:
            raise KeyError(key) from None

    def features_of(self, key: str) -> torch.Tensor:
        """The ``features`` tensor stored under exactly ``key``."""
        try:
            return read_pt(self.path_for(key), key=key).features
        except (FileNotFoundError, RecordError) as e:
            if isinstance(e, RecordError) and self._has_key(key):
                raise
            raise KeyError(key) from None

    def _has_key(self, key: str) -> bool:
        try:
            return self.path_for(key).is_file()
        except RecordError:
            return False

    def keys(self) -> list[str]:
        """All keys with a cache file under the cache root, sorted (scanned once)."""
        if self._keys is None:
            self._keys = sorted(scan_per_image(self.root))
        return list(self._keys)

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        """Nothing to close (files are opened per read)."""


Store = ShardStore | PerImageStore


def scan_per_image(root: Path) -> Iterator[str]:
    """Keys of every ``*.vggt_cache.pt`` file under ``root`` (temporary files skipped)."""
    root = Path(root)
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            if name.endswith(PER_IMAGE_SUFFIX) and not is_temp_name(name):
                rel = Path(os.path.relpath(os.path.join(dirpath, name), root)).as_posix()
                yield rel[: -len(PER_IMAGE_SUFFIX)]


def open_store(path: str | os.PathLike[str], *, max_open: int = DEFAULT_MAX_OPEN,
               data_root: str | os.PathLike[str] | None = None) -> Store:
    """Open a shard store or a per-image cache root (found from its manifest) for random access.

    ``data_root``: where the images are now, when the data moved (another machine, another mount): image paths
    under it are looked up as the keys they had under the manifest's data root. A data root with legacy caches
    and no manifest opens as a per-image store rooted there.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store {path} does not exist; pass a shard store folder or a data root with caches")
    if data_root is not None and not Path(data_root).is_dir():
        raise StoreError(f"data_root {data_root} is not a directory; pass the folder that holds the images now")
    try:
        mpath = find_manifest(path)
    except StoreError:
        if path.is_dir() and next(scan_per_image(path), None) is not None:
            m = new_manifest(layout="per-image", data_root=str(path.resolve()), model_path="")
            return PerImageStore(path, m, data_root=data_root)
        raise
    m = read_manifest(mpath)
    if m.get("layout") == "per-image":
        return PerImageStore(mpath.parent, m, data_root=data_root)
    return ShardStore(mpath.parent, m, max_open=max_open, data_root=data_root)


# --- drop-in loader --------------------------------------------------------------------------------------
_default_stores: dict[tuple[str, str | None], Store] = {}
_announced = False
_announce_lock = threading.Lock()


def _announce(where: str) -> None:
    global _announced
    with _announce_lock:
        if not _announced and use_vggt_cache():
            log.info("VGGT feature cache enabled (%s)", where)
            _announced = True


def load_cached_vggt_features(image_path: str | os.PathLike[str], store: Store | str | os.PathLike[str] | None = None
                              ) -> torch.Tensor | None:
    """The cached features of one image, or None: a drop-in for per-image ``torch.load`` cache loading.

    ``store`` is an open store or a store path; by default ``$FEATSTORE_STORE``, else the per-image cache
    file beside the image (``<image>.vggt_cache.pt``). A store given by path opens with ``$FEATSTORE_DATA_ROOT``
    as its data root when set (the images moved, see :func:`open_store`).
    """
    if store is None:
        store = store_path()
    if store is not None and not isinstance(store, (ShardStore, PerImageStore)):
        where = (os.fspath(store), data_root_override())
        if where not in _default_stores:
            _default_stores[where] = open_store(where[0], data_root=where[1])
        store = _default_stores[where]
    if store is not None:
        _announce(f"{store.layout} store {store.root}")
        return store.get(image_path)
    _announce(f"per-image caches {PER_IMAGE_SUFFIX} beside the images")
    p = Path(os.fspath(image_path) + PER_IMAGE_SUFFIX)
    try:
        return read_pt(p).features
    except FileNotFoundError:
        return None


# --- streaming -------------------------------------------------------------------------------------------
def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    d = dist_env()
    return d.rank, d.world_size


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def epoch_plan(shards: list[tuple[str, list[IndexEntry]]], consumers: int, seed: int, epoch: int,
               shuffle: bool) -> list[list[IndexEntry]]:
    """Cut one epoch's records into ``consumers`` contiguous slices of nearly equal size (see module docs)."""
    order = list(range(len(shards)))
    if shuffle:
        random.Random(f"featstore-shards-{seed}-{epoch}").shuffle(order)
    seq = [e for i in order for e in shards[i][1]]
    n = len(seq)
    return [seq[c * n // consumers:(c + 1) * n // consumers] for c in range(consumers)]


class FeatureStream(torch.utils.data.IterableDataset):
    """A DDP- and worker-aware stream over a shard store's live records (see :func:`stream`)."""

    def __init__(self, root: Path, *, shuffle: bool, seed: int, epoch: int, shuffle_buffer: int, resampled: bool):
        super().__init__()
        self.root = Path(root)
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.shuffle_buffer, self.resampled = shuffle_buffer, resampled
        ix = Index(self.root / INDEX_NAME)
        self.shards = [(s, es) for s, es in ix.shard_entries().items() if es]
        self.num_records = len(ix)
        if self.num_records == 0:
            raise StoreError(f"shard store {self.root} holds no records; nothing to stream")

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the order; call before creating the DataLoader iterator)."""
        self.epoch = epoch

    def _consumer(self) -> tuple[int, int]:
        rank, world = _rank_world()
        wid, nworkers = _worker()
        return rank * nworkers + wid, world * nworkers

    def __len__(self) -> int:
        """Records this rank yields per epoch (all its DataLoader workers together)."""
        rank, world = _rank_world()
        n = self.num_records
        return (rank + 1) * n // world - rank * n // world

    def _read(self, entries: list[IndexEntry]) -> Iterator[dict[str, Any]]:
        # Sequential reads of a slice; a webdataset-style sample per record.
        f, cur = None, None
        try:
            for e in entries:
                if e.shard != cur:
                    if f is not None:
                        f.close()
                    cur, f = e.shard, open(self.root / SHARDS_DIR / e.shard, "rb")
                f.seek(e.offset)
                data = f.read(e.length)
                if len(data) != e.length:
                    raise RecordError(f"shard {e.shard} is truncated at record {e.key!r}; run "
                                      f"`featstore verify {self.root}`")
                yield {"__key__": encode_key(e.key), "__url__": str(self.root / SHARDS_DIR / e.shard), RECORD_EXT: data}
        finally:
            if f is not None:
                f.close()

    def _epoch_pipeline(self, epoch: int, me: int, consumers: int) -> wds.DataPipeline:
        mine = epoch_plan(self.shards, consumers, self.seed, epoch, self.shuffle)[me]
        stages: list[Any] = [lambda: self._read(mine)]
        if self.shuffle and self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                      rng=random.Random(f"featstore-buffer-{self.seed}-{epoch}-{me}")))
        stages.append(wds.map(decode_sample))
        return wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me, consumers = self._consumer()
        epoch = self.epoch
        while True:
            yield from self._epoch_pipeline(epoch, me, consumers)
            if not self.resampled:
                return
            epoch += 1


def stream(path: str | os.PathLike[str], shuffle: bool = True, seed: int = 0, epoch: int = 0,
           shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, resampled: bool = False) -> FeatureStream:
    """A torch IterableDataset over a shard store: each record once per epoch across all ranks and workers.

    Order is deterministic for (seed, epoch, world size, workers); ``resampled=True`` repeats forever with
    the epoch advancing each pass. Samples are dicts with ``key``, ``path``, ``features`` and other tensors.
    """
    mpath = find_manifest(Path(path))
    m = read_manifest(mpath)
    if m.get("layout") != "shards":
        raise StoreError(f"{path} is a per-image store; stream() needs shards. Convert it with "
                         f"`featstore export {m.get('data_root') or path} --format shards --out DIR`, or use "
                         f"open_store() with a map-style Dataset")
    return FeatureStream(mpath.parent, shuffle=shuffle, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                         resampled=resampled)


__all__ = ["open_store", "stream", "load_cached_vggt_features", "decode_sample", "ShardStore", "PerImageStore",
           "FeatureStream", "key_for_path"]
