"""The epoch plan of a stream, as numpy arrays (no Python object per record): index rows in shard order, each
consumer's contiguous slice of a shuffled shard order, the shuffle buffer's permutation, and what a DataLoader
had handed out (for resume)."""

from __future__ import annotations

import os
import random
from typing import Protocol

import numpy as np

from featstore.formats.index import Index


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


def seed_int(seed: int) -> int:
    """A non-negative seed for numpy's generator."""
    return seed % (1 << 63)


class Indexed(Protocol):
    """What a plan is made from: a store's index."""

    @property
    def index(self) -> Index: ...


class EpochPlan:
    """The rows each consumer of a store reads in an epoch (see the module docs), built lazily in each process
    from the store's index; a resumed epoch's plan comes from its chain of saved states
    (:func:`featstore.read.resume.resumed_orders`)."""

    def __init__(self, store: Indexed, seed: int, shuffle: bool, shuffle_buffer: int):
        self._store, self.seed, self.shuffle, self.shuffle_buffer = store, seed, shuffle, shuffle_buffer
        self._built: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, object]:
        return dict(self.__dict__, _built=None)  # each worker builds its own (cheap); pickles stay small

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows in shard order, per-shard bounds, and each row's position in that order."""
        if self._built is None or self._built[0] != os.getpid():
            rows, bounds = shard_rows(self._store.index)
            pos = np.empty(len(rows), dtype=np.int64)
            pos[rows] = np.arange(len(rows))
            self._built = (os.getpid(), rows, bounds, pos)
        return self._built[1], self._built[2], self._built[3]

    def specs(self) -> np.ndarray:
        """Each index row's tensor-layout id (records of one id have tensors of the same shapes and dtypes)."""
        return np.asarray(self._store.index.cols["spec"])

    def orders(self, epoch: int, me: int, consumers: int) -> tuple[np.ndarray, np.ndarray]:
        """Consumer ``me``'s rows in shard order (as stored) and in the order it yields them (shuffle buffer)."""
        rows, bounds, _ = self._rows()
        plan = epoch_plan(np.diff(bounds), me, consumers, self.seed, epoch, self.shuffle)
        seq = np.concatenate([rows[bounds[s] + a:bounds[s] + b] for s, a, b in plan]) if len(plan) else rows[:0]
        if self.shuffle and self.shuffle_buffer > 1:
            return seq, buffer_shuffle(seq, self.shuffle_buffer, np.random.default_rng([seed_int(self.seed), epoch, me]))
        return seq, seq

    def in_shard_order(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` sorted as they are stored (shard, then offset)."""
        return rows[np.argsort(self._rows()[2][rows], kind="stable")]
