"""Streaming a shard store in training: :func:`stream` returns a :class:`FeatureStream`, a torch
``IterableDataset``, and :meth:`FeatureStream.loader` a :class:`StreamLoader` that counts what it hands out.

Splitting strategy: the index's live records are laid out shard by shard (in offset order), with the shard
order shuffled per (seed, epoch); that sequence is cut into ``world_size * num_workers`` contiguous, nearly
equal slices (sizes differ by at most one record) and each (rank, worker) reads its slice, which covers whole
shards and at most two partial ones (:mod:`featstore.read.plans`). A shuffle buffer permutes row numbers (not
decoded samples), so a resumed epoch skips what was delivered without reading it. Every record is read
exactly once per epoch on exactly one rank and worker; superseded records (a key rebuilt into a later shard)
are never yielded, because only index rows are read.

A store on object storage (``s3://bucket/prefix`` or any fsspec URL, see docs/object-storage.md) is read as
each consumer's runs of shards, sequentially in large chunks with read-ahead (:mod:`featstore.read.fetch`).
Workers read and decode into recycled slots of shared-memory arenas (:mod:`featstore.read.sharedpool`), so a
sample crosses to the main process by reference, without a copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from featstore.errors import StoreError
from featstore.formats.keys import encode_key
from featstore.formats.locate import StoreLocation, locate_store
from featstore.read.fetch import read_local, remote_records
from featstore.read.open import open_location
from featstore.read.plans import buffer_shuffle, epoch_plan, items_of, round_robin_taken, seed_int, shard_rows, slice_size
from featstore.read.samples import decode_to_sample
from featstore.read.sharedpool import worker_pool
from featstore.read.stores import ShardStore
from featstore.runtime.env import Consumer, consumer, dist_env
from featstore.storage import DEFAULT_CHUNK_BYTES, DEFAULT_READ_AHEAD, Storage

DEFAULT_SHUFFLE_BUFFER = 1000


def shard_store_at(location: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None
                   ) -> StoreLocation:
    """The shard store at ``location`` (a folder or URL); StoreError for per-image caches, which cannot stream."""
    loc = locate_store(location, storage_options)
    if loc.layout == "shards":
        return loc
    if loc.is_remote:
        raise StoreError(f"{loc.root} is not a shard store; stream() needs shards")
    raise StoreError(f"{location} is a per-image store; stream() needs shards. Convert it with "
                     f"`featstore export {loc.data_root or location} --format shards --out DIR`, or use "
                     f"open_store() with a map-style Dataset")


class FeatureStream(torch.utils.data.IterableDataset):
    """A DDP- and worker-aware stream over a shard store's live records (see :func:`stream`).

    The epoch plan is a few numpy arrays (index rows ordered by shard and offset, per-shard bounds, this
    consumer's intervals): no Python object per record. ``state_dict()`` / ``load_state_dict()`` resume an
    epoch where a job stopped, each record exactly once across ranks and workers.
    """

    def __init__(self, root: Path | Storage | StoreLocation, *, shuffle: bool, seed: int, epoch: int,
                 shuffle_buffer: int, resampled: bool, dequantize: bool = True, read_ahead: int = DEFAULT_READ_AHEAD):
        super().__init__()
        loc = root if isinstance(root, StoreLocation) else shard_store_at(root)
        self.root: Path | str = loc.root
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.shuffle_buffer, self.resampled, self.dequantize = shuffle_buffer, resampled, dequantize
        self.read_ahead = read_ahead
        self.chunk_bytes = DEFAULT_CHUNK_BYTES  # remote stores: bytes per ranged GET while streaming
        store = open_location(loc)
        assert isinstance(store, ShardStore)  # shard_store_at refuses anything else
        self.store = store
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
            stored = (read_local(self.store, ix.entry(int(row)), pool) for row in rows)
        else:
            runs = remote_records(self.store, rows, stored_order, self.chunk_bytes, self.read_ahead)
            stored = ((e, data, None) for e, data in runs)
        for e, data, slot in stored:
            sample = decode_to_sample(data, self.dequantize, pool, read_into=slot)
            sample["__key__"] = encode_key(e.key)
            yield sample

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
    return FeatureStream(shard_store_at(path, storage_options), shuffle=shuffle, seed=seed, epoch=epoch,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, dequantize=dequantize,
                         read_ahead=read_ahead)
