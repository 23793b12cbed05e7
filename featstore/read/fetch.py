"""How a stream gets its records' bytes: from local disk one record at a time (an uncompressed one straight
into a worker's shared-memory slot); from object storage as whole runs of shards read sequentially in large
chunks with read-ahead; or, with a shard cache (:mod:`featstore.read.cache`), from the cached copy of each
run's shard, downloaded once."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from featstore.errors import RecordError
from featstore.formats.index import IndexEntry
from featstore.formats.shards import iter_shard_records
from featstore.read.cache import ShardCache
from featstore.read.sharedpool import Slot, SlotPool
from featstore.read.stores import ShardStore, decoded_bytes
from featstore.storage import DEFAULT_CHUNK_BYTES, DEFAULT_READ_AHEAD

Run = tuple[str, list[IndexEntry]]  # a shard and the entries read from it, by offset


@dataclass
class Reading:
    """How a stream reads a remote store: bytes per ranged GET, chunks fetched ahead, the shard cache."""

    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    read_ahead: int = DEFAULT_READ_AHEAD
    cache: ShardCache | None = None


def read_local(store: ShardStore, e: IndexEntry, pool: SlotPool | None) -> tuple[IndexEntry, memoryview, Slot | None]:
    """A record's bytes from local disk: an uncompressed one straight into a pool slot (in a worker)."""
    if pool is None or e.length < decoded_bytes(e):
        return e, store.read_bytes(e, for_decoding=True), None
    slot = pool.slot(e.length)
    return e, store.read_bytes(e, buffer=memoryview(slot.tensor.numpy())), slot


def stored_records(store: ShardStore, rows: np.ndarray, stored_order: np.ndarray, pool: SlotPool | None,
                   reading: Reading) -> Iterator[tuple[IndexEntry, bytes | memoryview, Slot | None]]:
    """``(entry, bytes, slot)`` of ``rows`` in that order (``slot``: the pool slot the bytes were read into)."""
    ix = store.index
    if store.storage.is_local:
        return (read_local(store, ix.entry(int(row)), pool) for row in rows)
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
    runs = _runs(store, read)
    if reading.cache is not None:
        got: Iterable[tuple[IndexEntry, bytes]] = cached_runs(store, runs, reading)
    else:
        got = iter_shard_records(store.storage, runs, chunk_bytes=reading.chunk_bytes, read_ahead=reading.read_ahead)
    arrived = zip(read.tolist(), got)
    waiting: dict[int, tuple[IndexEntry, bytes]] = {}
    for row in rows.tolist():
        while row not in waiting:
            nxt = next(arrived, None)
            if nxt is None:
                raise RecordError(f"stream of {store.root} ended before row {row}; run `featstore verify {store.root}`")
            waiting[nxt[0]] = nxt[1]
        yield waiting.pop(row)


def cached_runs(store: ShardStore, runs: Iterable[Run], reading: Reading) -> Iterator[tuple[IndexEntry, bytes]]:
    """The records of each run from the shard cache (each record's crc32 checked); a run the cache cannot
    serve, or whose cached copy is corrupt and cannot be downloaded again, is read from the bucket."""
    cache = reading.cache
    assert cache is not None
    for shard, entries in runs:
        done = 0
        for attempt in range(2):
            cached = cache.open(shard, store.storage)
            if cached is None:
                break
            bad = None
            try:
                for e in entries[done:]:
                    data = cached.read(e.offset, e.length)
                    if len(data) != e.length or zlib.crc32(data) & 0xFFFFFFFF != e.crc32:
                        bad = f"record {e.key!r} does not match its index entry's crc32"
                        break
                    done += 1
                    yield e, data
            finally:
                cached.close()
            if bad is None:
                break
            cache.discard(shard, bad)
        if done < len(entries):
            yield from iter_shard_records(store.storage, [(shard, entries[done:])], chunk_bytes=reading.chunk_bytes,
                                          read_ahead=reading.read_ahead)
