"""Records on their way to the store: the heads that wait for their tensors, the metadata every record of a run
shares, and the sink plus writer thread a loop writes through."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from featstore.build.ledger import Ledger
from featstore.build.output import Output
from featstore.build.pipeline import BackgroundWriter
from featstore.build.throughput import recording
from featstore.formats.record import Record


@dataclass
class RecordHead:
    """A record's key, path and metadata, waiting for its tensors."""

    key: str
    path: str
    meta: dict[str, Any]


@dataclass
class PendingRecords:
    """Records on their way to the writer: heads, host tensors [N, ...] and the copy's CUDA event."""

    heads: list[RecordHead]
    host: dict[str, torch.Tensor]
    event: Any = None


def records_of(job: PendingRecords) -> list[Record]:
    """The records of a job once its device-to-host copy is done (row i of each host tensor is record i's:
    views; the .pt codec copies what it must)."""
    if job.event is not None:
        job.event.synchronize()
    return [Record(h.key, h.path, {n: t[i] for n, t in job.host.items()}, h.meta) for i, h in enumerate(job.heads)]


def record_meta(names: list[str], layers: tuple[int, ...], fingerprint: str, opts: Any,
                image_size: tuple[int, int]) -> dict[str, Any]:
    """Metadata every record of this run shares."""
    return {"layers": dict(zip(names, layers)), "model": fingerprint, "preprocess": opts.preprocess,
            "tokens": opts.tokens, "image_size": list(image_size)}


@contextlib.contextmanager
def writing(output: Output, ledger: Ledger) -> Iterator[BackgroundWriter]:
    """The sink and writer thread of a loop: closes them at the end (on an error, the sink drops the open
    shard), closes the progress bar, and keeps the byte count and the writer's stage seconds (closed shards
    reach ``output.closed`` through the writer's ``post`` hook)."""
    sink = output.sink()
    writer = BackgroundWriter(sink, records_of, ledger.written)
    waits = ledger.stats.stage_seconds
    counters = lambda: (ledger.stats.processed, waits["wait_decode"], waits["model_launch"],  # noqa: E731
                        sum(sink.seconds.values()))
    try:
        with sink, recording(output.store, output.opts.format, output.gid, counters):
            yield writer
            t0 = time.perf_counter()
            writer.close()
            waits["drain_writer"] += time.perf_counter() - t0
    finally:
        ledger.close_progress()
    waits["wait_writer"] += writer.wait_seconds
    waits.update({f"writer_{k}": v for k, v in sink.seconds.items()})
    ledger.stats.bytes_written = sink.bytes_written


def timed_next(it: Any, seconds: Any, name: str) -> Any:
    """``next(it)`` (None at the end), adding the time it blocked to ``seconds[name]``."""
    t0 = time.perf_counter()
    try:
        return next(it)
    except StopIteration:
        return None
    finally:
        seconds[name] += time.perf_counter() - t0
