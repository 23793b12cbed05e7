"""Batches assembled off the main thread, into a ring of pre-allocated buffers (pinned when feeding a GPU).

:class:`BatchFeeder` runs on its own thread: it receives the decode workers' chunks, groups images by shape
and hands the main thread finished batches, so the main thread does nothing per image. A chunk that is a
whole batch (the loader's chunks are batch-sized) becomes the batch as it is, without a copy, when no
pinning is needed; otherwise the batch is stacked into a slot of the :class:`Ring`, which is reused only
after the device copy that read it has completed (a CUDA event recorded when the next batch is taken).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import torch

_STOP_POLL_S = 0.1


class Ring:
    """``slots`` reusable byte buffers (pinned with ``pin``), grown to the largest batch asked for."""

    def __init__(self, slots: int, pin: bool = False):
        self.pin = pin
        self.buffers: list[torch.Tensor | None] = [None] * max(1, slots)
        self.fences: list[Any] = [None] * max(1, slots)
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(max(1, slots)):
            self.free.put(i)
        self.allocations = 0  # buffers allocated (or grown): stays at most ``slots`` once shapes settle

    def acquire(self, nbytes: int, stop: threading.Event | None = None) -> tuple[int, torch.Tensor] | None:
        """A free slot's index and its first ``nbytes`` (uint8), once the copy that last read it is done;
        None when ``stop`` is set while waiting."""
        while True:
            try:
                i = self.free.get(timeout=_STOP_POLL_S)
                break
            except queue.Empty:
                if stop is not None and stop.is_set():
                    return None
        if self.fences[i] is not None:
            self.fences[i].synchronize()
            self.fences[i] = None
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes:
            buf = self.buffers[i] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
            self.allocations += 1
        return i, buf[:nbytes]

    def release(self, i: int, fence: Any = None) -> None:
        """Give slot ``i`` back; it is reused after ``fence.synchronize()`` (a CUDA event) returns."""
        self.fences[i] = fence
        self.free.put(i)


def contiguous_run(images: list[torch.Tensor]) -> torch.Tensor | None:
    """The images as one ``[N, ...]`` tensor without a copy, when they are consecutive rows of one stacked
    tensor (what a decode worker sends); else None."""
    first = images[0]
    base = first._base
    if base is None or base.dim() != first.dim() + 1 or tuple(base.shape[1:]) != tuple(first.shape):
        return None
    row = first.numel()
    start = (first.data_ptr() - base.data_ptr()) // max(1, first.element_size() * row)
    for j, im in enumerate(images):
        if im._base is not base or im.data_ptr() != first.data_ptr() + j * row * first.element_size():
            return None
    if start < 0 or start + len(images) > base.shape[0]:
        return None
    return base[start:start + len(images)]


class Batch:
    """Images of one shape, stacked (pinned when feeding a GPU), with their work items and source fingerprints."""

    __slots__ = ("items", "sources", "images", "slot")

    def __init__(self, items: list[Any], sources: list[dict[str, Any]], images: torch.Tensor, slot: int | None = None):
        self.items, self.sources, self.images, self.slot = items, sources, images, slot


def _each(decoded: Iterable[Any]) -> Iterator[Any]:
    """The decoded images one by one, whether they come singly or in chunks (anything iterable but a result)."""
    for d in decoded:
        if hasattr(d, "image"):
            yield d
        else:
            yield from d


class BatchFeeder:
    """Forms batches of ``batch_size`` same-shape images on a thread of its own; iterate it on the main thread.

    Failed images reach ``on_failure`` on the iterating thread, in order. ``fence`` (called on the iterating
    thread when it takes the next batch) returns what the previous batch's ring slot must wait for before
    reuse: a CUDA event after its host-to-device copy; None on CPU.
    """

    def __init__(self, decoded: Iterable[Any], batch_size: int, on_failure: Callable[[Any], None],
                 pin_memory: bool = False, slots: int = 4, fence: Callable[[], Any] | None = None):
        self.batch_size, self.on_failure, self.pin, self.fence = max(1, batch_size), on_failure, pin_memory, fence
        self.ring = Ring(slots, pin_memory)
        self.out: queue.Queue = queue.Queue(maxsize=max(1, slots - 1))
        self.stop = threading.Event()
        self.copied = self.zero_copy = 0  # batches stacked into the ring / handed on as the worker sent them
        self.thread = threading.Thread(target=self._run, args=(decoded,), name="featstore-batches", daemon=True)
        self.thread.start()

    def _put(self, kind: str, value: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put((kind, value), timeout=_STOP_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _emit(self, group: list[Any]) -> Batch | None:
        images = [d.image for d in group]
        run = contiguous_run(images)
        if run is not None and not self.pin:
            self.zero_copy += 1
            return Batch([d.item for d in group], [d.source for d in group], run)
        got = self.ring.acquire(len(images) * images[0].nbytes, self.stop)
        if got is None:
            return None
        slot, buf = got
        out = buf.view(images[0].dtype).view(len(images), *images[0].shape)
        out.copy_(run) if run is not None else torch.stack(images, out=out)
        self.copied += 1
        return Batch([d.item for d in group], [d.source for d in group], out, slot)

    def _run(self, decoded: Iterable[Any]) -> None:
        buckets: dict[tuple, list[Any]] = {}
        try:
            for d in _each(decoded):
                if d.image is None:
                    if not self._put("failed", d):
                        return
                    continue
                key = (tuple(d.image.shape), d.image.dtype)
                group = buckets.setdefault(key, [])
                group.append(d)
                if len(group) >= self.batch_size:
                    del buckets[key]
                    if self.stop.is_set() or not self._put("batch", self._emit(group)):
                        return
            for group in buckets.values():
                if self.stop.is_set() or not self._put("batch", self._emit(group)):
                    return
            self._put("end", None)
        except BaseException as e:  # noqa: BLE001 - re-raised on the iterating thread
            self._put("error", e)

    def __iter__(self) -> Iterator[Batch]:
        held: Batch | None = None
        try:
            while True:
                if held is not None and held.slot is not None:  # the caller is done with it: asks for the next
                    self.ring.release(held.slot, self.fence() if self.fence is not None else None)
                held = None
                kind, value = self.out.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise value
                if kind == "failed":
                    self.on_failure(value)
                    continue
                held = value
                yield value
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (it ends at its next queue or ring wait) and wait for it."""
        self.stop.set()
        self.thread.join()
