"""CPU accounting for the build benchmarks: per-thread and per-process CPU seconds around a run, and the
machine's busy time from ``/proc/stat`` (what other processes took from the same cores)."""

from __future__ import annotations

import os
import resource
import time
import zlib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable

import torch


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has been busy since boot (0 where /proc/stat is absent)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _usage(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@dataclass
class Span:
    """CPU and wall seconds of one measured run."""

    wall: float = 0.0
    main: float = 0.0  # the calling (main) thread
    process: float = 0.0  # every thread of this process
    children: float = 0.0  # child processes reaped during the run (DataLoader workers)
    machine: float = 0.0  # every process on the machine

    @property
    def others(self) -> float:
        """CPU seconds other processes took during the run."""
        return max(0.0, self.machine - self.process - self.children)


def measure(fn: Callable[[], Any]) -> tuple[Any, Span]:
    """Run ``fn`` and return its result and the :class:`Span` it took."""
    w0, m0, p0, c0, b0 = (time.perf_counter(), time.thread_time(), _usage(resource.RUSAGE_SELF),
                          _usage(resource.RUSAGE_CHILDREN), machine_busy_seconds())
    out = fn()
    return out, Span(time.perf_counter() - w0, time.thread_time() - m0, _usage(resource.RUSAGE_SELF) - p0,
                     _usage(resource.RUSAGE_CHILDREN) - c0, machine_busy_seconds() - b0)


def cores_used() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def encode_breakdown(t: torch.Tensor, level: int = 1, reps: int = 10) -> dict[str, float]:
    """ms of one core per pass of a zstd record of ``t`` (shuffle, crc32 of the tensor, zstd, the record join,
    the index's crc32 and the shard's sha256 of the stored bytes) and for the whole ``encode_record``."""
    from featstore.formats import codecs
    from featstore.formats.record import Record, encode_record

    raw = codecs.tensor_bytes(t)
    planes = codecs.shuffle_bytes(raw, t.element_size())
    frame = codecs.zstd_frame(planes, level)
    passes: dict[str, Callable[[], Any]] = {
        "shuffle": lambda: codecs.shuffle_bytes(raw, t.element_size()), "crc32_tensor": lambda: zlib.crc32(raw),
        "zstd": lambda: codecs.zstd_frame(planes, level), "join": lambda: b"".join([b"h" * 512, frame]),
        "crc32_record": lambda: zlib.crc32(frame), "sha256_shard": lambda: hashlib.sha256(frame).digest(),
        "encode_record": lambda: encode_record(Record("k", "k", {"features": t}), level)}
    out = {}
    for name, fn in passes.items():
        fn()
        c0 = time.thread_time()
        for _ in range(reps):
            fn()
        out[name] = (time.thread_time() - c0) / reps * 1e3
    out["stored_ratio"] = len(frame) / len(raw)
    return out
