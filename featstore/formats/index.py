"""The shard index: key -> (shard, offset, length, crc32, tensor layout, source fingerprint).

A single binary file, ``index.fsi``, opened with ``numpy.memmap`` so that opening an index of a million
records costs a header parse and a few mmaps (no per-record work), and a lookup is a binary search over
64-bit key hashes plus one key comparison. Lookups never touch shard data.

Layout: ``b"FSIDX001"`` | u64 header length | header JSON | 64-byte-aligned column arrays. The header
lists the shard names, the distinct tensor layouts ("specs") and each column's offset, dtype and length.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

import numpy as np

from featstore.errors import StoreError
from featstore.formats.shards import ShardEntry
from featstore.runtime.fsutil import atomic_open
from featstore.formats.layout import INDEX_NAME

if TYPE_CHECKING:
    from featstore.storage import Storage

MAGIC = b"FSIDX001"
ALIGN = 64
COLUMNS = {
    "hash": np.uint64, "shard": np.uint32, "spec": np.uint32, "offset": np.uint64, "length": np.uint64,
    "crc32": np.uint32, "src_size": np.int64, "src_mtime": np.int64, "key_off": np.uint64,
}

TensorLayout = tuple[tuple[str, str, tuple[int, ...]], ...]


def key_hash(key: str) -> int:
    """Stable 64-bit hash of a key (blake2b), the index's sort order."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


@dataclass(frozen=True)
class IndexEntry:
    """One record's location and description as the index holds it."""

    key: str
    shard: str
    offset: int
    length: int
    crc32: int
    tensors: TensorLayout
    source: tuple[int, int]


def write_index(path: Path, shards: Sequence[str], entries: Iterable[tuple[int, ShardEntry]]) -> int:
    """Write an index atomically from (shard position in ``shards``, entry) pairs; returns the record count.

    A key that appears more than once keeps the entry from the latest shard (highest position), so a
    rebuilt record supersedes the old one.
    """
    latest: dict[str, tuple[int, ShardEntry]] = {}
    for si, e in entries:
        prev = latest.get(e.key)
        if prev is None or si >= prev[0]:
            latest[e.key] = (si, e)
    keys = list(latest)
    n = len(keys)
    hashes = np.fromiter((key_hash(k) for k in keys), dtype=np.uint64, count=n)
    order = np.argsort(hashes, kind="stable")
    specs: dict[TensorLayout, int] = {}
    cols = {c: np.empty(n + (1 if c == "key_off" else 0), dtype=t) for c, t in COLUMNS.items()}
    blob = bytearray()
    cols["key_off"][0] = 0
    for row, i in enumerate(order):
        si, e = latest[keys[i]]
        cols["hash"][row] = hashes[i]
        cols["shard"][row] = si
        cols["spec"][row] = specs.setdefault(e.tensors, len(specs))
        cols["offset"][row], cols["length"][row], cols["crc32"][row] = e.offset, e.length, e.crc32
        cols["src_size"][row], cols["src_mtime"][row] = e.source
        blob += e.key.encode("utf-8", "surrogateescape")
        cols["key_off"][row + 1] = len(blob)
    arrays = list(cols.items()) + [("keys", np.frombuffer(bytes(blob), dtype=np.uint8))]
    header: dict[str, Any] = {"count": n, "shards": list(shards),
                              "specs": [[[nm, dt, list(sh)] for nm, dt, sh in s] for s in specs],
                              "columns": {}}
    # Column offsets depend on the header length, which depends on the offsets: fix with generous padding.
    body_start = 4096 * (1 + (len(json.dumps(header)) + 64 * len(arrays) + 2048) // 4096)
    pos = body_start
    for name, arr in arrays:
        header["columns"][name] = [pos, str(arr.dtype), int(arr.size)]
        pos += -(-arr.nbytes // ALIGN) * ALIGN
    hb = json.dumps(header).encode("utf-8")
    if 16 + len(hb) > body_start:
        raise StoreError("index header overflow (too many shards or specs)")
    with atomic_open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<Q", len(hb)) + hb)
        for name, arr in arrays:
            f.seek(header["columns"][name][0])
            f.write(arr.tobytes())
        f.truncate(pos)
    return n


class Index:
    """A read-only, memory-mapped index. Safe to share across threads; re-open after fork is cheap."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(16)
                if len(head) != 16 or head[:8] != MAGIC:
                    raise StoreError(f"{self.path} is not a featstore index (bad magic); re-run "
                                     f"`featstore merge` on the store to rebuild it")
                (hlen,) = struct.unpack("<Q", head[8:])
                self.header = json.loads(f.read(hlen))
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot read index {self.path}: {e}") from None
        size = self.path.stat().st_size
        self.count: int = int(self.header["count"])
        self.shards: list[str] = list(self.header["shards"])
        self.specs: list[TensorLayout] = [tuple((nm, dt, tuple(sh)) for nm, dt, sh in s)
                                          for s in self.header["specs"]]
        self.cols: dict[str, np.ndarray] = {}
        for name, (off, dtype, length) in self.header["columns"].items():
            nbytes = np.dtype(dtype).itemsize * length
            if off + nbytes > size:
                raise StoreError(f"index {self.path} is truncated (column {name} ends past the file end)")
            self.cols[name] = (np.memmap(self.path, dtype=dtype, mode="r", offset=off, shape=(length,))
                               if length else np.empty(0, dtype=dtype))

    def __len__(self) -> int:
        return self.count

    def _key_at(self, row: int) -> str:
        ko = self.cols["key_off"]
        return bytes(self.cols["keys"][int(ko[row]):int(ko[row + 1])]).decode("utf-8", "surrogateescape")

    def find(self, key: str) -> int | None:
        """Row of ``key``, or None."""
        h = np.uint64(key_hash(key))
        hashes = self.cols["hash"]
        row = int(np.searchsorted(hashes, h, side="left"))
        while row < self.count and hashes[row] == h:
            if self._key_at(row) == key:
                return row
            row += 1
        return None

    def entry(self, row: int) -> IndexEntry:
        """The full entry at ``row``."""
        c = self.cols
        return IndexEntry(self._key_at(row), self.shards[int(c["shard"][row])], int(c["offset"][row]),
                          int(c["length"][row]), int(c["crc32"][row]), self.specs[int(c["spec"][row])],
                          (int(c["src_size"][row]), int(c["src_mtime"][row])))

    def get(self, key: str) -> IndexEntry | None:
        """The entry for ``key``, or None."""
        row = self.find(key)
        return None if row is None else self.entry(row)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.find(key) is not None

    def keys(self) -> list[str]:
        """All keys, sorted."""
        ko, blob = self.cols["key_off"], bytes(self.cols["keys"])
        return sorted(blob[int(ko[i]):int(ko[i + 1])].decode("utf-8", "surrogateescape") for i in range(self.count))

    def entries(self) -> Iterator[IndexEntry]:
        """Every entry, in index (hash) order."""
        for row in range(self.count):
            yield self.entry(row)

    def rows_by_shard(self) -> dict[str, np.ndarray]:
        """Row numbers per shard name (8 bytes a record; no per-record Python objects)."""
        shard_col = np.asarray(self.cols["shard"]) if self.count else np.empty(0, np.uint32)
        order = np.argsort(shard_col, kind="stable")
        bounds = np.searchsorted(shard_col[order], np.arange(len(self.shards) + 1))
        return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(self.shards)}

    def shard_entries(self) -> dict[str, list[IndexEntry]]:
        """Entries grouped by shard name, each list sorted by offset."""
        out: dict[str, list[IndexEntry]] = {s: [] for s in self.shards}
        for e in self.entries():
            out[e.shard].append(e)
        for lst in out.values():
            lst.sort(key=lambda e: e.offset)
        return out


def local_index_file(storage: "Storage", name: str = INDEX_NAME) -> Path:
    """A local file holding the store's index (or its alias index, ``name``): the file itself for a local store,
    else a downloaded copy.

    A copy is fetched once (one or a few GETs) into a temporary file that lives until this process exits,
    so DataLoader workers forked or spawned from it memory-map the same copy instead of fetching again.
    """
    local = storage.local_path(name)
    if local is not None:
        return local
    fd, tmp = tempfile.mkstemp(prefix="featstore-index-", suffix=".fsi")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(storage.read_bytes(name))
    except FileNotFoundError:
        os.unlink(tmp)
        raise StoreError(f"shard store {storage.display} has no {name}: the build has not finished (or was "
                         f"interrupted); re-run the build, or `featstore merge {storage.display}`") from None
    except BaseException:
        os.unlink(tmp)
        raise
    atexit.register(_remove_owned, tmp, os.getpid())
    return Path(tmp)


def _remove_owned(path: str, owner: int) -> None:
    if os.getpid() == owner:
        with contextlib.suppress(OSError):
            os.unlink(path)
