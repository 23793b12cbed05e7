"""The one tar walker every reader of whole shards uses (scan, merge, salvage, verify), the hashing reader
that checksums the same pass, record-header reads and the ranged record iterator."""

from __future__ import annotations

import collections
import hashlib
import io
import os
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterable, Iterator, Sequence

from featstore.errors import RecordError, StoreError
from featstore.formats.keys import key_from_member
from featstore.formats.layout import SHARDS_DIR
from featstore.formats.record import decode_header
from featstore.formats.shardinfo import ShardEntry, entry_from_record_bytes

if TYPE_CHECKING:
    from featstore.storage import Storage


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
