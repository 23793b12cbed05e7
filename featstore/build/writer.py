"""The build's writing stage: sinks that encode records (a thread pool: zstd, crc32 and sha256 release the
GIL) and write them, and the writer thread that runs a sink behind a bounded queue, so device-to-host
copies, compression and writing overlap the next batch with a bounded number of batches in flight.

Each sink counts wall seconds and CPU seconds (``*_cpu``, from per-thread CPU clocks) in ``seconds``; the
build adds them to its stage counters as ``writer_<name>``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from featstore.formats.keys import CacheLayout
from featstore.formats.perimage import encode_pt
from featstore.formats.record import Record, encode_record
from featstore.formats.shards import ShardEntry, ShardWriter, entry_from_record_bytes
from featstore.runtime.faults import crash_point
from featstore.runtime.fsutil import atomic_write_bytes


class ShardSink:
    """Encodes records with a thread pool and appends them, in order, to this rank's shards."""

    def __init__(self, writer: ShardWriter, threads: int, zstd_level: int, codec: str = "zstd"):
        self.writer, self.level, self.codec = writer, zstd_level, codec
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="featstore-encode")
        self.bytes_written = 0
        # "append": waiting for encodes + tar append + rollover fsync; "*_cpu": CPU seconds of those threads
        self.seconds: Counter = Counter()
        self._lock = threading.Lock()

    def _encode(self, rec: Record) -> tuple[bytes, ShardEntry]:
        """The record's bytes and index entry (its crc32 pass made here, in parallel, not on the writer thread)."""
        t0 = time.thread_time()
        data = encode_record(rec, self.level, self.codec)
        entry = entry_from_record_bytes(rec.key, 0, data)
        with self._lock:
            self.seconds["encode_cpu"] += time.thread_time() - t0
        return data, entry

    def write(self, records: list[Record]) -> None:
        """Encode and append a batch of records."""
        t0, c0 = time.perf_counter(), time.thread_time()
        encoded = self.pool.map(self._encode, records)
        for rec, (data, entry) in zip(records, encoded):
            self.writer.write(rec.key, data, entry)
            self.bytes_written += len(data)
        self.seconds["append"] += time.perf_counter() - t0
        self.seconds["append_cpu"] += time.thread_time() - c0

    def close(self) -> None:
        """Close the open shard (making it visible) and stop the pool."""
        self.writer.close_shard()
        self.pool.shutdown()

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: Any) -> None:
        """Leaving on an error drops the open shard (:class:`ShardWriter`'s exit) and stops the pool."""
        self.writer.__exit__(exc_type, *rest)
        self.pool.shutdown()


class PerImageSink:
    """Writes each record as its per-image cache file (the layout's checked destination; temporary name, then
    rename) using a thread pool."""

    def __init__(self, layout: CacheLayout, threads: int, fsync: bool = True):
        self.layout, self.fsync = layout, fsync
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="featstore-write")
        self.bytes_written = 0
        self.seconds: Counter = Counter()  # "append": the batch's writes; "encode_cpu": CPU seconds of the pool
        self._lock = threading.Lock()

    def _write_one(self, rec: Record) -> int:
        t0 = time.thread_time()
        data = encode_pt(rec)
        atomic_write_bytes(self.layout.destination(rec.key), data, fsync=self.fsync)
        crash_point("per-image-written")
        with self._lock:
            self.seconds["encode_cpu"] += time.thread_time() - t0
        return len(data)

    def write(self, records: list[Record]) -> None:
        """Write a batch of records, one file each."""
        t0 = time.perf_counter()
        self.bytes_written += sum(self.pool.map(self._write_one, records))
        self.seconds["append"] += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the pool."""
        self.pool.shutdown()

    def __enter__(self) -> "PerImageSink":
        return self

    def __exit__(self, *_: Any) -> None:
        self.pool.shutdown()


class BackgroundWriter:
    """Runs ``make_records`` + ``sink.write`` on a thread behind a bounded queue; re-raises its errors."""

    def __init__(self, sink: ShardSink | PerImageSink, make_records: Callable[[Any], list[Record]],
                 on_written: Callable[[list[Record]], None], depth: int = 3):
        self.sink, self.make_records, self.on_written = sink, make_records, on_written
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.wait_seconds = 0.0  # time put() blocked because the queue was full (the writer is the bottleneck)
        self.thread = threading.Thread(target=self._loop, name="featstore-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                t0, c0 = time.perf_counter(), time.thread_time()
                records = self.make_records(job)
                self.sink.seconds["device_to_host"] += time.perf_counter() - t0
                self.sink.write(records)
                self.on_written(records)
                self.sink.seconds["thread_cpu"] += time.thread_time() - c0
            except BaseException as e:  # noqa: BLE001 - surfaced to the main thread in put()/close()
                self.error = e

    def put(self, job: Any) -> None:
        """Queue a job (blocks when the queue is full: backpressure on the model loop)."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.q.put(job)
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Drain the queue, close the sink, and raise the first writer error, if any."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.sink.close()
