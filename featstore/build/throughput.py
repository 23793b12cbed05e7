"""Recording a build's throughput series while it runs (the file is :mod:`featstore.formats.buildstats`).

A sampler thread reads the build's cumulative counters every ``interval_s`` (doubling as the series is
thinned), appends a point, and rewrites this process's file every :data:`FLUSH_S` seconds and once at the end,
so an interrupted build still leaves most of its series.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, Sequence

from featstore.formats.buildstats import BuildStatsRun, read_process_runs, write_process_runs
from featstore.storage import Storage

log = logging.getLogger("featstore")
FIRST_INTERVAL_S = 0.25
FLUSH_S = 30.0

#: What the sampler calls: (records written, decode wait s, model s, write s), all cumulative.
Counters = Callable[[], Sequence[float]]


class ThroughputRecorder:
    """Samples ``counters`` on a thread into one :class:`BuildStatsRun` of process ``gid`` and writes it."""

    def __init__(self, storage: Storage, layout: str, gid: int, counters: Counters,
                 interval_s: float = FIRST_INTERVAL_S, flush_s: float = FLUSH_S):
        self.storage, self.layout, self.gid, self.counters, self.flush_s = storage, layout, gid, counters, flush_s
        self.earlier = read_process_runs(storage, layout, gid)
        self.run = BuildStatsRun(gid, time.time(), interval_s)
        self._t0 = time.perf_counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="featstore-throughput", daemon=True)

    def sample(self) -> None:
        """Append the counters' current values as a point."""
        with self._lock:
            self.run.add([time.perf_counter() - self._t0, *self.counters()])

    def flush(self) -> None:
        """Rewrite this process's file: the earlier runs and this one so far."""
        with self._lock:
            runs = [*self.earlier, self.run]
            write_process_runs(self.storage, self.layout, self.gid, runs)

    def _loop(self) -> None:
        last_flush = time.perf_counter()
        while not self._stop.wait(self.run.interval_s):
            self.sample()
            if time.perf_counter() - last_flush >= self.flush_s:
                self._flush_quietly()
                last_flush = time.perf_counter()

    def _flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - the series is a diagnostic: never fail a build for it
            log.warning("could not write the build's throughput series (%s); the build goes on", e)

    def start(self) -> None:
        """Take the first point and start sampling."""
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, take the last point and write the file."""
        self._stop.set()
        self._thread.join()
        self.sample()
        self._flush_quietly()


@contextlib.contextmanager
def recording(storage: Storage, layout: str, gid: int, counters: Counters) -> Iterator[ThroughputRecorder]:
    """Record the throughput series of the block (a build's data loop) into ``storage``."""
    rec = ThroughputRecorder(storage, layout, gid, counters)
    rec.start()
    try:
        yield rec
    finally:
        rec.stop()
