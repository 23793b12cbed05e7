"""How a stream gets its records' bytes: from local disk one record at a time (an uncompressed one straight
into a worker's shared-memory slot, the reads of the records next in line started ahead); from object storage
as whole runs of shards read sequentially in large chunks with read-ahead; or, with a shard cache
(:mod:`featstore.read.cache`), from the cached copy of each shard (downloaded once), in the order they are
yielded, each record's crc32 checked."""

from __future__ import annotations

import collections
import zlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from featstore.errors import RecordError
from featstore.formats.index import IndexEntry
from featstore.formats.shards import iter_shard_records
from featstore.read.cache import CachedShard, ShardCache
from featstore.read.sharedpool import Slot, SlotPool
from featstore.read.stores import ShardStore, decoded_bytes
from featstore.storage import DEFAULT_CHUNK_BYTES, DEFAULT_READ_AHEAD

LOCAL_AHEAD_BYTES = 32 << 20
Run = tuple[str, list[IndexEntry]]  # a shard and the entries read from it, by offset


@dataclass
class Reading:
    """How a stream reads a remote store: bytes per ranged GET, chunks fetched ahead, the shard cache."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    read_ahead: int = DEFAULT_READ_AHEAD
    cache: ShardCache | None = None
    local_ahead: int = LOCAL_AHEAD_BYTES  # local stores: bytes of the records next in line asked for ahead


def hinted(store: ShardStore, rows: np.ndarray, ahead: int) -> Iterator[IndexEntry]:
    """The entries of ``rows`` in order, each record's read started (:meth:`ShardStore.prefetch`) while up to
    ``ahead`` bytes of records before it are still being consumed, so cold reads overlap decoding."""
    ix = store.index
    window: collections.deque[IndexEntry] = collections.deque()
    queued = 0
    entries = (ix.entry(int(r)) for r in rows)
    for e in entries:
        window.append(e)
        queued += e.length
        if ahead > 0:
            store.prefetch(e)
        while window and (queued > ahead or ahead <= 0):
            first = window.popleft()
            queued -= first.length
            yield first
    yield from window


def read_local(store: ShardStore, e: IndexEntry, pool: SlotPool | None) -> tuple[IndexEntry, memoryview, Slot | None]:
    """A record's bytes from local disk: an uncompressed one straight into a pool slot (in a worker)."""
    if pool is None or e.length < decoded_bytes(e):
        return e, store.read_bytes(e, for_decoding=True), None
    slot = pool.slot(e.length)
    return e, store.read_bytes(e, buffer=memoryview(slot.tensor.numpy())), slot


def stored_records(store: ShardStore, rows: np.ndarray, stored_order: np.ndarray, pool: SlotPool | None,
                   reading: Reading) -> Iterator[tuple[IndexEntry, bytes | memoryview, Slot | None]]:
    """``(entry, bytes, slot)`` of ``rows`` in that order (``slot``: the pool slot the bytes were read into)."""
    if store.storage.is_local:
        return (read_local(store, e, pool) for e in hinted(store, rows, reading.local_ahead))
    if reading.cache is not None:
        return ((e, data, None) for e, data in cached_records(store, rows, reading.cache))
    return ((e, data, None) for e, data in remote_records(store, rows, stored_order, reading))


def _runs(store: ShardStore, read: np.ndarray) -> Iterator[Run]:
    """The rows ``read`` (in stored order) as runs of one shard each."""
    ix = store.index
    shard_of = np.asarray(ix.cols["shard"])[read] if len(read) else np.empty(0, np.int64)
    cuts = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(read)]
    for a, b in zip(cuts, cuts[1:]):
        if b > a:
            yield ix.shards[int(shard_of[a])], [ix.entry(int(r)) for r in read[a:b]]


def remote_records(store: ShardStore, rows: np.ndarray, stored_order: np.ndarray, reading: Reading
                   ) -> Iterator[tuple[IndexEntry, bytes]]:
    """``(entry, bytes)`` of ``rows`` in that order, read from a remote store in ``stored_order`` (whole runs
    of shards); records read ahead of their turn wait in memory."""
    read = stored_order[np.isin(stored_order, rows)]
    got = iter_shard_records(store.storage, _runs(store, read), chunk_bytes=reading.chunk_bytes,
                             read_ahead=reading.read_ahead)
    arrived = zip(read.tolist(), got)
    waiting: dict[int, tuple[IndexEntry, bytes]] = {}
    for row in rows.tolist():
        while row not in waiting:
            nxt = next(arrived, None)
            if nxt is None:
                raise RecordError(f"stream of {store.root} ended before row {row}; run `featstore verify {store.root}`")
            waiting[nxt[0]] = nxt[1]
        yield waiting.pop(row)


class CachedReads:
    """Records of a remote store read from the shard cache in any order: each shard is opened (downloaded first
    if needed) on its first record and closed after its last one in ``rows``, so eviction can reclaim it."""

    def __init__(self, store: ShardStore, cache: ShardCache, rows: np.ndarray):
        self.store, self.cache = store, cache
        shard_of = np.asarray(store.index.cols["shard"])[rows] if len(rows) else np.empty(0, np.int64)
        last = np.full(len(store.index.shards), -1, np.int64)
        np.maximum.at(last, shard_of, np.arange(len(rows)))  # each shard's last position in the rows
        self.last = last
        self.open: dict[str, CachedShard | None] = {}  # None: the cache cannot serve this shard

    def read(self, i: int, e: IndexEntry, shard_id: int) -> bytes | memoryview:
        """Record ``e`` (position ``i`` in the rows): from the cached shard, crc32 checked, else the bucket."""
        data = self._cached(e)
        if data is None:
            data = self.store.read_bytes(e)
        if self.last[shard_id] == i:
            self._close(e.shard)
        return data

    def _cached(self, e: IndexEntry) -> memoryview | None:
        for _ in range(2):
            if e.shard not in self.open:
                self.open[e.shard] = self.cache.open(e.shard, self.store.storage)
            cached = self.open[e.shard]
            if cached is None:
                return None
            data = cached.read(e.offset, e.length)
            if data is not None and zlib.crc32(data) & 0xFFFFFFFF == e.crc32:
                return data
            self._close(e.shard)
            self.cache.discard(e.shard, f"record {e.key!r} does not match its index entry's crc32")
        return None

    def _close(self, shard: str) -> None:
        cached = self.open.pop(shard, None)
        if cached is not None:
            cached.close()
            self.cache.evict()

    def close(self) -> None:
        for shard in list(self.open):
            self._close(shard)


def cached_records(store: ShardStore, rows: np.ndarray, cache: ShardCache) -> Iterator[tuple[IndexEntry, bytes | memoryview]]:
    """``(entry, bytes)`` of ``rows`` in that order from the shard cache (see :class:`CachedReads`)."""
    reads = CachedReads(store, cache, rows)
    ix = store.index
    shards = np.asarray(ix.cols["shard"])
    try:
        for i, row in enumerate(rows.tolist()):
            e = ix.entry(row)
            yield e, reads.read(i, e, int(shards[row]))
    finally:
        reads.close()
