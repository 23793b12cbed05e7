"""The image loop (``--context image``): decode in DataLoader workers -> shape-bucketed batches -> model ->
background encode + write, one record per image; device work overlaps decode and write."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from featstore.build.extract import to_host
from featstore.build.pipeline import BackgroundWriter, Batch, Decoded, ImageDataset, WorkItem, make_loader, shape_batches
from featstore.build.writing import PendingRecords, RecordHead, record_meta, timed_next, writing
from featstore.runtime.faults import crash_point

if TYPE_CHECKING:
    from featstore.build.orchestrator import Build

log = logging.getLogger("featstore")
DECODE_CHUNK = 4  # images a decode worker sends at once


def run_image_loop(b: "Build", todo: list[WorkItem]) -> None:
    """Decode, infer, and write every item of ``todo``."""
    cuda = b.device.type == "cuda"
    workers = b.opts.num_workers if len(todo) > 1 else 0
    loader = make_loader(ImageDataset(todo, b.decode_options(), chunk=DECODE_CHUNK if workers else 1), workers)
    b.ledger.start_progress(len(todo))
    max_batch = b.opts.batch_size

    def failed(d: Decoded) -> None:
        b.ledger.fail(d.item.key, d.item.path, d.error)

    with writing(b.output, b.ledger) as writer:
        batches = shape_batches(loader, b.opts.batch_size, failed, pin_memory=cuda)
        while (batch := timed_next(batches, b.stats.stage_seconds, "wait_decode")) is not None:
            max_batch = _infer_and_queue(b, batch, writer, max_batch)
    b.stats.batch_size_used = max_batch


def _infer_and_queue(b: "Build", batch: Batch, writer: BackgroundWriter, max_batch: int) -> int:
    """Run one batch on the device and queue its features for writing; returns the batch size that worked."""
    t0 = time.perf_counter()
    images = batch.images.to(b.device, non_blocking=True)
    with b.compute_context():
        feats, worked = b.extractor.run_adaptive(images, max_batch)
    if worked < max_batch and worked < images.shape[0]:
        max_batch = worked
        log.warning("continuing with batch size %d after CUDA out of memory", worked)
    host, event = to_host(feats)
    b.stats.stage_seconds["model_launch"] += time.perf_counter() - t0
    writer.put(PendingRecords(_batch_heads(b, batch), host, event))
    crash_point("batch-queued")
    return max_batch


def _batch_heads(b: "Build", batch: Batch) -> list[RecordHead]:
    common = record_meta(b.extractor.names, b.layers, b.model.fingerprint, b.opts, tuple(batch.images.shape[-2:]))
    return [RecordHead(item.key, item.path, dict(common, source=src)) for item, src in zip(batch.items, batch.sources)]
