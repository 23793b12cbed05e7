"""The joint loop (``--context joint``): samples batched by frame count and size -> frames decoded (and given
to ``--frame-transform``) in DataLoader workers -> one joint call per batch -> one record per sample."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from featstore.build.extract import to_host
from featstore.build.joint import DecodedJoint, FramesDoNotFit, JointBatch, JointDataset, JointRunner, item_record, plan_joint_batches
from featstore.build.pipeline import BackgroundWriter, make_loader, sample_fingerprint
from featstore.build.sample_loop import add_ids, frame_sizes, sample_failed
from featstore.build.settings import precision_of
from featstore.build.transform import load_transform, no_transform_problem
from featstore.build.writing import PendingRecords, RecordHead, record_meta, timed_next, writing
from featstore.discover.samples import SampleItem
from featstore.model.preprocess import to_unit_float
from featstore.runtime.faults import crash_point

if TYPE_CHECKING:
    from featstore.build.orchestrator import Build


def run_joint_loop(b: "Build", todo: list[SampleItem]) -> None:
    """Run every sample's frames through the model together and write one record each."""
    b.ledger.start_progress(len(todo))
    transform = load_transform(b.opts.frame_transform) if b.opts.frame_transform else None
    if transform is None:
        todo = _refuse_untransformed(b, todo)
    todo, sizes = frame_sizes(b, todo)
    batches = plan_joint_batches(todo, sizes, b.opts.batch_size)
    loader = make_loader(JointDataset(batches, b.decode_options(), transform),
                         b.opts.num_workers if len(batches) > 1 else 0, pin_memory=b.device.type == "cuda", prefetch=2)
    runner = JointRunner(b.model, b.layers, b.extractor.names, b.store_dtype, b.opts.tokens,
                         precision_of(b.opts, b.device), b.opts.reference_frame, b.opts.batch_size)
    with writing(b.output, b.ledger) as writer:
        decoded = iter(loader)
        for batch in batches:
            _run_batch(b, batch, timed_next(decoded, b.stats.stage_seconds, "wait_decode"), runner, writer)
    b.stats.batch_size_used = runner.max_batch


def _refuse_untransformed(b: "Build", todo: list[SampleItem]) -> list[SampleItem]:
    """Fail the samples whose annotation record needs the trainer's drawing (``spar_info``) when no
    ``--frame-transform`` is given: features of the plain files would not be what training computes."""
    kept = []
    for it in todo:
        problem = no_transform_problem(item_record(it))
        if problem is None:
            kept.append(it)
        else:
            sample_failed(b, it, it.frames[0], problem)
    return kept


def _run_batch(b: "Build", batch: JointBatch, decoded: DecodedJoint, runner: JointRunner,
               writer: BackgroundWriter) -> None:
    """Run one joint batch; queue the records of its samples, fail those whose frames could not be used."""
    t0 = time.perf_counter()
    ok = [i for i, it in enumerate(batch.items) if it.key not in decoded.errors]
    for it in batch.items:
        if it.key in decoded.errors:
            sample_failed(b, it, *decoded.errors[it.key])
    if not ok:
        return
    images = to_unit_float(decoded.images[ok].to(b.device, non_blocking=True))
    try:
        feats = runner.run(images)
    except FramesDoNotFit as e:
        for i in ok:
            sample_failed(b, batch.items[i], batch.items[i].frames[0], str(e))
        return
    host, event = to_host(feats)
    heads = [_joint_head(b, batch.items[i], batch.size, decoded.sources[i]) for i in ok]
    b.stats.stage_seconds["model_launch"] += time.perf_counter() - t0
    writer.put(PendingRecords(heads, host, event))
    crash_point("batch-queued")


def _joint_head(b: "Build", item: SampleItem, size: tuple[int, int], sources: list[dict]) -> RecordHead:
    patch = int(b.model.config.patch_size)
    meta = dict(record_meta(b.extractor.names, b.layers, b.model.fingerprint, b.opts, size), context="joint",
                frames=list(item.frames), reference_frame=item.sample.reference_frame,
                grid=[size[0] // patch, size[1] // patch], source=sample_fingerprint(sources), frame_sources=sources)
    add_ids(meta, item)
    if b.opts.frame_transform:
        meta["annotation"] = item_record(item)  # what the transform was given (verify --recompute gives it again)
    return RecordHead(item.key, item.paths[0], meta)
