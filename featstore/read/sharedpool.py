"""Recycled shared memory for the samples DataLoader workers decode (Linux: needs ``os.memfd_create``).

torch hands a tensor from a worker to the main process by passing a file descriptor of its shared-memory
storage: for every sample a new shared-memory segment, fresh pages to fault in while decoding, and a
descriptor sent over a socket (with an authentication handshake) that the main process then maps. Here a
worker decodes each record into a slot of a shared arena (a ``memfd`` of equal-sized slots) that it reuses,
and the sample crosses as (arena, slot, tensor layouts): the arena's descriptor is sent only when a worker's
samples move to another arena, so most samples cost no descriptor, no new segment and no fresh pages.

Reuse is safe by counting: the process that receives a sample counts it as released in its arena's header
(one counter per slot) once the memory its tensors share is freed there (a finalizer on that memory); the
worker reuses a slot only when that count equals the samples it sent from the slot and none of its own
references to the slot are alive. A sample kept for long pins only its own slot. Descriptors are safe by
order: a worker's samples are unpickled in the order it pickled them, a sample carries the descriptor
whenever its arena differs from the previous sample's, and the receiver keeps the arena of each worker's
latest sample mapped, so a sample without a descriptor always finds its arena mapped. (A receiver drops
that map once the worker has exited and another worker's arena arrives.)

The receiver gets plain dicts of plain tensors. Only :class:`SharedSample` dicts made by
:func:`featstore.read.stream.stream` in a worker take this path; their tensors are views of the slot, which
another pickler would copy (as it copies any non-shared tensor).
"""

from __future__ import annotations

import math
import mmap
import os
import secrets
import threading
import weakref
from multiprocessing import reduction, util
from typing import Any

import numpy as np
import torch

from featstore.runtime.env import in_dataloader_worker
from featstore.errors import RecordError

AVAILABLE = hasattr(os, "memfd_create")
ARENA_BYTES = 32 << 20  # slots per arena: this much memory, 2 to 64 of them
MAX_SLOTS = 64
ALIGN = 64
CLOSED = 0  # header[0]: the worker closed its pool; header[1 + i]: samples released from slot i


def aligned(n: int) -> int:
    """``n`` rounded up to :data:`ALIGN`."""
    return n + (-n % ALIGN)


def slot_class(nbytes: int) -> int:
    """The slot size that holds ``nbytes``: rounded up to 1/8 of its power of two (at most 12.5% unused), so
    records of one store share a size and slots are reused across records of slightly different sizes."""
    step = max(ALIGN, 1 << max(0, nbytes.bit_length() - 4))
    return -(-max(1, nbytes) // step) * step


class Arena:
    """One shared-memory segment of a worker's pool: ``count`` slots of ``slot_size`` bytes after a header of
    int64 counters (see :data:`CLOSED`)."""

    def __init__(self, serial: int, slot_size: int):
        self.serial, self.slot_size = serial, slot_size
        self.count = max(2, min(MAX_SLOTS, ARENA_BYTES // slot_size))
        self.base = aligned(8 * (1 + self.count))
        self.size = self.base + self.count * slot_size
        self.fd = os.memfd_create(f"featstore-arena-{serial}", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.bytes = np.frombuffer(mmap.mmap(self.fd, self.size), dtype=np.uint8)
        self.header = self.bytes[:self.base].view(np.int64)
        self.sent = [0] * self.count  # samples pickled from each slot (ever)
        self.live = [0] * self.count  # references to each slot's memory alive in this process

    def free_slot(self) -> int | None:
        """The first slot nothing uses, here or in a receiver, or None. Lowest first: a worker keeps reusing the
        few slots its samples in flight need, so the rest of the arena is never touched (no pages, no memory)."""
        for i in range(self.count):
            if self.live[i] == 0 and int(self.header[1 + i]) == self.sent[i]:
                return i
        return None


class Slot:
    """The bytes one record's decoded tensors are carved from, in order and aligned (see :meth:`empty`)."""

    def __init__(self, pool: SlotPool, arena: Arena, index: int, nbytes: int):
        self.pool, self.arena, self.index, self.nbytes = pool, arena, index, nbytes
        self.offset = arena.base + index * arena.slot_size
        memory = arena.bytes[self.offset:self.offset + nbytes]
        weakref.finalize(memory, pool.slot_dead, arena, index).atexit = False  # when no tensor of it lives here
        self.tensor = torch.from_numpy(memory)
        self.address = self.tensor.data_ptr()
        self.used = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The next uninitialised tensor of the slot (what decoders allocate their outputs with)."""
        nbytes = math.prod(shape) * dtype.itemsize
        start, self.used = self.used, self.used + aligned(nbytes)
        if self.used > self.nbytes:
            raise RecordError(f"decoded tensors need more than the {self.nbytes} bytes reserved for them")
        return self.tensor[start:start + nbytes].view(dtype).view(shape)

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is a view of this slot's memory (not, say, of shared memory torch moved its storage to
        when something else pickled it)."""
        return t.device.type == "cpu" and t.untyped_storage().data_ptr() == self.address


class SlotPool:
    """A worker process's arenas (see the module docs)."""

    def __init__(self) -> None:
        self.id = secrets.randbits(62)
        self.pid = os.getpid()
        self.arenas: list[Arena] = []
        self.current: Arena | None = None
        self.last_sent: Arena | None = None
        self.lock = threading.RLock()  # re-entrant: a slot's finalizer may run while this thread holds it

    def slot(self, nbytes: int) -> Slot:
        """A free slot for ``nbytes``: in the current arena if it has one (no descriptor to pass), else in
        another arena of the same slot size, else in a new arena."""
        size = slot_class(nbytes)
        with self.lock:
            a, i = self.current, None
            if a is not None and a.slot_size == size:
                i = a.free_slot()
            if i is None:
                a, i = self._other_arena(size)
                self.current = a
            a.live[i] += 1
        return Slot(self, a, i, nbytes)

    def _other_arena(self, size: int) -> tuple[Arena, int]:
        for a in self.arenas:
            if a.slot_size == size and a is not self.current:
                i = a.free_slot()
                if i is not None:
                    return a, i
        a = Arena(len(self.arenas), size)
        self.arenas.append(a)
        return a, 0

    def slot_dead(self, arena: Arena, index: int) -> None:
        with self.lock:
            arena.live[index] -= 1

    def handle(self, slot: Slot) -> tuple[Any, ...]:
        """What a pickled sample carries to find its slot: the arena's descriptor only when the previous sample
        sent from this pool was from another arena. Counts the sample as sent."""
        a = slot.arena
        with self.lock:
            a.sent[slot.index] += 1
            dup = reduction.DupFd(a.fd) if self.last_sent is not a else None
            self.last_sent = a
        return self.id, a.serial, a.size, self.pid, a.fd, dup

    def close(self) -> None:
        """Mark every arena closed (so receivers drop their maps of them) and close their descriptors."""
        with self.lock:
            for a in self.arenas:
                a.header[CLOSED] = 1
                os.close(a.fd)
            self.arenas, self.current, self.last_sent = [], None, None


_pool: SlotPool | None = None


def worker_pool() -> SlotPool | None:
    """This DataLoader worker's pool; None outside DataLoader workers and where ``memfd_create`` is missing."""
    global _pool
    if not AVAILABLE or not in_dataloader_worker():
        return None
    if _pool is None or _pool.pid != os.getpid():
        _pool = SlotPool()
        util.Finalize(_pool, _pool.close, exitpriority=0)  # at the worker's exit
    return _pool


class SharedSample(dict):
    """A worker's sample whose decoded tensors are views of ``slot``; it pickles to the receiver by reference."""

    slot: Slot | None = None


def _reduce_sample(sample: SharedSample) -> tuple[Any, ...]:
    slot = sample.slot
    entries: list[tuple[str, Any, Any]] = []
    for key, value in sample.items():
        if slot is not None and isinstance(value, torch.Tensor) and slot.holds(value):
            entries.append((key, (value.storage_offset(), value.dtype, tuple(value.shape), value.stride()), None))
        else:
            entries.append((key, None, value))
    if slot is None or all(layout is None for _, layout, _ in entries):
        return dict, ({k: v for k, _, v in entries},)
    return _rebuild_sample, (slot.pool.handle(slot), slot.index, slot.offset, slot.nbytes, entries)


class _Mapped:
    """An arena mapped in a receiving process."""

    def __init__(self, fd: int, size: int):
        try:
            self.bytes = np.frombuffer(mmap.mmap(fd, size), dtype=np.uint8)
        finally:
            os.close(fd)
        self.pid = os.getpid()

    def counter(self, index: int) -> np.ndarray:
        """The int64 header word ``index`` (see :data:`CLOSED`)."""
        return self.bytes[8 * index:8 * index + 8].view(np.int64)

    def release(self, slot: int) -> None:
        if os.getpid() == self.pid:  # a forked child's copy of a sample is not the sample the worker sent
            with _lock:
                self.counter(1 + slot)[0] += 1


_lock = threading.RLock()
_mapped: weakref.WeakValueDictionary[tuple[int, int], _Mapped] = weakref.WeakValueDictionary()
_latest: dict[int, _Mapped] = {}  # per pool: the arena of its latest sample, kept mapped (see the module docs)


def _arena(handle: tuple[Any, ...]) -> _Mapped:
    pool_id, serial, size, pid, fdnum, dup = handle
    with _lock:
        m = _mapped.get((pool_id, serial))
        if dup is not None:
            fd = dup.detach()
            if m is None:
                m = _Mapped(fd, size)
            else:
                os.close(fd)
        elif m is None:
            m = _Mapped(_open_worker_fd(pid, fdnum), size)
        _mapped[(pool_id, serial)] = m
        if _latest.get(pool_id) is not m:
            _latest[pool_id] = m
            for other in [p for p, a in _latest.items() if a.counter(CLOSED)[0]]:
                del _latest[other]
    return m


def _open_worker_fd(pid: int, fdnum: int) -> int:
    """The worker's arena descriptor, opened through /proc: only needed if samples arrive out of order."""
    try:
        return os.open(f"/proc/{pid}/fd/{fdnum}", os.O_RDWR)
    except OSError as e:
        raise RecordError(f"a sample from DataLoader worker {pid} refers to shared memory this process never "
                          f"received and cannot open ({e}); deliver a stream's samples in the order its workers "
                          f"send them") from None


def _rebuild_sample(handle: tuple[Any, ...], index: int, offset: int, nbytes: int,
                    entries: list[tuple[str, Any, Any]]) -> dict[str, Any]:
    m = _arena(handle)
    memory = m.bytes[offset:offset + nbytes]
    weakref.finalize(memory, m.release, index).atexit = False  # when the last tensor of this sample is freed here
    storage = torch.from_numpy(memory).untyped_storage()
    sample: dict[str, Any] = {}
    for key, layout, value in entries:
        if layout is None:
            sample[key] = value
        else:
            start, dtype, shape, stride = layout
            sample[key] = torch.empty(0, dtype=dtype).set_(storage, start, shape, stride)
    return sample


reduction.ForkingPickler.register(SharedSample, _reduce_sample)
