"""The sample loop (``--context sample``): every training sample streamed through the model's KV-cache path,
each shared frame prefix once (the prefix-tree plan of featstore.build.schedule), one record per sample."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from featstore.build.context import PlanExecutor
from featstore.build.extract import to_host
from featstore.build.pipeline import (BackgroundWriter, DecodedStep, DecodeOptions, StepDataset, make_loader,
                                      preprocessed_size_of, sample_fingerprint)
from featstore.build.schedule import Step, plan_steps
from featstore.build.writing import PendingRecords, RecordHead, record_meta, timed_next, writing
from featstore.discover.samples import SampleItem, kept_index
from featstore.model.preprocess import to_unit_float
from featstore.runtime.faults import crash_point

if TYPE_CHECKING:
    from featstore.build.orchestrator import Build


def sample_failed(b: "Build", item: SampleItem, frame: str, error: str) -> None:
    """Count a sample that cannot be built because of ``frame`` (the ledger's one failure path)."""
    path = item.paths[item.sample.frames.index(frame)] if frame in item.sample.frames else ""
    b.ledger.fail(item.key, path, error, frame=frame)


def frame_sizes(b: "Build", todo: list[SampleItem]) -> tuple[list[SampleItem], dict[str, tuple[int, int]]]:
    """Each frame's preprocessed size from its header; samples with an unreadable frame or frames of
    different sizes fail here (listed with the frame), the rest are returned with the size table."""
    opts = b.decode_options()
    paths = {k: p for it in todo for k, p in zip(it.sample.frames, it.paths)}
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="featstore-probe") as pool:
        probed = dict(zip(paths, pool.map(lambda p: _probe_size(p, opts), paths.values())))
    ok = []
    for it in todo:
        problem = _sample_size_problem(it, probed)
        if problem is None:
            ok.append(it)
        else:
            sample_failed(b, it, *problem)
    return ok, {k: v for k, v in probed.items() if isinstance(v, tuple)}


def _probe_size(path: str, opts: DecodeOptions) -> tuple[int, int] | str:
    """A frame's preprocessed size, or why its header cannot be read."""
    try:
        return preprocessed_size_of(path, opts)
    except Exception as e:  # noqa: BLE001 - reported per sample, never fatal
        return f"{type(e).__name__}: {e}"


def _sample_size_problem(item: SampleItem, probed: dict[str, Any]) -> tuple[str, str] | None:
    """(frame, error) when a frame of the sample is unreadable or differs in size from the first frame."""
    first = probed[item.sample.frames[0]]
    for frame in item.sample.frames:
        size = probed[frame]
        if isinstance(size, str):
            return frame, size
        if isinstance(first, tuple) and size != first:
            return frame, (f"preprocesses to {size[0]}x{size[1]} but the sample's first frame to {first[0]}x"
                           f"{first[1]}: the frames of one sample must have one size")
    return None


class SampleRun:
    """State of one context loop: the executor, the samples by key, frame fingerprints and failed nodes."""

    def __init__(self, executor: PlanExecutor, items: dict[str, SampleItem]):
        self.executor, self.items = executor, items
        self.frame_sources: dict[str, dict[str, Any]] = {}
        self.failed_nodes: dict[int, tuple[str, str]] = {}  # node -> (frame, error) that broke its stream

    def mark_failed(self, step: Step, errors: dict[str, str]) -> dict[str, tuple[str, str]]:
        """Record the step's nodes whose frame (or an earlier frame of their stream) failed; returns the
        samples ending in this step that must fail, with (frame, error)."""
        bad: dict[str, tuple[str, str]] = {}
        for node, parent, frame, ends in zip(step.nodes, step.parents, step.frames, step.ends):
            why = self.failed_nodes.get(parent) if parent is not None else None
            if why is None and frame in errors:
                why = (frame, errors[frame])
            if why is not None:
                self.failed_nodes[node] = why
                bad.update((s.key, why) for s in ends)
        return bad


def run_sample_loop(b: "Build", todo: list[SampleItem]) -> None:
    """Stream every sample through the model, each shared frame prefix once, and write one record each."""
    cuda = b.device.type == "cuda"
    b.ledger.start_progress(len(todo))
    todo, sizes = frame_sizes(b, todo)
    steps = plan_steps([it.sample for it in todo], b.opts.batch_size, sizes.__getitem__)
    paths = {k: p for it in todo for k, p in zip(it.sample.frames, it.paths)}
    loader = make_loader(StepDataset(steps, paths, b.decode_options()),
                         b.opts.num_workers if len(steps) > 1 else 0, pin_memory=cuda, prefetch=4)
    run = SampleRun(PlanExecutor(b.model, b.layers, b.store_dtype, b.opts.tokens), {it.key: it for it in todo})
    with writing(b.output, b.ledger) as writer:
        decoded_steps = iter(loader)
        for step in steps:
            _run_step(b, step, timed_next(decoded_steps, b.stats.stage_seconds, "wait_decode"), run, writer)
    b.stats.batch_size_used = run.executor.max_rows or b.opts.batch_size


def _run_step(b: "Build", step: Step, decoded: DecodedStep, run: SampleRun, writer: BackgroundWriter) -> None:
    """Run one plan step; queue the records of the samples that end in it, fail those with a bad frame."""
    t0 = time.perf_counter()
    run.frame_sources.update(decoded.sources)
    bad = run.mark_failed(step, decoded.errors)
    images = to_unit_float(decoded.images.to(b.device, non_blocking=True)).to(b.extractor.input_dtype)
    done = []
    with b.compute_context():
        results = run.executor.run_step(step, images)
    for sample, feats in results:
        if sample.key in bad:
            sample_failed(b, run.items[sample.key], *bad[sample.key])
        else:
            done.append((sample, feats))
    if done:
        stacked = {n: torch.stack([f[n] for _, f in done]) for n in b.extractor.names}  # [N, 1, P, C]
        host, event = to_host(stacked)
        heads = [_sample_head(b, run.items[s.key], tuple(images.shape[-2:]), run.frame_sources) for s, _ in done]
        b.stats.stage_seconds["model_launch"] += time.perf_counter() - t0
        writer.put(PendingRecords(heads, host, event))
        crash_point("batch-queued")


def _sample_head(b: "Build", item: SampleItem, image_size: tuple[int, int], frame_sources: dict) -> RecordHead:
    sources = [frame_sources[f] for f in item.sample.frames]
    patch = int(b.model.config.patch_size)
    meta = dict(record_meta(b.extractor.names, b.layers, b.model.fingerprint, b.opts, image_size), context="sample",
                frames=list(item.sample.frames), kept=kept_index(item.sample),
                reference_frame=item.sample.reference_frame, grid=[image_size[0] // patch, image_size[1] // patch],
                source=sample_fingerprint(sources), frame_sources=sources)
    add_ids(meta, item)
    return RecordHead(item.key, item.kept_path, meta)


def add_ids(meta: dict[str, Any], item: SampleItem) -> None:
    """The annotation ids a record answers to: its sample's ``id``, and every id of a deduplicated record
    (``ids``, which the alias index maps to it)."""
    if item.sample.id is not None:
        meta["id"] = item.sample.id
    ids = list(getattr(item, "ids", ()) or ())
    if ids and ids != [item.sample.id]:
        meta["ids"] = ids
