"""Batches a stream makes itself (``stream(..., batch_size=N, bucket_by_shape=True)``): which records go together
(:func:`batch_plan`, from the index alone, before anything is read) and one batch decoded and stacked inside
the worker (:func:`decode_batch`), into one shared-memory slot when the worker has a pool, so the training
process receives it without a copy.

A batch is a dict whose ``key``, ``path`` and ``__key__`` are lists (and ``frames``, ``grid`` for sample
stores) and whose tensors are the records' tensors stacked along a new first dimension.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from featstore.errors import StoreError
from featstore.formats.keys import encode_key
from featstore.formats.record import decode_header, decode_record
from featstore.read.samples import record_to_sample
from featstore.read.sharedpool import SharedSample, Slot, SlotPool, aligned

Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class Batching:
    """How a stream groups records into the items it yields (``batch_size`` None: one record per item)."""

    batch_size: int | None = None
    bucket_by_shape: bool = False
    drop_last: bool = False

    def __post_init__(self) -> None:
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise StoreError(f"batch_size={self.batch_size!r}: expected a positive integer, or None for one record "
                             "at a time")
        if self.bucket_by_shape and self.batch_size is None:
            raise StoreError("bucket_by_shape=True needs batch_size=N (the records per batch)")

    def to_json(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "bucket_by_shape": self.bucket_by_shape, "drop_last": self.drop_last}

    @staticmethod
    def from_json(d: Mapping[str, Any] | None) -> "Batching":
        d = d or {}
        return Batching(d.get("batch_size"), bool(d.get("bucket_by_shape")), bool(d.get("drop_last")))


def batch_plan(rows: np.ndarray, specs: np.ndarray, batching: Batching) -> list[np.ndarray]:
    """The batches (arrays of index rows) a consumer yields for ``rows`` in that order; ``specs`` is each row's
    tensor-layout id (records of one id stack). Bucketed: a batch is emitted when a shape's bucket fills, and
    the partial buckets follow at the end in the order their first record came (unless ``drop_last``)."""
    n = batching.batch_size
    assert n is not None
    if not batching.bucket_by_shape:
        stop = len(rows) - len(rows) % n if batching.drop_last else len(rows)
        return [rows[i:min(i + n, stop)] for i in range(0, stop, n)]
    buckets: dict[int, list[int]] = {}
    out: list[np.ndarray] = []
    for row, spec in zip(rows.tolist(), specs.tolist()):
        bucket = buckets.setdefault(spec, [])
        bucket.append(row)
        if len(bucket) == n:
            out.append(np.asarray(bucket, dtype=rows.dtype))
            del buckets[spec]
    if not batching.drop_last:
        out.extend(np.asarray(b, dtype=rows.dtype) for b in buckets.values() if b)
    return out


class _Into:
    """The ``empty`` allocator a record of a batch decodes with: the outputs record 0 decoded into ``name`` go
    straight into row ``i`` of that name's batch tensor; anything else is allocated as usual."""

    def __init__(self, pattern: list[str | None], batch: dict[str, torch.Tensor], i: int):
        self.pattern, self.batch, self.i, self.k = pattern, batch, i, 0

    def __call__(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        name = self.pattern[self.k] if self.k < len(self.pattern) else None
        self.k += 1
        target = self.batch.get(name) if name is not None else None
        if target is not None and tuple(target.shape[1:]) == tuple(shape) and target.dtype == dtype:
            return target[self.i]
        return torch.empty(shape, dtype=dtype)


def _signature(data: bytes | memoryview) -> tuple[Any, ...]:
    _, specs, _ = decode_header(data)
    return tuple((s.name, s.dtype, s.shape, s.codec, s.filter) for s in specs)


def _first(data: bytes | memoryview, dequantize: bool) -> tuple[dict[str, torch.Tensor], list[str | None], Any]:
    """Record 0 of a batch decoded as usual, and which tensor each of its decoder's allocations became."""
    calls: list[torch.Tensor] = []

    def record_calls(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        calls.append(torch.empty(shape, dtype=dtype))
        return calls[-1]

    rec = decode_record(data, verify=False, dequantize=dequantize, empty=record_calls)
    owner = {t.data_ptr(): name for name, t in rec.tensors.items() if t.numel()}
    return rec.tensors, [owner.get(c.data_ptr()) for c in calls], rec


def decode_batch(datas: Sequence[bytes | memoryview], dequantize: bool, pool: SlotPool | None) -> dict[str, Any]:
    """Decode records of one tensor layout and stack them: one slot of ``pool`` holds every stacked tensor."""
    first, pattern, rec0 = _first(datas[0], dequantize)
    n = len(datas)
    nbytes = sum(aligned(n * t.numel() * t.element_size()) for t in first.values())
    slot = pool.slot(max(nbytes, 1)) if pool is not None else None
    alloc: Alloc = slot.empty if slot is not None else (lambda shape, dtype: torch.empty(shape, dtype=dtype))
    batch = {name: alloc((n, *t.shape), t.dtype) for name, t in first.items()}
    for name, t in first.items():
        batch[name][0].copy_(t)
    samples = [record_to_sample(rec0)]
    sig = _signature(datas[0])
    for i, data in enumerate(datas[1:], 1):
        into = _Into(pattern, batch, i) if _signature(data) == sig else _Into([], batch, i)
        rec = decode_record(data, verify=False, dequantize=dequantize, empty=into)
        if set(rec.tensors) != set(batch) or any(tuple(t.shape) != tuple(batch[k].shape[1:]) or t.dtype != batch[k].dtype
                                                 for k, t in rec.tensors.items()):
            raise StoreError(f"records {rec0.key!r} and {rec.key!r} have tensors of different shapes or dtypes and "
                             "cannot be stacked in one batch; pass bucket_by_shape=True")
        for name, t in rec.tensors.items():
            if t.data_ptr() != batch[name][i].data_ptr() or not t.numel():
                batch[name][i].copy_(t)
        samples.append(record_to_sample(rec))
    return _batch_sample(samples, batch, slot)


def _batch_sample(samples: list[dict[str, Any]], batch: dict[str, torch.Tensor], slot: Slot | None) -> dict[str, Any]:
    out = SharedSample()
    for name in samples[0]:
        out[name] = batch[name] if name in batch else (
            samples[0][name] if name == "quantized" else [s[name] for s in samples])
    out["__key__"] = [encode_key(k) for k in out["key"]]
    out.slot = slot  # crosses to the training process by reference (a plain dict without a slot)
    return out

