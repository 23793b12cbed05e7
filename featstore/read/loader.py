"""Reading a store in training: random access (:func:`open_store`), streaming (:func:`stream`), and the
drop-in per-image loader (:func:`load_cached_vggt_features`).

``open_store`` serves either layout. For a shard store it looks a key up in the memory-mapped index and
reads only that record's bytes with ``os.pread``; shard files are opened lazily (so a store object created
before a DataLoader forks its workers is safe to use inside them) and kept in a small LRU.

``stream`` is a torch ``IterableDataset``. Splitting strategy: the index's live records are laid out shard
by shard (in offset order), with the shard order shuffled per (seed, epoch); that sequence is cut into
``world_size * num_workers`` contiguous, nearly equal slices (sizes differ by at most one record) and each
(rank, worker) reads its slice, which covers whole shards and at most two partial ones. The plan is held as
numpy arrays of index rows and (shard, first, stop) intervals, never as a Python object per record; a
shuffle buffer permutes row numbers (not decoded samples), so a resumed epoch skips what was delivered
without reading it. Every record is read exactly once per epoch on exactly one rank and worker, with any
number of shards, and no consumer gets nothing unless the store has fewer records than consumers.
Superseded records (a key rebuilt into a later shard) are never yielded, because only index rows are read.

A store may live on object storage (``s3://bucket/prefix`` or any fsspec URL, see docs/object-storage.md):
``open_store`` then fetches the index once and reads each record with one ranged GET, and ``stream``
reads each consumer's runs of shards sequentially in large chunks with read-ahead, holding records that
were read but not yet emitted by the shuffle buffer (so the order is the same as on local disk).

Reads add nothing to the one unavoidable copy: a ``raw`` record is read with ``preadv`` into a fresh aligned
buffer (shared memory in a DataLoader worker) and its tensors are views of it; a compressed record is decoded
straight from a read-only map of its shard file (:class:`featstore.storage.backends.MappedFile`), so its bytes are not copied at all; and
inside workers outputs live in shared memory, so torch does not copy them again to hand them to the main
process. ``stream``'s workers go further: they read and decode into recycled slots of shared-memory arenas
(:mod:`featstore.read.sharedpool`), and a sample crosses by reference, without a new segment or a passed
descriptor.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from featstore.formats.layout import ALIAS_INDEX, INDEX_NAME, PER_IMAGE_SUFFIX, RECORD_EXT, SHARDS_DIR
from featstore.runtime.env import Consumer, consumer, data_root_override, dist_env, store_path, use_vggt_cache
from featstore.errors import RecordError, StoreError
from featstore.formats.index import Index, IndexEntry, local_index_file
from featstore.formats.keys import CacheLayout, cache_file_beside, encode_key, key_for_path, key_under, root_prefixes
from featstore.formats.manifest import find_manifest, new_manifest, read_manifest, read_store_manifest
from featstore.formats.perimage import read_pt, scan_per_image
from featstore.formats.codecs import dequantize_int8, empty_tensor, unpack_scales
from featstore.formats.record import FEATURES, SCALES, Record, decode_record, output_nbytes, parse_dtype
from featstore.formats.shards import iter_shard_records
from featstore.formats.store import Store
from featstore.constants import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_OPEN, DEFAULT_READ_AHEAD
from featstore.storage.backends import (LocalStorage, Storage, is_remote,
                                       local_path_of, parse_location)
from featstore.read.sharedpool import SharedSample, Slot, SlotPool, aligned, worker_pool
from featstore.discover.samples import sample_key

log = logging.getLogger("featstore")
DEFAULT_SHUFFLE_BUFFER = 1000


# --- samples ---------------------------------------------------------------------------------------------
def record_to_sample(rec: Record) -> dict[str, Any]:
    """The training sample of a record: ``key``, ``path``, ``features`` and any other stored tensors; a sample
    store's records also give ``frames`` (frame keys in training order) and ``grid`` ((h, w) of the tokens).

    A record read with ``dequantize=False`` keeps each int8-coded tensor ``<name>`` as int8 and adds
    ``<name>_scales`` (float32 ``[C + P]``: C channel scales, then one scale per token) and ``quantized``
    (``{name: stored dtype name}``); :func:`dequantize` turns them back into the stored dtype.
    """
    sample: dict[str, Any] = {"key": rec.key, "path": rec.path}
    if rec.meta.get("context") == "sample":  # a training sample's record: its frames and token grid
        sample["frames"] = list(rec.meta.get("frames") or [])
        sample["grid"] = tuple(rec.meta.get("grid") or ())
    sample.update(rec.tensors)
    if rec.quantized:
        sample["quantized"] = dict(rec.quantized)
    return sample


def decode_to_sample(data: bytes | memoryview, dequantize: bool, pool: SlotPool | None, read_into: Slot | None = None
                     ) -> dict[str, Any]:
    """The training sample of a stored record; with a DataLoader worker's ``pool``, its decoded tensors share one
    recycled shared-memory slot, so the sample crosses to the main process without a copy or a new segment.

    ``read_into``: the pool slot ``data`` was read into (an uncompressed record, whose ``raw`` tensors are views
    of it; any other tensor of the record is allocated as usual).
    """
    if read_into is not None:
        sample = SharedSample(record_to_sample(decode_record(data, verify=False, dequantize=dequantize)))
        sample.slot = read_into
        return sample
    sizes = output_nbytes(data, dequantize=dequantize) if pool is not None else []
    if not sizes:
        return record_to_sample(decode_record(data, verify=False, dequantize=dequantize))
    slot = pool.slot(sum(aligned(n) for n in sizes))  # type: ignore[union-attr]
    sample = SharedSample(record_to_sample(decode_record(data, verify=False, dequantize=dequantize, empty=slot.empty)))
    sample.slot = slot
    return sample


def decode_sample(sample: dict[str, Any], dequantize: bool = True) -> dict[str, Any]:
    """Decode a webdataset sample (``{"__key__", "fsr": bytes, ...}``) from featstore shards into a training sample.

    Usable in any plain pipeline: ``wds.WebDataset(urls).map(featstore.read.loader.decode_sample)``.
    """
    data = sample.get(RECORD_EXT)
    if data is None:
        raise RecordError(f"webdataset sample {sample.get('__key__')!r} has no {RECORD_EXT!r} field (found "
                          f"{sorted(k for k in sample if not k.startswith('__'))}); is this a featstore shard?")
    return record_to_sample(decode_record(data, verify=False, dequantize=dequantize))


def dequantize(sample: Mapping[str, Any], name: str = FEATURES, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``name`` of a sample read with ``dequantize=False``, in ``dtype`` (default: its stored dtype).

    Works on a single sample or a collated batch (leading batch dimensions broadcast), on whatever device
    the sample's tensors are, so training can move the int8 values to the GPU and dequantize there.
    A tensor that was not quantized is returned as it is (cast to ``dtype`` when given).
    """
    values = sample[name]
    if values.dtype != torch.int8 or name + SCALES not in sample:
        return values if dtype is None else values.to(dtype)
    if dtype is None:
        stored = (sample.get("quantized") or {}).get(name, "float32")
        dtype = parse_dtype(stored if isinstance(stored, str) else stored[0])  # collated: a list of names
    channel_scale, token_scale = unpack_scales(values, sample[name + SCALES])
    return dequantize_int8(values, channel_scale, token_scale, dtype)


# --- random access ---------------------------------------------------------------------------------------
def read_record_into(fd: int, offset: int, length: int, shared: bool = True, buffer: memoryview | None = None
                     ) -> memoryview | None:
    """``length`` bytes at ``offset`` of ``fd`` read into ``buffer`` (exactly ``length`` bytes) or a fresh one
    (no intermediate copy); None if the file is short.

    ``shared``: in a DataLoader worker, put a fresh buffer in shared memory (worth it when tensors will be views
    of it, as for ``raw`` records).
    """
    view = buffer if buffer is not None else memoryview(empty_tensor((length,), torch.uint8, shared=shared).numpy())
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            return None
        got += n
    return view


def decoded_bytes(e: IndexEntry) -> int:
    """Bytes of the tensors a record decodes to; a record at least that long stores them uncompressed (raw)."""
    return sum(math.prod(shape) * parse_dtype(dtype).itemsize for _, dtype, shape in e.tensors)


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

    def _candidates(self, image: str | os.PathLike[str]) -> Iterator[str]:
        """Keys ``image`` may stand for, most likely first; path resolution only runs when the plain key misses."""
        p = os.fspath(image)
        if not isinstance(p, str):
            raise TypeError(f"expected a key or a path, not {type(image).__name__}")
        if not os.path.isabs(p):
            parts = p.split("/")
            plain = "" not in parts and "." not in parts
            yield p if plain else Path(p).as_posix().removeprefix("./")  # Path only where it changes the key
        yield from self._keys_of_path(os.path.abspath(p))

    def lookup(self, image: Any) -> str | None:
        """The stored key ``image`` (a key or an image path) stands for, or None when the store lacks it."""
        try:
            return next((k for k in self._candidates(image) if self._has_key(k)), None)
        except TypeError:
            return None

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


class SampleLookup:
    """Sample-store lookups (``featstore build --context sample``): a record per training sample, found by the
    sample's ordered frames (as the training dataset holds them) or by its annotation ``id``."""

    @property
    def context(self) -> dict[str, Any]:
        """The store's context settings: ``{"mode": "image"}`` or ``{"mode": "sample", "reference_frame", ...}``."""
        return dict(self.manifest.get("context") or {"mode": "image"})  # type: ignore[attr-defined]

    def _require_samples(self) -> None:
        if self.context.get("mode") != "sample":
            raise StoreError(f"{self.root} holds one record per image, not per training sample: look images up with "  # type: ignore[attr-defined]
                             "store.get(image_path), or build a sample store with --context sample")

    def sample_key(self, frames: Sequence[str | os.PathLike[str]]) -> str:
        """The frame-digest key of a sample (frames in training order, paths or keys, as for ``get``)."""
        keys = [self.key_for(f) for f in frames]  # type: ignore[attr-defined]
        return sample_key(keys, str(self.context.get("reference_frame", "first")))

    def _alias_entry(self, key: str) -> IndexEntry | None:
        return None  # only shard stores hold samples

    def get_sample(self, frames: Sequence[str | os.PathLike[str]] | None = None, *, id: Any = None,
                   default: Any = None) -> torch.Tensor | Any:
        """The features ``[1, h*w, C]`` of a training sample, or ``default`` when the store does not hold it.

        ``frames``: the sample's frame paths in training order (chronological, current frame last, before any
        ``reference_frame: last`` reversal: the store applies its own setting); or ``id``: its annotation id.
        """
        if (frames is None) == (id is None):
            raise TypeError("get_sample takes the sample's frames or its id=, not both or neither")
        self._require_samples()
        key = str(id) if id is not None else self.sample_key(frames)  # type: ignore[arg-type]
        if key in self:  # type: ignore[operator]
            return self[key]  # type: ignore[index]
        entry = self._alias_entry(key) if id is None else None
        return default if entry is None else self.features_at(entry)  # type: ignore[attr-defined]


class ShardStore(SampleLookup, _Lookup):
    """Random access to a shard store: index lookup, then one read of just the record's bytes.

    Local stores read from cached file handles and maps (see :class:`featstore.storage.backends.MappedFile`); remote stores (``s3://...``)
    send one ranged GET per record, after fetching the index once (see
    :func:`featstore.formats.index.local_index_file`).
    """

    layout = "shards"

    def __init__(self, root: Path | str, manifest: dict[str, Any], max_open: int = DEFAULT_MAX_OPEN,
                 storage: Storage | None = None, data_root: str | os.PathLike[str] | None = None):
        self.storage = storage if storage is not None else LocalStorage(Path(root), max_open)
        self.root: Path | str = Path(root) if self.storage.is_local else self.storage.display
        self.manifest = manifest
        self.data_root = os.path.abspath(data_root) if data_root else (manifest.get("data_root") or None)
        self.max_open = max(1, int(max_open))
        self._lock = threading.Lock()
        self._pid = -1
        self._index: Index | None = None
        self._aliases: Index | bool | None = None  # False: the store has no alias index
        self._index_file: Path | None = None
        if self.storage.is_local and not self.storage.exists(INDEX_NAME):
            raise StoreError(f"shard store {self.root} has no {INDEX_NAME}; run `featstore merge {self.root}`")
        if not self.storage.is_local:
            self._index_file = local_index_file(self.storage)  # fetched once, now: a missing index fails here

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into spawned DataLoader workers: carry the location only, reopen there.
        d = self.__dict__.copy()
        d.update(_lock=None, _index=None, _aliases=None, _pid=-1)
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _check_pid(self) -> None:
        # After a fork the parent's file handles are shared state: drop them and reopen lazily.
        if self._pid != os.getpid():
            self._lock = threading.Lock()
            self._index = None
            self._aliases = None
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

    def read_bytes(self, e: IndexEntry, for_decoding: bool = False, buffer: memoryview | None = None
                   ) -> memoryview:
        """The stored bytes of one record (exactly ``e.length`` of them, or RecordError).

        Read straight into ``buffer`` (``e.length`` bytes) or a fresh, aligned, writable one (for a ``raw``
        record, shared memory inside a DataLoader worker, so tensors decoded as views of it cross to the main
        process without another copy); from a remote store, one ranged GET. ``for_decoding``: the caller only
        decodes the bytes, so a compressed record is a read-only view of the mapped shard (no copy at all).
        """
        if not self.storage.is_local:
            data = self.storage.read_range(f"{SHARDS_DIR}/{e.shard}", e.offset, e.length)
            if len(data) != e.length:
                raise RecordError(f"shard {e.shard} is truncated: record {e.key!r} needs {e.length} bytes at offset "
                                  f"{e.offset}; run `featstore verify {self.root}`")
            return memoryview(data)
        self._check_pid()
        f = self.storage.mapped_file(f"{SHARDS_DIR}/{e.shard}")  # held until the read returns (LRU eviction)
        uncompressed = e.length >= decoded_bytes(e)
        if for_decoding and not uncompressed and buffer is None:
            buf = f.view(e.offset, e.length)
        else:
            buf = read_record_into(f.fileno(), e.offset, e.length, shared=uncompressed, buffer=buffer)
        del f
        if buf is None:
            raise RecordError(f"shard {e.shard} is truncated: record {e.key!r} needs {e.length} bytes at offset "
                              f"{e.offset}; run `featstore verify {self.root}`")
        return buf

    def entry(self, key: str) -> IndexEntry:
        """The index entry for ``key`` (KeyError if absent)."""
        e = self.index.get(key)
        if e is None:
            raise KeyError(key)
        return e

    def record(self, key: str, dequantize: bool = True) -> Record:
        """Every tensor and the metadata of ``key``'s record (a key or an image path, like ``store[x]``).

        Lossy (int8) tensors decode to the stored dtype; with ``dequantize=False`` they stay int8 beside their
        scales (see :func:`record_to_sample` and :func:`dequantize`).
        """
        return decode_record(self.read_bytes(self.entry(self._key_or_error(key)), for_decoding=True), verify=False,
                             dequantize=dequantize)

    def features_of(self, key: str) -> torch.Tensor:
        """The ``features`` tensor stored under exactly ``key``."""
        return self.features_at(self.entry(key))

    def _entry_of(self, image: Any) -> IndexEntry | None:
        """The index entry ``image`` (a key or an image path) stands for, found with one index search per candidate."""
        try:
            candidates = self._candidates(image)
            return next((e for e in map(self.index.get, candidates) if e is not None), None)
        except TypeError:
            return None

    def get(self, image: str | os.PathLike[str], default: Any = None) -> torch.Tensor | Any:
        """The features of an image (key or path), or ``default`` when the store lacks it."""
        e = self._entry_of(image)
        return self.features_at(e) if e is not None else default

    def __getitem__(self, image: str | os.PathLike[str]) -> torch.Tensor:
        e = self._entry_of(image)
        if e is None:
            raise KeyError(image)
        return self.features_at(e)

    def features_at(self, e: IndexEntry) -> torch.Tensor:
        """The ``features`` tensor of the record an index entry points at."""
        return decode_record(self.read_bytes(e, for_decoding=True), only=(FEATURES,), verify=False).tensors[FEATURES]

    def _alias_entry(self, key: str) -> IndexEntry | None:
        """The record a frame digest names in a store keyed by annotation ids (``aliases.fsi``)."""
        self._check_pid()
        if self._aliases is None:
            path = self.storage.local_path(ALIAS_INDEX)  # remote stores have no alias index (yet)
            self._aliases = Index(path) if path is not None and path.is_file() else False
        return self._aliases.get(key) if self._aliases else None

    def _has_key(self, key: str) -> bool:
        return key in self.index

    def __len__(self) -> int:
        return len(self.index)

    def keys(self) -> list[str]:
        """All keys, sorted."""
        return self.index.keys()

    def close(self) -> None:
        """Close open shard files (the store reopens them on next use)."""
        self.storage.close()


class PerImageStore(SampleLookup, _Lookup):
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
        self.cache_files = CacheLayout(self.data_root, self.cache_root)
        self._keys: list[str] | None = None

    def path_for(self, key: str) -> Path:
        """The cache file that holds ``key``."""
        return self.cache_files.path(key)

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


#: What :func:`open_store` returns; both classes implement :class:`featstore.formats.store.Store`.
AnyStore = ShardStore | PerImageStore


def open_remote_store(url: str, storage_options: dict[str, Any] | None = None, *, max_open: int = DEFAULT_MAX_OPEN,
                      data_root: str | os.PathLike[str] | None = None) -> ShardStore:
    """Open a shard store on object storage (any fsspec URL): its manifest and index are fetched once."""
    storage = parse_location(url, storage_options)
    m = read_store_manifest(storage)
    if m.get("layout") != "shards":
        raise StoreError(f"{storage.display} holds a per-image manifest; remote stores must be shard stores "
                         f"(build them with `featstore build --out {storage.display}`)")
    return ShardStore(storage.display, m, max_open=max_open, storage=storage, data_root=data_root)


def open_store(path: str | os.PathLike[str], *, max_open: int = DEFAULT_MAX_OPEN,
               data_root: str | os.PathLike[str] | None = None,
               storage_options: dict[str, Any] | None = None) -> AnyStore:
    """Open a shard store or a per-image cache root (found from its manifest) for random access.

    ``data_root``: where the images are now, when the data moved (another machine, another mount): image paths
    under it are looked up as the keys they had under the manifest's data root. A data root with legacy caches
    and no manifest opens as a per-image store rooted there. ``path`` may be an fsspec URL of a shard store
    (``s3://bucket/prefix``); ``storage_options`` go to its backend.
    """
    if is_remote(path):
        return open_remote_store(str(path), storage_options, max_open=max_open, data_root=data_root)
    path = local_path_of(path)
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
_default_stores: dict[Any, AnyStore] = {}
_announced = False
_announce_lock = threading.Lock()


def _announce(where: str) -> None:
    global _announced
    with _announce_lock:
        if not _announced and use_vggt_cache():
            log.info("VGGT feature cache enabled (%s)", where)
            _announced = True


def load_cached_vggt_features(image_path: str | os.PathLike[str], store: AnyStore | str | os.PathLike[str] | None = None
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
    try:
        return read_pt(cache_file_beside(image_path)).features
    except FileNotFoundError:
        return None


def load_sample_features(frames: Sequence[str | os.PathLike[str]],
                         store: AnyStore | str | os.PathLike[str] | None = None,
                         *, id: Any = None) -> torch.Tensor | None:
    """The cached features ``[1, h*w, C]`` of one training sample, or None: the drop-in for the VGGT loop of a
    training step. ``frames`` are the sample's frame paths in training order (current frame last); ``store``
    is an open sample store or its path (default ``$FEATSTORE_STORE``); ``id``: look up by annotation id."""
    if store is None:
        store = store_path()
        if store is None:
            raise StoreError("load_sample_features needs a sample store: pass store=PATH or set FEATSTORE_STORE "
                             "to a store built with featstore build --context sample")
    if not isinstance(store, (ShardStore, PerImageStore)):
        key = os.fspath(store)
        if key not in _default_stores:
            _default_stores[key] = open_store(key)
        store = _default_stores[key]
    _announce(f"{store.layout} sample store {store.root}")
    return store.get_sample(None if id is not None else frames, id=id)


# --- streaming -------------------------------------------------------------------------------------------
def shard_rows(ix: Index) -> tuple[np.ndarray, np.ndarray]:
    """Index rows ordered by (shard, offset), and bounds: shard ``s`` holds ``rows[bounds[s]:bounds[s + 1]]``."""
    if not ix.count:
        return np.empty(0, np.int64), np.zeros(len(ix.shards) + 1, np.int64)
    # One uint64 sort key (shard << 40 | offset; a shard past 1 TiB would only cost read order) sorts with less
    # scratch memory
    # than np.lexsort; rows fit int32 below 2**31 records, halving what each DataLoader worker holds.
    order_key = np.asarray(ix.cols["shard"]).astype(np.uint64)
    order_key <<= np.uint64(40)
    order_key |= np.asarray(ix.cols["offset"], dtype=np.uint64)
    rows = np.argsort(order_key, kind="stable")
    del order_key
    rows = rows.astype(np.int32 if ix.count < 2**31 else np.int64)
    bounds = np.searchsorted(np.asarray(ix.cols["shard"])[rows], np.arange(len(ix.shards) + 1)).astype(np.int64)
    return rows, bounds


def epoch_plan(sizes: np.ndarray, consumer: int, consumers: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """One consumer's share of an epoch as ``[k, 3]`` intervals (shard, first, stop) of shard-local record positions.

    Shards are laid out in an order shuffled per (seed, epoch); that sequence of records is cut into
    ``consumers`` contiguous slices whose sizes differ by at most one, and this returns slice ``consumer``.
    """
    order = list(range(len(sizes)))
    if shuffle:
        random.Random(f"featstore-shards-{seed}-{epoch}").shuffle(order)
    order_arr = np.asarray(order, dtype=np.int64)
    ends = np.cumsum(np.asarray(sizes, dtype=np.int64)[order_arr]) if len(order) else np.zeros(0, np.int64)
    starts = ends - np.asarray(sizes, dtype=np.int64)[order_arr] if len(order) else ends
    n = int(ends[-1]) if len(ends) else 0
    lo, hi = consumer * n // consumers, (consumer + 1) * n // consumers
    first, stop = np.maximum(starts, lo) - starts, np.minimum(ends, hi) - starts
    keep = stop > first
    return np.stack([order_arr[keep], first[keep], stop[keep]], axis=1) if keep.any() else np.zeros((0, 3), np.int64)


def slice_size(records: int, consumer: int, consumers: int) -> int:
    """How many records ``consumer`` reads per epoch (see :func:`epoch_plan`)."""
    return (consumer + 1) * records // consumers - consumer * records // consumers


def buffer_shuffle(seq: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``size`` emits ``seq`` in: fill it, then emit a random slot and refill it."""
    n = len(seq)
    if size <= 1 or n <= 1:
        return seq
    out = np.empty_like(seq)
    buf = seq[:size].copy()
    live, nxt = len(buf), len(buf)
    draws = rng.integers(0, 1 << 32, size=n, dtype=np.uint32)  # modulo bias < size / 2**32
    for i in range(n):
        k = int(draws[i] % live)
        out[i] = buf[k]
        if nxt < n:
            buf[k] = seq[nxt]
            nxt += 1
        else:
            live -= 1
            buf[k] = buf[live]
    return out


def round_robin_taken(counts: list[int], k: int) -> list[int]:
    """Items taken from each worker after a DataLoader handed out ``k``: it takes one from each active worker in
    turn (ascending id; a worker drops out when it runs dry), which is torch's order with ``in_order=True``."""
    taken = [0] * len(counts)
    active = [w for w, c in enumerate(counts) if c > 0]
    while k > 0 and active:
        step = min(counts[w] - taken[w] for w in active)
        if k >= step * len(active):
            for w in active:
                taken[w] += step
            k -= step * len(active)
            active = [w for w in active if taken[w] < counts[w]]
        else:
            rounds, extra = divmod(k, len(active))
            for i, w in enumerate(active):
                taken[w] += rounds + (i < extra)
            k = 0
    return taken


def items_of(samples: int, batch_size: int | None, drop_last: bool) -> int:
    """DataLoader items a worker yields for ``samples`` samples."""
    if batch_size is None:
        return samples
    return samples // batch_size if drop_last else -(-samples // batch_size)


class FeatureStream(torch.utils.data.IterableDataset):
    """A DDP- and worker-aware stream over a shard store's live records (see :func:`stream`).

    The epoch plan is a few numpy arrays (index rows ordered by shard and offset, per-shard bounds, this
    consumer's intervals): no Python object per record. ``state_dict()`` / ``load_state_dict()`` resume an
    epoch where a job stopped, each record exactly once across ranks and workers.
    """

    def __init__(self, root: Path | Storage, *, shuffle: bool, seed: int, epoch: int, shuffle_buffer: int,
                 resampled: bool, dequantize: bool = True, read_ahead: int = DEFAULT_READ_AHEAD):
        super().__init__()
        storage = parse_location(root)
        self.root: Path | str = storage.local_path() or storage.display
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.shuffle_buffer, self.resampled, self.dequantize = shuffle_buffer, resampled, dequantize
        self.read_ahead = read_ahead
        self.chunk_bytes = DEFAULT_CHUNK_BYTES  # remote stores: bytes per ranged GET while streaming
        if storage.is_local:
            self.store = ShardStore(self.root, read_manifest(find_manifest(Path(self.root))))
        else:
            self.store = ShardStore(storage.display, read_store_manifest(storage), storage=storage)
        self.num_records = len(self.store.index)
        if self.num_records == 0:
            raise StoreError(f"shard store {self.root} holds no records; nothing to stream")
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None  # (pid, rows, bounds), built lazily per process
        self._resume: dict[str, Any] | None = None
        self._loader: tuple[int, int | None, bool] | None = None  # (num_workers, batch_size, drop_last) of .loader()
        self._consumed = 0

    def __getstate__(self) -> dict[str, Any]:
        d = self.__dict__.copy()
        d["_plan"] = None  # each worker builds its own (cheap), so pickling to spawned workers stays small
        return d

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the order; call before creating the DataLoader iterator)."""
        if epoch != self.epoch:
            self._consumed = 0
            if self._resume is not None and self._resume["epoch"] != epoch:
                self._resume = None
        self.epoch = epoch

    def __len__(self) -> int:
        """Records this rank yields per epoch (all its DataLoader workers together)."""
        d = dist_env()
        return slice_size(self.num_records, d.rank, d.world_size)

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        if self._plan is None or self._plan[0] != os.getpid():
            rows, bounds = shard_rows(self.store.index)
            self._plan = (os.getpid(), rows, bounds)
        return self._plan[1], self._plan[2]

    def epoch_rows(self, epoch: int, me: int, consumers: int) -> np.ndarray:
        """Index rows consumer ``me`` reads in ``epoch``, in the order it reads them (before any resume skip)."""
        return self._epoch_orders(epoch, me, consumers)[1]

    def _epoch_orders(self, epoch: int, me: int, consumers: int) -> tuple[np.ndarray, np.ndarray]:
        """Consumer ``me``'s rows in shard order (as stored) and in the order it yields them (shuffle buffer)."""
        rows, bounds = self._rows()
        plan = epoch_plan(np.diff(bounds), me, consumers, self.seed, epoch, self.shuffle)
        seq = np.concatenate([rows[bounds[s] + a:bounds[s] + b] for s, a, b in plan]) if len(plan) else rows[:0]
        if self.shuffle and self.shuffle_buffer > 1:
            return seq, buffer_shuffle(seq, self.shuffle_buffer, np.random.default_rng([seed_int(self.seed), epoch, me]))
        return seq, seq

    def _skip(self, epoch: int, me: Consumer) -> int:
        """Records this worker already delivered in ``epoch`` before the saved state (0 without one)."""
        st = self._resume
        if st is None or st["epoch"] != epoch:
            return 0
        rank, world, wid, nworkers = me.rank, me.world_size, me.worker, me.num_workers
        if st["world_size"] != world or max(1, st["num_workers"]) != nworkers:
            raise StoreError(f"cannot resume: the state was saved with world size {st['world_size']} and "
                             f"{st['num_workers']} DataLoader workers, this run has {world} and {nworkers}; resume "
                             f"with the same ones (the epoch plan depends on them)")
        sizes = [slice_size(self.num_records, rank * nworkers + w, world * nworkers) for w in range(nworkers)]
        counts = [items_of(n, st["batch_size"], st["drop_last"]) for n in sizes]
        taken = round_robin_taken(counts, st["consumed"])[wid]
        per_item = st["batch_size"] or 1
        return min(taken * per_item, sizes[wid])

    def _samples(self, rows: np.ndarray, stored_order: np.ndarray) -> Iterator[dict[str, Any]]:
        ix = self.store.index
        pool = worker_pool()
        if self.store.storage.is_local:
            stored = (self._read_local(ix.entry(int(row)), pool) for row in rows)
        else:
            stored = ((e, data, None) for e, data in self._streamed(rows, stored_order))
        for e, data, slot in stored:
            sample = decode_to_sample(data, self.dequantize, pool, read_into=slot)
            sample["__key__"] = encode_key(e.key)
            yield sample

    def _read_local(self, e: IndexEntry, pool: SlotPool | None) -> tuple[IndexEntry, memoryview, Slot | None]:
        """A record's bytes from local disk: an uncompressed one straight into a pool slot (in a worker)."""
        if pool is None or e.length < decoded_bytes(e):
            return e, self.store.read_bytes(e, for_decoding=True), None
        slot = pool.slot(e.length)
        return e, self.store.read_bytes(e, buffer=memoryview(slot.tensor.numpy())), slot

    def _streamed(self, rows: np.ndarray, stored_order: np.ndarray) -> Iterator[tuple[IndexEntry, bytes]]:
        """``(entry, bytes)`` of ``rows`` in that order, read from a remote store in ``stored_order`` (whole runs
        of shards, chunked, with read-ahead); records read ahead of their turn wait in memory."""
        ix = self.store.index
        read = stored_order[np.isin(stored_order, rows)]
        shard_of = np.asarray(ix.cols["shard"])[read] if len(read) else np.empty(0, np.int64)
        cuts = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(read)]
        runs = ((ix.shards[int(shard_of[a])], [ix.entry(int(r)) for r in read[a:b]]) for a, b in zip(cuts, cuts[1:])
                if b > a)
        arrived = zip(read.tolist(), iter_shard_records(self.store.storage, runs, chunk_bytes=self.chunk_bytes,
                                                          read_ahead=self.read_ahead))
        waiting: dict[int, tuple[IndexEntry, bytes]] = {}
        for row in rows.tolist():
            while row not in waiting:
                got = next(arrived, None)
                if got is None:
                    raise RecordError(f"stream of {self.root} ended before row {row}; run `featstore verify {self.root}`")
                waiting[got[0]] = got[1]
            yield waiting.pop(row)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me = consumer()
        epoch = self.epoch
        skip = self._skip(epoch, me)  # read now: a loader clears the resume state once iteration starts
        in_process = not me.in_worker and self._loader is None
        return self._epochs(epoch, me.index, me.count, skip, in_process)

    def _epochs(self, epoch: int, me: int, consumers: int, skip: int, count: bool) -> Iterator[dict[str, Any]]:
        while True:
            stored_order, rows = self._epoch_orders(epoch, me, consumers)
            for sample in self._samples(rows[skip:], stored_order):
                if count:
                    self._consumed += 1
                yield sample
            if not self.resampled:
                return
            epoch, skip = epoch + 1, 0

    def loader(self, **kwargs: Any) -> "StreamLoader":
        """A torch DataLoader over this stream that counts what it hands out, so :meth:`state_dict` can resume.

        Takes DataLoader arguments (``batch_size`` defaults to None: one sample at a time).
        """
        kwargs.setdefault("batch_size", None)
        return StreamLoader(self, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch: what a restarted job passes to :meth:`load_state_dict`.

        Counts what :meth:`loader` handed out (or samples iterated in this process without a DataLoader).
        In DDP every rank consumes the same number of batches, so rank 0's state restores every rank.
        """
        if self.resampled:
            raise StoreError("state_dict() needs resampled=False (an epoch to resume within)")
        workers, batch, drop_last = self._loader or (0, None, False)
        return {"version": 1, "epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "records": self.num_records, "world_size": dist_env().world_size,
                "num_workers": workers, "batch_size": batch, "drop_last": drop_last, "consumed": self._consumed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved epoch with the records not yet delivered (same store, seed, world size and workers)."""
        mine = {"seed": self.seed, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
                "records": self.num_records}
        diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
        if diff:
            raise StoreError(f"cannot resume this stream from the saved state ({'; '.join(diff)}); open the stream "
                             f"with the saved settings on the same store")
        self.epoch = int(state["epoch"])
        self._consumed = int(state["consumed"])
        self._resume = dict(state)


def seed_int(seed: int) -> int:
    """A non-negative seed for numpy's generator."""
    return seed % (1 << 63)


class StreamLoader(torch.utils.data.DataLoader):
    """A DataLoader over a :class:`FeatureStream` that counts the items it hands out (for ``state_dict``)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        ds: FeatureStream = self.dataset  # type: ignore[assignment]
        if getattr(self, "in_order", True) is False:
            raise StoreError("resumable streams need DataLoader(in_order=True), the default")
        ds._loader = (self.num_workers, self.batch_size, self.drop_last)
        resumed = ds._resume is not None and ds._resume["epoch"] == ds.epoch
        ds._consumed = ds._consumed if resumed else 0
        it = super().__iter__()  # workers copy the dataset (and its resume state) here
        ds._resume = None
        return self._count(it, ds)

    @staticmethod
    def _count(it: Iterator[Any], ds: FeatureStream) -> Iterator[Any]:
        for item in it:
            ds._consumed += 1
            yield item


def stream(path: str | os.PathLike[str], shuffle: bool = True, seed: int = 0, epoch: int = 0,
           shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, resampled: bool = False,
           dequantize: bool = True, storage_options: dict[str, Any] | None = None,
           read_ahead: int = DEFAULT_READ_AHEAD) -> FeatureStream:
    """A torch IterableDataset over a shard store: each record once per epoch across all ranks and workers.

    Order is deterministic for (seed, epoch, world size, workers); ``resampled=True`` repeats forever with
    the epoch advancing each pass. Samples are dicts with ``key``, ``path``, ``features`` and other tensors;
    with ``dequantize=False`` int8-coded tensors stay int8 beside their scales (see :func:`dequantize`).
    ``path`` may be an fsspec URL (``s3://bucket/prefix``, options in ``storage_options``): whole runs of shards
    are then read in large chunks, ``read_ahead`` of them fetched in the background.
    """
    if is_remote(path):
        storage = parse_location(str(path), storage_options)
        if read_store_manifest(storage).get("layout") != "shards":
            raise StoreError(f"{storage.display} is not a shard store; stream() needs shards")
        return FeatureStream(storage, shuffle=shuffle, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                             resampled=resampled, dequantize=dequantize, read_ahead=read_ahead)
    mpath = find_manifest(local_path_of(path))
    m = read_manifest(mpath)
    if m.get("layout") != "shards":
        raise StoreError(f"{path} is a per-image store; stream() needs shards. Convert it with "
                         f"`featstore export {m.get('data_root') or path} --format shards --out DIR`, or use "
                         f"open_store() with a map-style Dataset")
    return FeatureStream(mpath.parent, shuffle=shuffle, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, dequantize=dequantize)


__all__ = ["open_store", "stream", "load_cached_vggt_features", "decode_sample", "dequantize", "Store", "ShardStore",
           "PerImageStore", "FeatureStream", "StreamLoader", "key_for_path"]
