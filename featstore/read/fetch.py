"""How a stream gets its records' bytes: from local disk one record at a time (an uncompressed one straight
into a worker's shared-memory slot), or from object storage as whole runs of shards read sequentially in large
chunks with read-ahead."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from featstore.errors import RecordError
from featstore.formats.index import IndexEntry
from featstore.formats.shards import iter_shard_records
from featstore.read.sharedpool import Slot, SlotPool
from featstore.read.stores import ShardStore, decoded_bytes


def read_local(store: ShardStore, e: IndexEntry, pool: SlotPool | None) -> tuple[IndexEntry, memoryview, Slot | None]:
    """A record's bytes from local disk: an uncompressed one straight into a pool slot (in a worker)."""
    if pool is None or e.length < decoded_bytes(e):
        return e, store.read_bytes(e, for_decoding=True), None
    slot = pool.slot(e.length)
    return e, store.read_bytes(e, buffer=memoryview(slot.tensor.numpy())), slot


def remote_records(store: ShardStore, rows: np.ndarray, stored_order: np.ndarray, chunk_bytes: int,
                   read_ahead: int) -> Iterator[tuple[IndexEntry, bytes]]:
    """``(entry, bytes)`` of ``rows`` in that order, read from a remote store in ``stored_order`` (whole runs
    of shards, chunked, with read-ahead); records read ahead of their turn wait in memory."""
    ix = store.index
    read = stored_order[np.isin(stored_order, rows)]
    shard_of = np.asarray(ix.cols["shard"])[read] if len(read) else np.empty(0, np.int64)
    cuts = [0, *(np.flatnonzero(np.diff(shard_of)) + 1).tolist(), len(read)]
    runs = ((ix.shards[int(shard_of[a])], [ix.entry(int(r)) for r in read[a:b]]) for a, b in zip(cuts, cuts[1:])
            if b > a)
    arrived = zip(read.tolist(), iter_shard_records(store.storage, runs, chunk_bytes=chunk_bytes,
                                                    read_ahead=read_ahead))
    waiting: dict[int, tuple[IndexEntry, bytes]] = {}
    for row in rows.tolist():
        while row not in waiting:
            got = next(arrived, None)
            if got is None:
                raise RecordError(f"stream of {store.root} ended before row {row}; run `featstore verify {store.root}`")
            waiting[got[0]] = got[1]
        yield waiting.pop(row)
