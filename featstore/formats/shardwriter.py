"""The shard writer: records appended as tar members to a temporary file, size rollover, fsync and rename on
close, so a shard is visible under its final name only once complete."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import queue
import tarfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable

from featstore.errors import StoreError
from featstore.formats.keys import member_name
from featstore.formats.layout import DEFAULT_SHARD_BYTES, shard_name
from featstore.formats.shardinfo import BLOCK, RECORD_SIZE, ClosedShard, ShardEntry, ShardInfo, entry_from_record_bytes
from featstore.runtime.faults import crash_point
from featstore.runtime.fsutil import disk_full_is_store_error, fsync_dir, sweep_dead_temps_once, temp_name_for


class _TarAppender:
    """Writes a pax tar archive member by member, the bytes ``tarfile`` writes, hashing them as they go.

    Each member is three writes (header, data, padding): background writer threads then take and release the
    GIL a few times per record instead of once per 16 KB (``tarfile`` copies through a 16 KB buffer), which
    starves a GPU build's main thread. The sha256 runs on a thread of its own, one member behind the writes
    (other buffers than ``bytes`` are copied first), so the writer thread only writes.
    """

    def __init__(self, f: BinaryIO):
        self.f, self.pos, self.sha = f, 0, hashlib.sha256()
        self._parts: queue.Queue = queue.Queue(maxsize=4)
        self._hasher = threading.Thread(target=self._hash, name="featstore-shard-sha256", daemon=True)
        self._hasher.start()

    def _hash(self) -> None:
        while (part := self._parts.get()) is not None:
            self.sha.update(part)

    def _put(self, part: bytes | memoryview) -> None:
        self.f.write(part)
        self._parts.put(part if isinstance(part, bytes) else bytes(part))  # a buffer's owner may change it later
        self.pos += len(part)

    def hexdigest(self) -> str:
        """sha256 of everything written (waits for the hashing thread, which then ends)."""
        self.stop()
        return self.sha.hexdigest()

    def stop(self) -> None:
        """End the hashing thread (after the parts already handed to it)."""
        if self._hasher.is_alive():
            self._parts.put(None)
            self._hasher.join()

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

    def write(self, key: str, data: bytes, entry: ShardEntry | None = None) -> None:
        """Append one encoded record (rolls to a new shard first when the current one is full). ``entry``: the
        record's index entry from :func:`entry_from_record_bytes` at any offset, made beforehand (on an encode
        thread) so this thread spends no pass over the bytes on it."""
        if self._tar is not None and self._tar.pos + len(data) + 2 * BLOCK > self.max_bytes and self._entries:
            self.close_shard()
        if self._tar is None:
            with disk_full_is_store_error(self.dir / shard_name(self.prefix, self.rank, self.n), BLOCK):
                self._open()
        assert self._tar is not None and self._tmp is not None
        with disk_full_is_store_error(self._tmp, len(data) + 3 * BLOCK):
            data_offset = self._tar.add(member_name(key), data)
        if entry is None or entry.key != key or entry.length != len(data):
            entry = entry_from_record_bytes(key, data_offset, data)
        self._entries.append(dataclasses.replace(entry, offset=data_offset))
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
        info = ShardInfo(name, len(self._entries), self._tar.pos, self._tar.hexdigest())
        closed = ClosedShard(info, self._entries, self.dir / name)
        self._tar = self._f = self._tmp = None
        self._entries = []
        self.n += 1
        if self.post is not None:
            self.post(closed)
        return info

    def abort(self) -> None:
        """Drop the open shard's temporary file (used on errors; a crash leaves it for cleanup)."""
        if self._tar is not None:
            self._tar.stop()
        if self._f is not None:
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                self._f.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        self._tar = self._f = self._tmp = None
