"""The readers of the two store layouts, both :class:`featstore.read.lookup.StoreReader`: :class:`ShardStore`
(tar shards and an index, local or on object storage) and :class:`PerImageStore` (``<image>.vggt_cache.pt``
files, featstore-written or legacy).

A shard store looks a key up in the memory-mapped index and reads only that record's bytes: a ``raw`` record
with ``preadv`` into a fresh aligned buffer (shared memory in a DataLoader worker) whose views are its
tensors; a compressed one decoded straight from a read-only map of its shard
(:class:`featstore.storage.MappedFile`), so its bytes are not copied at all. Shard files are opened lazily, so
a store created before a DataLoader forks its workers is safe to use inside them. A remote store fetches the
index once and reads each record with one ranged GET.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import torch

from featstore.errors import RecordError, StoreError
from featstore.formats.codecs import empty_tensor
from featstore.formats.index import Index, IndexEntry, local_index_file
from featstore.formats.keys import CacheLayout
from featstore.formats.layout import ALIAS_INDEX, INDEX_NAME, SHARDS_DIR
from featstore.formats.perimage import read_pt, scan_per_image
from featstore.formats.record import FEATURES, Record, decode_record, parse_dtype
from featstore.read.lookup import StoreReader
from featstore.storage import DEFAULT_MAX_OPEN, LocalStorage, Storage


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


class ShardStore(StoreReader):
    """Random access to a shard store: index lookup, then one read of just the record's bytes.

    Local stores read from cached file handles and maps (see :class:`featstore.storage.MappedFile`); remote stores (``s3://...``)
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

    def prefetch(self, e: IndexEntry) -> None:
        """Ask the kernel to start reading a local record now (a hint; a stream gives it for records ahead)."""
        if self.storage.is_local:
            self._check_pid()
            self.storage.mapped_file(f"{SHARDS_DIR}/{e.shard}").will_need(e.offset, e.length)

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
            try:
                path = local_index_file(self.storage, ALIAS_INDEX)  # a remote store's: fetched once
            except StoreError:
                path = None
            self._aliases = Index(path) if path is not None and path.is_file() else False
        return self._aliases.get(key) if self._aliases else None

    def _alias_features(self, key: str) -> torch.Tensor | None:
        entry = self._alias_entry(key)
        return None if entry is None else self.features_at(entry)

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


class PerImageStore(StoreReader):
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
