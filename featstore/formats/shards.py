"""Tar shards: the writer (temporary name, size rollover, rename on close) and the one tar walker every reader
of whole shards uses (scan, merge, salvage, verify).

Shards are plain POSIX tar files named like webdataset shards, ``<prefix>-<rank>-<n>.tar``, holding one
member ``<encoded key>.fsr`` per record (see :mod:`featstore.formats.keys`). A shard becomes visible under
its final name only once it is complete and fsynced, so readers never see a torn shard.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import struct
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence

from featstore.errors import RecordError, StoreError
from featstore.formats.keys import key_from_member, member_name
from featstore.formats.record import decode_header
from featstore.runtime.faults import crash_point
from featstore.runtime.fsutil import TMP_MARKER, disk_full_is_store_error, fsync_dir, sweep_dead_temps_once, temp_name_for
from featstore.formats.layout import DEFAULT_SHARD_BYTES, SHARD_RE, SHARDS_DIR, shard_name

if TYPE_CHECKING:
    from featstore.storage import Storage

BLOCK = 512
RECORD_SIZE = 20 * BLOCK  # tar archives end padded to a multiple of this


@dataclass(frozen=True)
class ShardEntry:
    """Where one record lives: member data offset and length inside a shard, and what its header says."""

    key: str
    offset: int
    length: int
    crc32: int  # crc32 of the whole stored record bytes
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) per tensor
    source: tuple[int, int]  # (size, mtime_ns) of the source image when the record was built


@dataclass(frozen=True)
class ShardInfo:
    """A closed shard: its file name, record count, size and sha256."""

    name: str
    records: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ClosedShard:
    """What :class:`ShardWriter` hands its ``post`` hook as each shard closes: the shard, the index entries of
    its records (in offset order) and the local file under its final name."""

    info: ShardInfo
    entries: list[ShardEntry]
    path: Path



def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """Return (prefix, rank, n) for a shard file name, or None."""
    m = SHARD_RE.match(name)
    return (m["prefix"], int(m["rank"]), int(m["n"])) if m else None


def complete_shards(listing: Mapping[str, int]) -> dict[str, int]:
    """THE shard listing rule: the complete shards of a folder listing (name or path -> bytes), by base name;
    only shard names count (a temporary file never parses as one)."""
    return {n.rsplit("/", 1)[-1]: size for n, size in listing.items() if parse_shard_name(n.rsplit("/", 1)[-1])}


def list_shards(shards_dir: Path) -> list[str]:
    """Names of the complete shards in the local folder ``shards_dir``, sorted."""
    if not shards_dir.is_dir():
        return []
    return sorted(complete_shards({e.name: 0 for e in os.scandir(shards_dir) if e.is_file()}))


def entry_from_record_bytes(key: str, offset: int, data: bytes | memoryview) -> ShardEntry:
    """Build the index entry for record bytes stored at ``offset``."""
    import zlib

    header, specs, _ = decode_header(data)
    if header["key"] != key:
        raise RecordError(f"member for key {key!r} holds a record for {header['key']!r}")
    src = (header.get("meta") or {}).get("source") or {}
    return ShardEntry(key, offset, len(data), zlib.crc32(data) & 0xFFFFFFFF,
                      tuple((s.name, s.dtype, s.shape) for s in specs),
                      (int(src.get("size", -1)), int(src.get("mtime_ns", -1))))


class _TarAppender:
    """Writes a pax tar archive member by member, the bytes ``tarfile`` writes, hashing them as they go.

    Each member is three writes (header, data, padding) and one sha256 update of the data: background writer
    threads then take and release the GIL a few times per record instead of once per 16 KB (``tarfile`` copies
    through a 16 KB buffer), which starves a GPU build's main thread.
    """

    def __init__(self, f: BinaryIO):
        self.f, self.pos, self.sha = f, 0, hashlib.sha256()

    def _put(self, part: bytes | memoryview) -> None:
        self.f.write(part)
        self.sha.update(part)
        self.pos += len(part)

    def add(self, name: str, data: bytes | memoryview) -> int:
        """Append one member; returns the offset of its data."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
        self._put(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape"))
        offset = self.pos
        self._put(data)
        if len(data) % BLOCK:
            self._put(bytes(BLOCK - len(data) % BLOCK))
        return offset

    def finish(self) -> None:
        """End of archive: two zero blocks, then zeros up to a whole tar record (as ``tarfile`` closes)."""
        self._put(bytes(2 * BLOCK))
        if self.pos % RECORD_SIZE:
            self._put(bytes(RECORD_SIZE - self.pos % RECORD_SIZE))


class ShardWriter:
    """Appends encoded records to tar shards, rolling over at ``max_bytes``; closes each shard atomically and
    hands it to ``post`` (to upload it, or collect its index entries: the writer keeps only the open shard's).

    A context manager: leaving the block closes the open shard; leaving it on an error drops the open shard's
    temporary file (the closed shards stay).
    """

    def __init__(self, shards_dir: Path, prefix: str, rank: int, first_n: int, max_bytes: int = DEFAULT_SHARD_BYTES,
                 fsync: bool = True, post: Callable[[ClosedShard], None] | None = None):
        self.dir, self.prefix, self.rank, self.n = Path(shards_dir), prefix, rank, first_n
        self.max_bytes, self.fsync, self.post = max_bytes, fsync, post
        self._f: BinaryIO | None = None
        self._tar: _TarAppender | None = None
        self._entries: list[ShardEntry] = []
        self._tmp: Path | None = None
        self.dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: Any) -> None:
        if exc_type is None:
            self.close_shard()
        else:
            self.abort()

    def _open(self) -> None:
        final = self.dir / shard_name(self.prefix, self.rank, self.n)
        if final.exists():
            raise StoreError(f"refusing to overwrite existing shard {final}")
        sweep_dead_temps_once(self.dir)  # a killed writer's unfinished shard
        self._tmp = temp_name_for(final)
        self._f = open(self._tmp, "wb")
        self._tar = _TarAppender(self._f)
        self._entries = []
        crash_point("shard-opened")

    def write(self, key: str, data: bytes) -> None:
        """Append one encoded record (rolls to a new shard first when the current one is full)."""
        if self._tar is not None and self._tar.pos + len(data) + 2 * BLOCK > self.max_bytes and self._entries:
            self.close_shard()
        if self._tar is None:
            with disk_full_is_store_error(self.dir / shard_name(self.prefix, self.rank, self.n), BLOCK):
                self._open()
        assert self._tar is not None and self._tmp is not None
        with disk_full_is_store_error(self._tmp, len(data) + 3 * BLOCK):
            data_offset = self._tar.add(member_name(key), data)
        self._entries.append(entry_from_record_bytes(key, data_offset, data))
        crash_point("record-appended")

    def close_shard(self) -> ShardInfo | None:
        """Finish the open shard (end-of-archive blocks, fsync, rename to its final name) and call ``post``."""
        if self._tar is None:
            return None
        assert self._f is not None and self._tmp is not None
        with disk_full_is_store_error(self._tmp, 20 * BLOCK):
            self._tar.finish()
            crash_point("shard-tar-closed")
            self._f.flush()
            if self.fsync:
                os.fsync(self._f.fileno())
            self._f.close()
        name = shard_name(self.prefix, self.rank, self.n)
        crash_point("shard-before-rename")
        os.replace(self._tmp, self.dir / name)
        if self.fsync:
            fsync_dir(self.dir)
        crash_point("shard-after-rename")
        info = ShardInfo(name, len(self._entries), self._tar.pos, self._tar.sha.hexdigest())
        closed = ClosedShard(info, self._entries, self.dir / name)
        self._tar = self._f = self._tmp = None
        self._entries = []
        self.n += 1
        if self.post is not None:
            self.post(closed)
        return info

    def abort(self) -> None:
        """Drop the open shard's temporary file (used on errors; a crash leaves it for cleanup)."""
        if self._f is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._f.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar = self._f = self._tmp = None


def _complete_prefix(path: Path) -> tuple[int, int]:
    """(bytes, records) of the leading members of an unfinished shard that are whole and decode."""
    from featstore.formats.record import decode_record

    end = count = 0
    try:
        with open(path, "rb") as f:
            for m in walk_shard(f, str(path)):
                if key_from_member(m.name) != decode_record(m.data, verify=True).key:
                    break
                end, count = m.offset + len(m.data) + (-len(m.data) % BLOCK), count + 1
    except (BrokenShardError, RecordError, OSError):
        pass
    return end, count


def salvage_shard(tmp: Path, fsync: bool = True) -> tuple[str, int] | None:
    """Keep the whole records of a dead writer's unfinished shard ``tmp``: cut it after the last complete record,
    end the archive and publish it under the name it was being written for. Returns (name, records), or None
    when nothing could be kept (the file is then removed)."""
    final = tmp.with_name(tmp.name[1:].rsplit(TMP_MARKER, 1)[0])
    end, count = _complete_prefix(tmp) if parse_shard_name(final.name) and not final.exists() else (0, 0)
    if not count:
        tmp.unlink()
        return None
    with open(tmp, "r+b") as f:
        f.truncate(end)
        f.seek(end)
        tail = 2 * BLOCK + (-(end + 2 * BLOCK) % RECORD_SIZE)
        f.write(bytes(tail))
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    if fsync:
        fsync_dir(tmp.parent)
    return final.name, count


class BrokenShardError(StoreError):
    """A shard's tar structure cannot be read to its end (truncated, overwritten, not a tar file)."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"shard {where} is not a readable tar file ({reason}); rebuild it or remove it and resume "
                         f"the build")
        self.where, self.reason = where, reason


class HashingReader(io.RawIOBase):
    """A sequential reader that hashes (sha256) and counts every byte it hands out, so one pass over a shard
    yields its tar members and its checksum."""

    def __init__(self, f: BinaryIO):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:  # type: ignore[override]
        data = self.f.read(n)  # handed on as read: no copy through a buffer
        self.sha.update(data)
        self.pos += len(data)
        return data

    def readinto(self, b: Any) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def drain(self, chunk: int = 1 << 22) -> None:
        """Read (and hash) whatever the walk left unread: the end-of-archive padding, or the rest of a broken
        shard."""
        while self.read(chunk):
            pass

    def hexdigest(self) -> str:
        """sha256 of the bytes read so far."""
        return self.sha.hexdigest()


@dataclass(frozen=True)
class TarMember:
    """One regular member of a shard: its name, the offset of its data in the shard, and the data."""

    name: str
    offset: int
    data: bytes


def walk_shard(f: BinaryIO, where: str) -> Iterator[TarMember]:
    """Every regular member of the tar stream ``f``, in order, in one sequential pass (wrap ``f`` in a
    :class:`HashingReader` to checksum the same bytes). Raises :class:`BrokenShardError` when the tar
    structure breaks, e.g. a member cut short."""
    mode = "r:" if f.seekable() else "r|"  # a plain file: seek past headers; a stream: read straight through
    try:
        with tarfile.open(fileobj=f, mode=mode) as tar:  # type: ignore[call-overload]
            for m in tar:
                if m.isfile():
                    member = tar.extractfile(m)
                    yield TarMember(m.name, m.offset_data, member.read() if member is not None else b"")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise BrokenShardError(where, str(e)) from None


def entries_of_stream(f: BinaryIO, where: str) -> list[ShardEntry]:
    """The index entries of the shard streamed by ``f``, rebuilt from its members' record headers."""
    entries = []
    for m in walk_shard(f, where):
        key = key_from_member(m.name)
        if key is None:
            raise StoreError(f"shard {where} has an unexpected member {m.name!r}")
        entries.append(entry_from_record_bytes(key, m.offset, m.data))
    return entries


def scan_shard(path: Path) -> list[ShardEntry]:
    """Rebuild the index entries of the local shard ``path``."""
    with open(path, "rb") as f:
        return entries_of_stream(f, str(path))


def scan_stored_shard(storage: "Storage", shard: str) -> list[ShardEntry]:
    """Rebuild the index entries of ``shards/<shard>`` of a store, local or remote, in one streamed read."""
    name = f"{SHARDS_DIR}/{shard}"
    with storage.open_sequential(name) as f:
        return entries_of_stream(f, storage.describe(name))


def read_record_meta(fd: int, offset: int) -> dict:
    """The metadata of the record stored at ``offset`` of an open shard (reads its header only)."""
    head = os.pread(fd, 8, offset)
    (hlen,) = struct.unpack("<I", head[4:8]) if len(head) == 8 else (0,)
    header, _, _ = decode_header(head + os.pread(fd, hlen, offset + 8))
    return dict(header.get("meta") or {})


def read_record_meta_at(storage: "Storage", shard: str, offset: int) -> dict:
    """:func:`read_record_meta` for a shard of any store (two small ranged reads on a remote one)."""
    name = f"{SHARDS_DIR}/{shard}"
    head = storage.read_range(name, offset, 8)
    (hlen,) = struct.unpack("<I", head[4:8]) if len(head) == 8 else (0,)
    header, _, _ = decode_header(head + storage.read_range(name, offset + 8, hlen))
    return dict(header.get("meta") or {})


def iter_shard_records(storage: "Storage", runs: Iterable[tuple[str, Sequence[Any]]], *,
                       chunk_bytes: int = 8 << 20, read_ahead: int = 2) -> Iterator[tuple[Any, bytes]]:
    """``(entry, record bytes)`` for every entry of each ``(shard, entries sorted by offset)`` run, in order.

    Each run is fetched as one contiguous byte range (first record to last) in chunks, the next chunks (also
    of the next runs) arriving in the background; tar headers and skipped records between the entries are
    dropped. ``runs`` may be a generator (taken lazily); entries need ``key``, ``offset`` and ``length``.
    """
    taken: dict[int, tuple[str, Sequence[Any]]] = {}

    def ranges() -> Iterator[tuple[str, int, int]]:
        for i, (shard, es) in enumerate(r for r in runs if r[1]):
            taken[i] = (shard, es)
            yield f"{SHARDS_DIR}/{shard}", es[0].offset, es[-1].offset + es[-1].length

    chunks = storage.iter_ranges(ranges(), chunk_bytes=chunk_bytes, read_ahead=read_ahead)
    shard, todo, buf, base, cur = "", collections.deque(), bytearray(), 0, -1
    try:
        for i, data in chunks:
            if i != cur:
                if todo:
                    break  # the previous run ended early
                cur = i
                shard, es = taken.pop(i)
                todo, buf, base = collections.deque(es), bytearray(), es[0].offset
            buf += data
            while todo and todo[0].offset + todo[0].length - base <= len(buf):
                e = todo.popleft()
                end = e.offset + e.length - base
                yield e, bytes(buf[e.offset - base:end])
                del buf[:end]
                base += end
        if todo:
            raise RecordError(f"shard {shard} ended before record {todo[0].key!r} (offset {todo[0].offset}); run "
                              f"`featstore verify` on the store")
    finally:
        chunks.close()
