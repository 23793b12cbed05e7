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


class GilProbe:
    """A thread that asks for the GIL every millisecond and records how late it gets it: long stretches of
    another thread holding the GIL (or the OS not scheduling the process) show up as large delays."""

    def __init__(self, period_s: float = 1e-3):
        import threading

        self.period, self.delays = period_s, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-probe", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.period)
            self.delays.append(time.perf_counter() - t0 - self.period)

    def __enter__(self) -> "GilProbe":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def summary_ms(self) -> dict[str, float]:
        """Median, 99th percentile and largest delay in ms."""
        d = sorted(self.delays) or [0.0]
        return {"p50": d[len(d) // 2] * 1e3, "p99": d[min(len(d) - 1, int(len(d) * 0.99))] * 1e3, "max": d[-1] * 1e3}


_PROBE_CODE = """
import json, sys, threading, time
stop, delays = threading.Event(), []
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set():
    t0 = time.perf_counter(); time.sleep(1e-3); delays.append(time.perf_counter() - t0 - 1e-3)
d = sorted(delays) or [0.0]
print(json.dumps({"p50": d[len(d) // 2] * 1e3, "p99": d[min(len(d) - 1, int(len(d) * 0.99))] * 1e3, "max": d[-1] * 1e3}))
"""


class ProcessProbe:
    """The same probe in a process of its own, at the same time: the delays the OS alone causes (no GIL shared)."""

    def __enter__(self) -> "ProcessProbe":
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _PROBE_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *_: Any) -> None:
        import json

        out, _ = self.proc.communicate("stop\n", timeout=60)
        self.result = json.loads(out)

    def summary_ms(self) -> dict[str, float]:
        """Median, 99th percentile and largest delay in ms."""
        return self.result
