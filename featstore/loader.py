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

import itertools
import logging
import os
import random
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
import webdataset as wds

from featstore.env import dist_env, store_path, use_vggt_cache
from featstore.errors import RecordError, StoreError
from featstore.formats.index import INDEX_NAME, Index, IndexEntry, local_index_file
from featstore.formats.keys import RECORD_EXT, encode_key, key_for_path
from featstore.formats.manifest import (PER_IMAGE_SUFFIX, find_manifest, new_manifest, read_manifest,
                                        read_store_manifest)
from featstore.formats.perimage import cache_path_for, read_pt
from featstore.formats.record import FEATURES, Record, decode_record
from featstore.formats.shards import SHARDS_DIR, iter_shard_records
from featstore.formats.storage import (DEFAULT_CHUNK_BYTES, DEFAULT_READ_AHEAD, LocalStorage, Storage, is_remote, local_path_of,
                                       parse_location)
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
class ShardStore:
    """Random access to a shard store: index lookup, then one read of just the record's bytes.

    Local stores ``pread`` from cached file handles; remote stores (``s3://...``) send one ranged GET per
    record, after fetching the index once (see :func:`featstore.formats.index.local_index_file`).
    """

    layout = "shards"

    def __init__(self, root: Path | str, manifest: dict[str, Any], max_open: int = DEFAULT_MAX_OPEN,
                 storage: Storage | None = None):
        self.max_open = max(1, int(max_open))
        self.storage = storage if storage is not None else LocalStorage(Path(root), self.max_open)
        self.root: Path | str = Path(root) if self.storage.is_local else self.storage.display
        self.manifest = manifest
        self.data_root = manifest.get("data_root") or None
        self._lock = threading.Lock()
        self._pid = -1
        self._index: Index | None = None
        self._index_file: Path | None = None
        if self.storage.is_local and not self.storage.exists(INDEX_NAME):
            raise StoreError(f"shard store {self.root} has no {INDEX_NAME}; run `featstore merge {self.root}`")
        if not self.storage.is_local:
            self._index_file = local_index_file(self.storage)  # fetched once, now: a missing index fails here

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned DataLoader workers: carry the location only, reopen there.
        d = self.__dict__.copy()
        d.update(_lock=None, _index=None, _pid=-1)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _check_pid(self) -> None:
        # After a fork the parent's index map and lock are shared state: reopen lazily (the storage does
        # the same for its file handles or connection).
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._index = None
            self._pid = os.getpid()

    @property
    def index(self) -> Index:
        """The memory-mapped index (opened on first use in this process)."""
        self._check_pid()
        if self._index is None:
            with self._lock:
                if self._index is None:
                    if self._index_file is None or not self._index_file.is_file():
                        self._index_file = local_index_file(self.storage)
                    self._index = Index(self._index_file)
        return self._index

    def read_bytes(self, e: IndexEntry) -> bytes:
        """The stored bytes of one record (exactly ``e.length`` of them, or RecordError)."""
        data = self.storage.read_range(f"{SHARDS_DIR}/{e.shard}", e.offset, e.length)
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
        """Every tensor and the metadata of ``key``'s record."""
        return decode_record(self.read_bytes(self.entry(key)), verify=False)

    def __getitem__(self, key: str) -> torch.Tensor:
        e = self.entry(key)
        return decode_record(self.read_bytes(e), only=(FEATURES,), verify=False).tensors[FEATURES]

    def __contains__(self, key: object) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[str]:
        """All keys, sorted."""
        return self.index.keys()

    def key_for(self, image_path: str | os.PathLike[str]) -> str:
        """The key of an image path (absolute paths resolve against the manifest's data root)."""
        return key_for_path(image_path, self.data_root)

    def get(self, image_path: str | os.PathLike[str], default: Any = None) -> torch.Tensor | Any:
        """The features of an image by path or key, or ``default`` when the store does not hold it."""
        key = self.key_for(image_path)
        return self[key] if key in self else default

    def close(self) -> None:
        """Close open shard files (the store reopens them on next use)."""
        self.storage.close()


class PerImageStore:
    """Random access to per-image ``<image>.vggt_cache.pt`` caches (featstore-written or legacy)."""

    layout = "per-image"

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.manifest = manifest
        self.data_root = manifest.get("data_root") or str(root)
        self.cache_root = Path(manifest["cache_root"]) if manifest.get("cache_root") else None
        self.root = self.cache_root or Path(self.data_root)
        self._keys: list[str] | None = None

    def path_for(self, key: str) -> Path:
        """The cache file that holds ``key``."""
        return cache_path_for(key, Path(self.data_root), self.cache_root)

    def record(self, key: str) -> Record:
        """Every tensor and the metadata of ``key``'s cache file."""
        try:
            p = self.path_for(key)
        except RecordError:
            raise KeyError(key) from None
        try:
            return read_pt(p, key=key)
        except FileNotFoundError:
            raise KeyError(key) from None

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.record(key).features

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
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

    def key_for(self, image_path: str | os.PathLike[str]) -> str:
        """The key of an image path (absolute paths resolve against the manifest's data root)."""
        return key_for_path(image_path, self.data_root)

    def get(self, image_path: str | os.PathLike[str], default: Any = None) -> torch.Tensor | Any:
        """The features of an image by path or key, or ``default`` when there is no cache for it."""
        key = self.key_for(image_path)
        try:
            return self[key]
        except KeyError:
            return default

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


def open_remote_store(url: str, storage_options: dict[str, Any] | None = None, *,
                      max_open: int = DEFAULT_MAX_OPEN) -> ShardStore:
    """Open a shard store on object storage (any fsspec URL): its manifest and index are fetched once."""
    storage = parse_location(url, storage_options)
    m = read_store_manifest(storage)
    if m.get("layout") != "shards":
        raise StoreError(f"{storage.display} holds a per-image manifest; remote stores must be shard stores "
                         f"(build them with `featstore build --out {storage.display}`)")
    return ShardStore(storage.display, m, max_open=max_open, storage=storage)


def open_store(path: str | os.PathLike[str], *, max_open: int = DEFAULT_MAX_OPEN,
               storage_options: dict[str, Any] | None = None) -> Store:
    """Open a shard store or a per-image cache root (found from its manifest) for random access.

    A data root with legacy caches and no manifest opens as a per-image store rooted there. ``path`` may be
    an fsspec URL of a shard store (``s3://bucket/prefix``); ``storage_options`` go to its backend.
    """
    if is_remote(path):
        return open_remote_store(str(path), storage_options, max_open=max_open)
    path = local_path_of(path)
    if not path.exists():
        raise StoreError(f"store {path} does not exist; pass a shard store folder or a data root with caches")
    try:
        mpath = find_manifest(path)
    except StoreError:
        if path.is_dir() and next(scan_per_image(path), None) is not None:
            m = new_manifest(layout="per-image", data_root=str(path.resolve()), model_path="")
            return PerImageStore(path, m)
        raise
    m = read_manifest(mpath)
    if m.get("layout") == "per-image":
        if not m.get("data_root"):
            m["data_root"] = str(mpath.parent)
        return PerImageStore(mpath.parent, m)
    return ShardStore(mpath.parent, m, max_open=max_open)


# --- drop-in loader --------------------------------------------------------------------------------------
_default_stores: dict[str, Store] = {}
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
    file beside the image (``<image>.vggt_cache.pt``).
    """
    if store is None:
        store = store_path()
    if store is not None and not isinstance(store, (ShardStore, PerImageStore)):
        key = os.fspath(store)
        if key not in _default_stores:
            _default_stores[key] = open_store(key)
        store = _default_stores[key]
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

    def __init__(self, root: Path | Storage, *, shuffle: bool, seed: int, epoch: int, shuffle_buffer: int,
                 resampled: bool, read_ahead: int = DEFAULT_READ_AHEAD):
        super().__init__()
        self.storage = parse_location(root)
        self.root: Path | str = self.storage.local_path() or self.storage.display
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.shuffle_buffer, self.resampled, self.read_ahead = shuffle_buffer, resampled, read_ahead
        self.chunk_bytes = DEFAULT_CHUNK_BYTES  # remote stores: bytes per ranged GET while streaming
        ix = Index(local_index_file(self.storage))
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
        if not self.storage.is_local:
            yield from self._read_remote(entries)
            return
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

    def _read_remote(self, entries: list[IndexEntry]) -> Iterator[dict[str, Any]]:
        # Whole runs of a shard as a few large ranged GETs, the next chunks fetched while this one is decoded.
        runs = [(shard, list(group)) for shard, group in itertools.groupby(entries, key=lambda e: e.shard)]
        for e, data in iter_shard_records(self.storage, runs, chunk_bytes=self.chunk_bytes,
                                          read_ahead=self.read_ahead):
            yield {"__key__": encode_key(e.key), "__url__": self.storage.describe(f"{SHARDS_DIR}/{e.shard}"),
                   RECORD_EXT: data}

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
           shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, resampled: bool = False,
           storage_options: dict[str, Any] | None = None, read_ahead: int = DEFAULT_READ_AHEAD) -> FeatureStream:
    """A torch IterableDataset over a shard store: each record once per epoch across all ranks and workers.

    Order is deterministic for (seed, epoch, world size, workers); ``resampled=True`` repeats forever with
    the epoch advancing each pass. Samples are dicts with ``key``, ``path``, ``features`` and other tensors.
    ``path`` may be an fsspec URL (``s3://bucket/prefix``, options in ``storage_options``): whole shards are
    then streamed in large chunks, ``read_ahead`` of them fetched in the background.
    """
    if is_remote(path):
        storage = parse_location(str(path), storage_options)
        if read_store_manifest(storage).get("layout") != "shards":
            raise StoreError(f"{storage.display} is not a shard store; stream() needs shards")
        return FeatureStream(storage, shuffle=shuffle, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                             resampled=resampled, read_ahead=read_ahead)
    mpath = find_manifest(local_path_of(path))
    m = read_manifest(mpath)
    if m.get("layout") != "shards":
        raise StoreError(f"{path} is a per-image store; stream() needs shards. Convert it with "
                         f"`featstore export {m.get('data_root') or path} --format shards --out DIR`, or use "
                         f"open_store() with a map-style Dataset")
    return FeatureStream(mpath.parent, shuffle=shuffle, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                         resampled=resampled)


__all__ = ["open_store", "stream", "load_cached_vggt_features", "decode_sample", "ShardStore", "PerImageStore",
           "FeatureStream", "key_for_path"]
