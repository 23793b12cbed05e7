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
from featstore.read.batches import Batching, batch_plan, decode_batch
from featstore.read.cache import ShardCache, cache_from
from featstore.read.fetch import Reading, stored_records
from featstore.read.open import open_location
from featstore.read.plans import EpochPlan, slice_size
from featstore.read.resume import STATE_VERSION, check_resumable, resumed_orders
from featstore.read.samples import decode_to_sample
from featstore.read.sharedpool import worker_pool
from featstore.read.stores import ShardStore
from featstore.runtime.env import consumer, dist_env
from featstore.storage import DEFAULT_READ_AHEAD, Storage

DEFAULT_SHUFFLE_BUFFER = 1000


def shard_store_at(location: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None
                   ) -> StoreLocation:
    """The shard store at ``location`` (a folder or URL); StoreError for per-image caches, which cannot stream."""
    loc = locate_store(location, storage_options)
    if loc.layout == "shards":
        return loc
    raise StoreError(f"{location} is a per-image store; stream() needs shards. Convert it with "
                     f"`featstore export {loc.data_root or location} --format shards --out DIR`, or use "
                     f"open_store() with a map-style Dataset")


class FeatureStream(torch.utils.data.IterableDataset):
    """A DDP- and worker-aware stream over a shard store's live records (see :func:`stream`).

    The epoch plan is a few numpy arrays (:class:`~featstore.read.plans.EpochPlan`): no Python object per
    record. ``state_dict()`` / ``load_state_dict()`` resume an epoch where a job stopped, at any world size and
    worker count (:mod:`featstore.read.resume`), each record not yet consumed exactly once.
    """

    def __init__(self, root: Path | Storage | StoreLocation, *, shuffle: bool, seed: int, epoch: int,
                 shuffle_buffer: int, resampled: bool, dequantize: bool = True, read_ahead: int = DEFAULT_READ_AHEAD,
                 batching: Batching = Batching(), cache: ShardCache | None = None):
        super().__init__()
        loc = root if isinstance(root, StoreLocation) else shard_store_at(root)
        self.root: Path | str = loc.root
        self.shuffle, self.seed, self.epoch = shuffle, seed, epoch
        self.shuffle_buffer, self.resampled, self.dequantize = shuffle_buffer, resampled, dequantize
        self.batching = batching
        store = open_location(loc)
        assert isinstance(store, ShardStore)  # shard_store_at refuses anything else
        self.store = store
        self.reading = Reading(read_ahead=read_ahead, cache=cache)
        self.num_records = len(self.store.index)
        if self.num_records == 0:
            raise StoreError(f"shard store {self.root} holds no records; nothing to stream")
        self.plan = EpochPlan(store, seed, shuffle, shuffle_buffer)
        self._chain: list[dict[str, Any]] = []  # the saved states this epoch resumes through (oldest first)
        self._pending = False  # a loaded state waits for the next iteration to begin
        self._loader: tuple[int, int | None, bool] | None = None  # (num_workers, batch_size, drop_last) of .loader()
        self._consumed = 0

    @property
    def chunk_bytes(self) -> int:
        """Remote stores: bytes per ranged GET while streaming."""
        return self.reading.chunk_bytes

    @chunk_bytes.setter
    def chunk_bytes(self, value: int) -> None:
        self.reading.chunk_bytes = value

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes the order; call before creating the DataLoader iterator)."""
        if epoch != self.epoch:
            self._consumed = 0
            if self._chain and self._chain[-1]["epoch"] != epoch:
                self._chain, self._pending = [], False
        self.epoch = epoch

    def __len__(self) -> int:
        """Records this rank yields per epoch (all its DataLoader workers together)."""
        d = dist_env()
        return slice_size(self.num_records, d.rank, d.world_size)

    def epoch_rows(self, epoch: int, me: int, consumers: int) -> np.ndarray:
        """Index rows consumer ``me`` reads in ``epoch``, in the order it reads them (before any resume)."""
        return self.plan.orders(epoch, me, consumers)[1]

    def begin(self) -> None:
        """Start counting an iteration: a loaded state's epoch continues once, anything else starts afresh."""
        if not self._pending:
            self._chain = []
        self._pending, self._consumed = False, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me = consumer()
        in_process = not me.in_worker and self._loader is None
        if in_process:
            self.begin()
        chain = self._chain if self._chain and self._chain[-1]["epoch"] == self.epoch else []
        return self._epochs(self.epoch, me.index, me.count, chain, in_process)

    def _epochs(self, epoch: int, me: int, consumers: int, chain: list[dict[str, Any]], count: bool
                ) -> Iterator[dict[str, Any]]:
        while True:
            stored_order, rows = self._orders(epoch, me, consumers, chain)
            for item in self._items(rows, stored_order):
                if count:
                    self._consumed += 1
                yield item
            if not self.resampled:
                return
            epoch, chain = epoch + 1, []

    def _orders(self, epoch: int, me: int, consumers: int, chain: list[dict[str, Any]]
                ) -> tuple[np.ndarray, np.ndarray]:
        if not chain:
            return self.plan.orders(epoch, me, consumers)
        orders = resumed_orders(lambda m: [self.plan.orders(epoch, c, m)[1] for c in range(m)], chain, consumers,
                                self.plan.specs())
        return self.plan.in_shard_order(orders[me]), orders[me]

    def _items(self, rows: np.ndarray, stored_order: np.ndarray) -> Iterator[dict[str, Any]]:
        pool = worker_pool()
        if self.batching.batch_size is None:
            for e, data, slot in stored_records(self.store, rows, stored_order, pool, self.reading):
                sample = decode_to_sample(data, self.dequantize, pool, read_into=slot)
                sample["__key__"] = encode_key(e.key)
                yield sample
            return
        batches = batch_plan(rows, self.plan.specs()[rows], self.batching)
        seq = np.concatenate(batches) if batches else rows[:0]
        records = stored_records(self.store, seq, stored_order, None, self.reading)
        for b in batches:
            yield decode_batch([next(records)[1] for _ in range(len(b))], self.dequantize, pool)

    def loader(self, **kwargs: Any) -> "StreamLoader":
        """A torch DataLoader over this stream that counts what it hands out, so :meth:`state_dict` can resume.

        Takes DataLoader arguments (``batch_size`` defaults to None: one item at a time).
        """
        kwargs.setdefault("batch_size", None)
        if self.batching.batch_size is not None and kwargs["batch_size"] is not None:
            raise StoreError("this stream makes its own batches (stream(batch_size=...)); create its loader with "
                             "batch_size=None")
        return StreamLoader(self, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the epoch: what a restarted job (at any world size and worker count) passes to
        :meth:`load_state_dict`. Counts what :meth:`loader` handed out (or items iterated in this process
        without a DataLoader); in DDP every rank consumes the same number of batches, so rank 0's state
        restores every rank."""
        if self.resampled:
            raise StoreError("state_dict() needs resampled=False (an epoch to resume within)")
        workers, batch, drop_last = self._loader or (0, None, False)
        chain = self._chain if self._chain and self._chain[-1]["epoch"] == self.epoch else []
        return {"version": STATE_VERSION, "epoch": self.epoch, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_buffer": self.shuffle_buffer, "records": self.num_records,
                "world_size": dist_env().world_size, "num_workers": workers, "batch_size": batch,
                "drop_last": drop_last, "batching": self.batching.to_json(), "consumed": self._consumed,
                "resumed": [dict(s) for s in chain]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the saved epoch with the records not yet delivered (same store, seed and shuffle settings;
        any world size, workers and batching)."""
        chain = check_resumable(state, {"seed": self.seed, "shuffle": self.shuffle,
                                        "shuffle_buffer": self.shuffle_buffer, "records": self.num_records})
        self.epoch = int(state["epoch"])
        self._chain, self._pending, self._consumed = chain, True, 0


class StreamLoader(torch.utils.data.DataLoader):
    """A DataLoader over a :class:`FeatureStream` that counts the items it hands out (for ``state_dict``)."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        ds: FeatureStream = self.dataset  # type: ignore[assignment]
        if getattr(self, "in_order", True) is False:
            raise StoreError("resumable streams need DataLoader(in_order=True), the default")
        ds._loader = (self.num_workers, self.batch_size, self.drop_last)
        ds.begin()
        return self._count(super().__iter__(), ds)  # workers copy the dataset (and its resume chain) here

    @staticmethod
    def _count(it: Iterator[Any], ds: FeatureStream) -> Iterator[Any]:
        for item in it:
            ds._consumed += 1
            yield item


def stream(path: str | os.PathLike[str], shuffle: bool = True, seed: int = 0, epoch: int = 0,
           shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, resampled: bool = False,
           dequantize: bool = True, storage_options: dict[str, Any] | None = None,
           read_ahead: int = DEFAULT_READ_AHEAD, *, batch_size: int | None = None, bucket_by_shape: bool = False,
           drop_last: bool = False, cache_dir: str | os.PathLike[str] | None = None,
           cache_limit: int | str | None = None) -> FeatureStream:
    """A torch IterableDataset over a shard store: each record once per epoch across all ranks and workers.

    Order is deterministic for (seed, epoch, world size, workers); ``resampled=True`` repeats forever with
    the epoch advancing each pass. Samples are dicts with ``key``, ``path``, ``features`` and other tensors;
    with ``dequantize=False`` int8-coded tensors stay int8 beside their scales (see :func:`dequantize`).
    ``batch_size=N``: items are batches of N records stacked in the worker (``key`` a list), with
    ``bucket_by_shape=True`` each of records of one shape (a partial batch per shape at the epoch's end unless
    ``drop_last``). ``path`` may be an fsspec URL (``s3://bucket/prefix``, options in ``storage_options``):
    whole runs of shards are then read in large chunks, ``read_ahead`` of them fetched in the background, and
    with ``cache_dir`` (or ``$FEATSTORE_CACHE_DIR``) whole shards are kept on local disk, at most
    ``cache_limit`` bytes (``"200GB"``), shared by every process of the node.
    """
    loc = shard_store_at(path, storage_options)
    cache = cache_from(loc, cache_dir, cache_limit)
    return FeatureStream(loc, shuffle=shuffle, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, dequantize=dequantize, read_ahead=read_ahead,
                         batching=Batching(batch_size, bucket_by_shape, drop_last), cache=cache)
