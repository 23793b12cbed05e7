"""``featstore build``: discover images or training samples, run VGGT in a pipelined loop, write a store.

This module orchestrates; resume planning is :mod:`featstore.build.resume`, the locks :mod:`featstore.build.locks`, the
stages :mod:`featstore.build.pipeline`. Order of work for one process (a torchrun rank or a ``--part`` of a job
array), as :func:`run_build` runs it:

1. check options, environment, data root and output folder (exit 2 with one line, nothing written);
2. discover images (or training samples, ``--context sample``) and take this rank's lock;
3. keep the complete records of this rank's unfinished shard (a crash's leftovers), then plan: this rank's
   share (crc32 of the key, or of a sample's first streamed frame, modulo the world size) minus what is
   stored plus, with ``--rebuild-stale``, what is stale;
4. load the model (a missing checkpoint is exit 2, never random weights) and refuse a store built with other
   settings; with nothing left to build and matching recorded settings, skip loading it;
5. the first writes: create the output (removing dead writers' temporary files), the missing-images ledger
   and ``build.json``; then wait for every rank;
6. decode in DataLoader workers -> shape-bucketed batches (or the context plan's steps) -> model ->
   background encode + write;
7. leave part files; rank 0 waits for every rank, then merges index and manifest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from tqdm import tqdm

from featstore.build.context import PlanExecutor
from featstore.runtime.env import dist_env
from featstore.errors import FeatstoreError, OptionError, StoreError
from featstore.build.extract import Extractor, autocast_dtype, default_store_dtype, pick_device, resolve_layers, to_host
from featstore.runtime.faults import crash_point
from featstore.formats.layout import (BUILD_CONFIG, INDEX_NAME, MISSING_LEDGER, PARTS_DIR, PER_IMAGE_MISSING_LEDGER,
                                      PER_IMAGE_STATE_DIR, SHARDS_DIR)
from featstore.formats.manifest import shape_key
from featstore.formats.record import Record, dtype_name, parse_dtype
from featstore.formats.keys import CacheLayout
from featstore.formats.shards import ClosedShard, ShardWriter, parse_shard_name
from featstore.formats.shardstore import list_store_shards
from featstore.storage import LocalStorage, Storage, publish_json, reset_staging_dir
from featstore.runtime.fsutil import atomic_write_bytes, remove_temp_files
from featstore.build.locks import lock_for_rank
from featstore.build.merge import merge_per_image_store, merge_shard_store, per_image_manifest_path, wait_for_parts, write_part
from featstore.model.checkpoint import default_dtype as default_model_dtype
from featstore.build.options import BuildOptions, check_build_options, check_output_writable, shown
from featstore.build.pipeline import (BackgroundWriter, Batch, Decoded, DecodedStep, DecodeOptions, ImageDataset,
                                PerImageSink, ShardSink, StepDataset, WorkItem, make_loader,
                                preprocessed_size_of, sample_fingerprint, shape_batches)
from featstore.model.preprocess import to_unit_float
from featstore.build.resume import (build_target, check_compatible, plan_resume, previous_settings, rank_share,
                              reusable_settings, salvage_unfinished_shards)
from featstore.discover.samples import SampleItem, kept_index
from featstore.build.schedule import Step, plan_steps

log = logging.getLogger("featstore")
DECODE_CHUNK = 4  # images a decode worker sends at once
NAMED_MODELS = ("tiny", "vggt-1b-random")


@dataclass
class RunStats:
    """Counts and timings of one process's run."""

    total_images: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    missing: int = 0
    malformed: int = 0
    stale_rebuilt: int = 0
    bytes_written: int = 0
    batch_size_used: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)


@dataclass
class RecordHead:
    """A record's key, path and metadata, waiting for its tensors."""

    key: str
    path: str
    meta: dict[str, Any]


@dataclass
class PendingRecords:
    """Records on their way to the writer: heads, host tensors [N, 1, P, C] and the copy's CUDA event."""

    heads: list[RecordHead]
    host: dict[str, torch.Tensor]
    event: Any = None


def _model_path_problem(model: str) -> str | None:
    if model in NAMED_MODELS:
        return None
    return None if Path(model).exists() else model


def _setup_distributed(world: int) -> bool:
    if world <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        # gloo for a handful of barriers only: no NCCL needed, and builds can take days.
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
    return True


class Build:
    """One process's build: holds options, model, stats and the store it writes."""

    def __init__(self, opts: BuildOptions):
        self.opts = opts
        d = dist_env()
        self.dist = d
        self.gid = opts.part * d.world_size + d.rank
        self.gworld = opts.num_parts * d.world_size
        self.is_leader = self.gid == 0 and opts.num_parts == 1
        self.unit = opts.context  # "image" or "sample": what one record is
        self.stats = RunStats()
        self.done_before = 0
        self.missing_examples: list[str] = []
        self.discovery_record: dict[str, Any] | None = None
        self.missing_ledger: str | None = None
        self.bar: tqdm | None = None
        self.closed: list[ClosedShard] = []  # this rank's shards, for its part file
        self._settings: dict[str, Any] | None = None
        self.device: torch.device | None = None
        # set by load_model (or, with nothing left to build, by adopt_previous_settings)
        self.model: Any = None
        self.extractor: Extractor | None = None
        self.layers: tuple[int, ...] = ()
        self.store_dtype: torch.dtype | None = None
        self.data_root = Path(opts.data_root).resolve()
        self.target = build_target(opts.format, opts.out, self.data_root, self.gid, opts.storage_options)
        t = self.target
        self.store, self.out, self.cache_root, self.remote = t.store, t.out, t.cache_root, t.remote
        if opts.format == "shards":
            self.state_dir = self.out / PARTS_DIR
            self.parts: Storage = self.store.sub(PARTS_DIR)
        else:
            self.state_dir = self.out / PER_IMAGE_STATE_DIR / PARTS_DIR
            self.parts = LocalStorage(self.state_dir)
        self.cache_files = CacheLayout(self.data_root, self.cache_root)  # where per-image caches go
        self.where = self.store.display  # the output, safe for messages

    # --- setup -------------------------------------------------------------------------------------------
    def load_model(self, model: torch.nn.Module | None = None) -> None:
        """Load the model on this rank's device (or adopt an already loaded one); settle dtype and layers."""
        from featstore.model import load_vggt

        dev = self.resolve_device()
        dtype = torch.float32 if self.opts.autocast else None  # None: bf16 on GPUs with bf16, else fp32
        self.model = model if model is not None else load_vggt(self.opts.model, device=str(dev), dtype=dtype)
        self.store_dtype = parse_dtype(self.opts.dtype) if self.opts.dtype else default_store_dtype(dev)
        try:
            self.layers = resolve_layers(tuple(self.opts.layers), int(self.model.config.depth))
        except ValueError as e:
            raise OptionError(f"{shown(self.opts, 'layers')}: {e}") from None
        forward = torch.compile(self.model) if self.opts.compile else None
        self.extractor = Extractor(self.model, self.layers, self.store_dtype, self.opts.tokens, forward)

    def resolve_device(self) -> torch.device:
        """This rank's device: the requested one (cuda:LOCAL_RANK under torchrun), or cpu when CUDA is absent."""
        if self.device is None:
            dev = pick_device(self.opts.device, shown(self.opts, "device"))
            if dev.type == "cuda" and self.dist.world_size > 1:
                dev = torch.device("cuda", self.dist.local_rank)
            elif dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", 0)  # set_device and per-rank logic need an explicit index
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            self.device = dev
        return self.device

    def adopt_previous_settings(self) -> bool:
        """When nothing is left to build, reuse the store's recorded settings instead of loading the model.

        Only if the request matches them (same checkpoint path, preprocessing, tokens, dtype, layers), so a
        re-run of a complete store is a no-op that ends in seconds; any difference loads the model and is
        checked against the store's model fingerprint as usual.
        """
        prev = previous_settings(self.target)
        try:
            depth = int(((prev or {}).get("model") or {})["config"]["depth"])
            layers = resolve_layers(tuple(self.opts.layers), depth)
        except (ValueError, KeyError, TypeError):
            return False
        dtype = self.opts.dtype or dtype_name(default_store_dtype(self.resolve_device()))
        requested = {"vggt_model_path": str(self.opts.model), "layers": list(layers), "dtype": dtype,
                     "tokens": self.opts.tokens, "compute": self.compute_name(), "context": self.context_settings(),
                     "preprocess": {"mode": self.opts.preprocess, "target_size": self.opts.image_size}}
        carried = reusable_settings(prev, requested)
        if carried is None:
            return False
        self._settings = dict(carried, data_root=str(self.data_root),
                              cache_root=str(self.cache_root) if self.cache_root else None)
        self.store_dtype, self.layers = parse_dtype(dtype), layers
        return True

    def settings(self) -> dict[str, Any]:
        """The settings every record of a store must share (checked on resume)."""
        if self._settings is not None:
            return self._settings
        names = self.extractor.names
        return {
            "model": {"fingerprint": self.model.fingerprint, "name": self.model.config.name,
                      "config": self.model.config.to_dict()},
            "vggt_model_path": str(self.opts.model),
            "data_root": str(self.data_root),
            "cache_root": str(self.cache_root) if self.cache_root else None,
            "layers": list(self.layers),
            "tensors": {n: {"layer": i, "dtype": dtype_name(self.store_dtype), "codec": self.opts.codec}
                        for n, i in zip(names, self.layers)},
            "codec": self.opts.codec,
            "preprocess": {"mode": self.opts.preprocess, "apply_exif": self.opts.apply_exif,
                           # crop/pad: longest (pad) or width (crop) side image_size, other side a multiple of
                           # 14; janusvln: then each side down to a multiple of 28 (518 -> 504)
                           "target_size": self.opts.image_size,
                           "multiple": 28 if self.opts.preprocess == "janusvln" else 14},
            "context": self.context_settings(),
            "dtype": dtype_name(self.store_dtype),
            "tokens": self.opts.tokens,
            "compute": self.compute_name(),
            "source_fingerprint": "sha256" if self.opts.hash_inputs else "stat",
        }

    def compute_name(self) -> str:
        """How the model computes: ``autocast-<dtype>`` (fp32 weights under autocast) or its weights' dtype."""
        dev = self.resolve_device()
        if self.opts.autocast:
            return f"autocast-{dtype_name(autocast_dtype(dev))}"
        return dtype_name(default_model_dtype(dev))

    def compute_context(self) -> Any:
        """The autocast context of every model call (``--autocast``), or a context that does nothing."""
        if not self.opts.autocast:
            return contextlib.nullcontext()
        dev = self.resolve_device()
        return torch.autocast(dev.type, dtype=autocast_dtype(dev))

    def context_settings(self) -> dict[str, Any]:
        """What a record is: one image, or one training sample streamed with its frames as causal context."""
        if self.opts.context == "image":
            return {"mode": "image"}
        history = None if self.opts.history is None else {"frames": self.opts.history, "pad": self.opts.history_pad,
                                                          "rule": "janusvln"}
        return {"mode": "sample", "reference_frame": self.opts.reference_frame, "history": history}

    def check_settings(self) -> None:
        """Refuse to resume into a store built with different model, layers, preprocessing, dtype or tokens."""
        if self.opts.skip_existing:
            check_compatible(previous_settings(self.target), self.settings(), self.where)

    def prepare_output(self) -> None:
        """Create the output folders (the first shared write), emptying a remote build's staging folder and
        removing the temporary files that dead writers on this host left there."""
        if self.remote:
            reset_staging_dir(self.out)  # this rank's lock is held: leftovers are a killed run's
            mine = f"{SHARDS_DIR}/{self.opts.shard_prefix}-{self.gid:05d}-"
            if n := self.store.abort_incomplete_uploads(mine):
                log.info("aborted %d unfinished shard uploads left by an interrupted build", n)
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create output directory {self.out}: {e.strerror}; choose a writable --out") from None
        if not os.access(self.out, os.W_OK):
            raise StoreError(f"output directory {self.out} is not writable; choose a writable --out")
        # Index, manifest, ledger and part files of a killed run leave temporary files; delete those whose
        # writer is dead (a live job-array part may be writing its own right now).
        for d in (self.out, self.state_dir):
            for p in remove_temp_files(d):
                log.info("removing temporary file %s left by an interrupted build", p)
        if self.opts.format == "shards":
            (self.out / SHARDS_DIR).mkdir(exist_ok=True)

    def salvage_unfinished_shards(self) -> None:
        """Keep the complete records of this rank's shard that a crash left unfinished (see resume)."""
        salvage_unfinished_shards(self.target, self.gid, fsync=self.opts.fsync)

    def record_settings(self) -> None:
        """Write the store's build settings (shard stores), which a later resume is checked against."""
        if self.opts.format == "shards" and (self.is_leader or self.opts.num_parts > 1):
            publish_json(self.store, BUILD_CONFIG, self.settings())

    # --- sources -----------------------------------------------------------------------------------------
    def output_dirs(self) -> list[Path]:
        """Folders this build writes, which discovery never reads."""
        if self.opts.format == "shards":
            return [self.out]
        return [self.cache_root] if self.cache_root else []

    def discover(self) -> Any:
        """The images to build (annotations, image list, annotation files found under the data root, or a scan)."""
        from featstore.discover.sources import discover_images

        found = discover_images(self.data_root, annotations=tuple(self.opts.annotations),
                                image_list=self.opts.image_list, data_path=self.opts.data_path,
                                find_annotations=True, exclude=self.output_dirs(),
                                strict=self.opts.strict_annotations)
        self.discovery_record = found.to_record(self.data_root)
        self.missing_examples = list(found.missing[:20])
        if self.gid == 0:
            self.stats.missing, self.stats.malformed = len(found.missing), len(found.malformed)
            _log_discovery(found, self.data_root, self.missing_ledger_where())
        return found

    def discover_samples(self) -> Any:
        """The training samples to build (--context sample): annotation records, or episode folders (--history)."""
        from featstore.discover.sources import discover_samples

        o = self.opts
        found = discover_samples(self.data_root, annotations=tuple(o.annotations), data_path=o.data_path,
                                 exclude=self.output_dirs(), strict=o.strict_annotations,
                                 reference_frame=o.reference_frame, history=o.history, history_pad=o.history_pad)
        self.discovery_record = found.record
        self.missing_examples = [m["key"] for m in found.missing[:20]]
        if self.gid == 0:
            self.stats.missing, self.stats.malformed = len(found.missing), len(found.malformed)
            _log_sample_discovery(found, self.missing_ledger_where())
        return found

    def missing_ledger_path(self) -> Path:
        """Where the list of annotated images that do not exist goes (beside the manifest)."""
        if self.opts.format == "shards":
            return self.out / MISSING_LEDGER
        return per_image_manifest_path(self.data_root, self.cache_root).parent / PER_IMAGE_MISSING_LEDGER

    def missing_ledger_where(self) -> str:
        """The missing-images ledger's location, for messages."""
        return self.store.describe(MISSING_LEDGER) if self.remote else str(self.missing_ledger_path())

    def write_missing_ledger(self, found: Any) -> None:
        """(rank 0) List each annotated image that does not exist, with the file and line naming it."""
        if self.gid != 0:
            return
        path = self.missing_ledger_path()
        missing = [m.to_json() for m in found.missing_refs] if hasattr(found, "missing_refs") else found.missing
        if self.remote:
            text = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in missing)
            if missing:
                self.store.publish_bytes(MISSING_LEDGER, text.encode("utf-8"))
                self.missing_ledger = MISSING_LEDGER
            else:
                self.store.delete(MISSING_LEDGER)
            return
        if missing:
            text = "".join(json.dumps(m, ensure_ascii=False) + "\n" for m in missing)
            atomic_write_bytes(path, text.encode("utf-8"), fsync=self.opts.fsync)
            self.missing_ledger = path.name
        elif path.is_file():
            path.unlink()

    # --- planning ----------------------------------------------------------------------------------------
    def plan(self, items: list[Any]) -> list[Any]:
        """This rank's items still to build (featstore.build.resume): its share, minus what is stored, plus what is
        stale with --rebuild-stale."""
        p = plan_resume(self.target, rank_share(items, self.gid, self.gworld), self.opts.skip_existing,
                        self.opts.rebuild_stale)
        self.stats.skipped += p.skipped
        self.stats.stale_rebuilt += p.stale
        self.done_before = self.stats.skipped
        return p.todo

    # --- the loop ----------------------------------------------------------------------------------------
    def decode_options(self) -> DecodeOptions:
        """How this build decodes and preprocesses every image."""
        o = self.opts
        return DecodeOptions(o.preprocess, o.image_size, o.apply_exif, o.hash_inputs, o.max_pixels)

    def _sink(self) -> ShardSink | PerImageSink:
        if self.opts.format == "shards":
            existing = [parse_shard_name(n) for n in list_store_shards(self.store)]
            first_n = max((p[2] for p in existing if p), default=-1) + 1
            writer = ShardWriter(self.out / SHARDS_DIR, self.opts.shard_prefix, self.gid, first_n,
                                 self.opts.shard_size, fsync=self.opts.fsync, post=self._shard_closed)
            return ShardSink(writer, self.opts.writer_threads, self.opts.zstd_level, self.opts.codec)
        return PerImageSink(self.cache_files, self.opts.writer_threads, fsync=self.opts.fsync)

    def _shard_closed(self, shard: ClosedShard) -> None:
        """Upload a closed shard of a remote store under its final name (multipart when large, then the local
        copy is dropped); keep its index entries for this rank's part file."""
        if self.remote:
            crash_point("shard-before-upload")
            self.store.publish_file(f"{SHARDS_DIR}/{shard.info.name}", shard.path, move=True)
            crash_point("shard-after-upload")
        self.closed.append(shard)

    def _record_meta(self, image_size: tuple[int, int]) -> dict[str, Any]:
        """Metadata every record of this run shares."""
        return {"layers": dict(zip(self.extractor.names, self.layers)), "model": self.model.fingerprint,
                "preprocess": self.opts.preprocess, "tokens": self.opts.tokens, "image_size": list(image_size)}

    def _batch_heads(self, batch: Batch) -> list[RecordHead]:
        common = self._record_meta(tuple(batch.images.shape[-2:]))
        return [RecordHead(item.key, item.path, dict(common, source=src))
                for item, src in zip(batch.items, batch.sources)]

    def _records(self, job: PendingRecords) -> list[Record]:
        if job.event is not None:
            job.event.synchronize()
        # host tensors are [N, 1, P, C]; row i is record i ([1, P, C] views; the .pt codec copies what it must)
        return [Record(h.key, h.path, {n: t[i] for n, t in job.host.items()}, h.meta) for i, h in enumerate(job.heads)]

    def _on_written(self, records: list[Record]) -> None:
        self.stats.processed += len(records)
        for r in records:
            self.stats.shapes[shape_key(r.features.shape)] += 1
        if self.bar is not None:
            self.bar.update(len(records))

    def _on_failure(self, d: Decoded) -> None:
        self.stats.failed += 1
        self.stats.failures.append({"key": d.item.key, "path": d.item.path, "error": d.error or "unknown"})
        if self.stats.failed <= 5:
            log.warning("cannot use %s: %s", d.item.path, d.error)
        if self.bar is not None:
            self.bar.update(1)

    def _progress(self, total: int) -> None:
        """Start the progress bar (rank 0 only, unless --no-progress)."""
        self.bar = tqdm(total=total, unit=self.unit, desc="featstore build", dynamic_ncols=True,
                        disable=not self.opts.progress or self.gid != 0, smoothing=0.05)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[BackgroundWriter]:
        """The sink and writer thread of a loop: closes them at the end (on an error, the sink drops the open
        shard), closes the progress bar, and keeps the byte count and the writer's stage seconds (the closed
        shards arrive through the writer's ``post`` hook, :meth:`_shard_closed`)."""
        sink = self._sink()
        writer = BackgroundWriter(sink, self._records, self._on_written)
        waits = self.stats.stage_seconds
        try:
            with sink:
                yield writer
                t0 = time.perf_counter()
                writer.close()
                waits["drain_writer"] += time.perf_counter() - t0
        finally:
            if self.bar is not None:
                self.bar.close()
            self.bar = None
        waits["wait_writer"] += writer.wait_seconds
        waits.update({f"writer_{k}": v for k, v in sink.seconds.items()})
        self.stats.bytes_written = sink.bytes_written

    def run_loop(self, todo: list[WorkItem]) -> None:
        """Decode, infer, and write every item of ``todo``; device work overlaps decode and write."""
        cuda = self.device.type == "cuda"
        workers = self.opts.num_workers if len(todo) > 1 else 0
        dataset = ImageDataset(todo, self.decode_options(), chunk=DECODE_CHUNK if workers else 1)
        loader = make_loader(dataset, workers)
        self._progress(len(todo))
        max_batch = self.opts.batch_size
        with self._writing() as writer:
            batches = shape_batches(loader, self.opts.batch_size, self._on_failure, pin_memory=cuda)
            while (batch := _timed_next(batches, self.stats.stage_seconds, "wait_decode")) is not None:
                max_batch = self._infer_and_queue(batch, writer, max_batch)
        self.stats.batch_size_used = max_batch

    def _infer_and_queue(self, batch: Batch, writer: BackgroundWriter, max_batch: int) -> int:
        """Run one batch on the device and queue its features for writing; returns the batch size that worked."""
        t0 = time.perf_counter()
        images = batch.images.to(self.device, non_blocking=True)
        with self.compute_context():
            feats, worked = self.extractor.run_adaptive(images, max_batch)
        if worked < max_batch and worked < images.shape[0]:
            max_batch = worked
            log.warning("continuing with batch size %d after CUDA out of memory", worked)
        host, event = to_host(feats)
        self.stats.stage_seconds["model_launch"] += time.perf_counter() - t0
        writer.put(PendingRecords(self._batch_heads(batch), host, event))
        crash_point("batch-queued")
        return max_batch

    # --- the context (per-sample) loop ---------------------------------------------------------------------
    def frame_sizes(self, todo: list[SampleItem]) -> tuple[list[SampleItem], dict[str, tuple[int, int]]]:
        """Each frame's preprocessed size from its header; samples with an unreadable frame or frames of
        different sizes fail here (listed with the frame), the rest are returned with the size table."""
        opts = self.decode_options()
        paths = {k: p for it in todo for k, p in zip(it.sample.frames, it.paths)}
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="featstore-probe") as pool:
            probed = dict(zip(paths, pool.map(lambda p: _probe_size(p, opts), paths.values())))
        sizes = {k: v for k, v in probed.items() if isinstance(v, tuple)}
        ok = []
        for it in todo:
            problem = _sample_size_problem(it, probed)
            if problem is None:
                ok.append(it)
            else:
                self._sample_failed(it, *problem)
        return ok, sizes

    def _sample_failed(self, item: SampleItem, frame: str, error: str) -> None:
        self.stats.failed += 1
        path = item.paths[item.sample.frames.index(frame)] if frame in item.sample.frames else ""
        self.stats.failures.append({"key": item.key, "frame": frame, "path": path, "error": error})
        if self.stats.failed <= 5:
            log.warning("cannot build sample %s: frame %s: %s", item.key, path or frame, error)
        if self.bar is not None:
            self.bar.update(1)

    def run_sample_loop(self, todo: list[SampleItem]) -> None:
        """Stream every sample through the model, each shared frame prefix once, and write one record each."""
        cuda = self.device.type == "cuda"
        self._progress(len(todo))
        todo, sizes = self.frame_sizes(todo)
        steps = plan_steps([it.sample for it in todo], self.opts.batch_size, sizes.__getitem__)
        items = {it.key: it for it in todo}
        paths = {k: p for it in todo for k, p in zip(it.sample.frames, it.paths)}
        loader = make_loader(StepDataset(steps, paths, self.decode_options()),
                             self.opts.num_workers if len(steps) > 1 else 0, pin_memory=cuda, prefetch=4)
        run = _SampleRun(PlanExecutor(self.model, self.layers, self.store_dtype, self.opts.tokens), items)
        with self._writing() as writer:
            decoded_steps = iter(loader)
            for step in steps:
                self._run_step(step, _timed_next(decoded_steps, self.stats.stage_seconds, "wait_decode"), run, writer)
        self.stats.batch_size_used = run.executor.max_rows or self.opts.batch_size

    def _run_step(self, step: Step, decoded: DecodedStep, run: "_SampleRun", writer: BackgroundWriter) -> None:
        """Run one plan step; queue the records of the samples that end in it, fail those with a bad frame."""
        t0 = time.perf_counter()
        run.frame_sources.update(decoded.sources)
        bad = run.mark_failed(step, decoded.errors)
        images = to_unit_float(decoded.images.to(self.device, non_blocking=True))
        done = []
        with self.compute_context():
            results = run.executor.run_step(step, images)
        for sample, feats in results:
            if sample.key in bad:
                self._sample_failed(run.items[sample.key], *bad[sample.key])
            else:
                done.append((sample, feats))
        if done:
            stacked = {n: torch.stack([f[n] for _, f in done]) for n in self.extractor.names}  # [N, 1, P, C]
            host, event = to_host(stacked)
            heads = [self._sample_head(run.items[s.key], tuple(images.shape[-2:]), run.frame_sources) for s, _ in done]
            self.stats.stage_seconds["model_launch"] += time.perf_counter() - t0
            writer.put(PendingRecords(heads, host, event))
            crash_point("batch-queued")

    def _sample_head(self, item: SampleItem, image_size: tuple[int, int], frame_sources: dict) -> RecordHead:
        sources = [frame_sources[f] for f in item.sample.frames]
        patch = int(self.model.config.patch_size)
        meta = dict(self._record_meta(image_size), context="sample", frames=list(item.sample.frames),
                    kept=kept_index(item.sample), reference_frame=item.sample.reference_frame,
                    grid=[image_size[0] // patch, image_size[1] // patch],
                    source=sample_fingerprint(sources), frame_sources=sources)
        if item.sample.id is not None:
            meta["id"] = item.sample.id
        return RecordHead(item.key, item.kept_path, meta)

    # --- finish ------------------------------------------------------------------------------------------
    def summary(self, started: float, finished: float) -> dict[str, Any]:
        """This rank's part summary (merged by rank 0 into the manifest)."""
        s = self.stats
        return dict(self.settings(), gid=self.gid, world_size=self.gworld, layout=self.opts.format,
                    total_images=s.total_images, done_images=self.done_before + s.processed,
                    counts={"processed": s.processed, "skipped": s.skipped, "failed": s.failed,
                            "missing": s.missing, "stale_rebuilt": s.stale_rebuilt,
                            "malformed_annotation_lines": s.malformed},
                    sources=self.discovery_record, missing_ledger=self.missing_ledger,
                    feature_shapes=dict(s.shapes), failures=s.failures, missing_examples=self.missing_examples,
                    bytes_written=s.bytes_written, times={"started": started, "finished": finished})


class _SampleRun:
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


def _timed_next(it: Any, seconds: Counter, name: str) -> Any:
    """``next(it)`` (None at the end), adding the time it blocked to ``seconds[name]``."""
    t0 = time.perf_counter()
    try:
        return next(it)
    except StopIteration:
        return None
    finally:
        seconds[name] += time.perf_counter() - t0


def _barrier(distributed: bool) -> None:
    if distributed:
        torch.distributed.barrier()


def _check_inputs(opts: BuildOptions) -> Build:
    """Every check that needs neither the model nor the images, before anything is read or written."""
    check_build_options(opts)
    if _model_path_problem(opts.model) is not None:
        raise OptionError(f"{shown(opts, 'model')} not found: pass the VGGT-1B checkpoint (a folder with "
                          f"model.safetensors or model.pt, or the file), or --model tiny for the built-in test model")
    root = Path(opts.data_root)
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise OptionError(f"{shown(opts, 'data_root')} is not a readable directory; check the path and its "
                          f"permissions")
    b = Build(opts)
    check_output_writable(b.out)
    return b


def run_build(opts: BuildOptions) -> int:
    """Run a build; returns the process exit status (0 ok, 1 failures or no images, 2 could not run).

    A build that cannot run (exit 2) leaves nothing behind: options, environment, data root, output folder,
    model and the store's settings are all checked before the first output is written.
    """
    started = time.time()
    try:
        b = _check_inputs(opts)
    except FeatstoreError as e:
        log.error("%s", _one_line(e))
        return 2
    distributed = _setup_distributed(b.dist.world_size)
    out_existed = b.out.exists()
    try:
        return _run(b, opts, started, distributed)
    except FeatstoreError as e:
        log.error("%s", _one_line(e))
        return 2
    finally:
        if not out_existed:
            _remove_if_empty(b.out)
        if distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _remove_if_empty(folder: Path) -> None:
    """Remove an output folder this run created and left empty (a build that stopped before writing)."""
    try:
        folder.rmdir()
    except OSError:
        pass


def _discover_items(b: Build) -> tuple[Any, list[Any]]:
    """What this build makes records of: (the discovery, its items), each item a ``samples.RecordItem``: an
    image (a one-frame sample, ``pipeline.WorkItem``) or a training sample (``samples.SampleItem``)."""
    if b.opts.context == "sample":
        found = b.discover_samples()
        if not found.items:
            log.warning("No samples found! %s", json.dumps(found.record))
        return found, found.items
    found = b.discover()
    if not found.items:
        log.warning("No images found! Looked in: %s", ", ".join(map(str, found.looked_in or [b.data_root])))
    return found, [WorkItem(i.key, str(i.path)) for i in found.items]


def _run(b: Build, opts: BuildOptions, started: float, distributed: bool) -> int:
    b.resolve_device()
    found, items = _discover_items(b)
    if not items:
        return 1
    b.stats.total_images = len(items) + len(found.missing)
    with lock_for_rank(b.gid, b.out, b.store if b.remote else None):
        b.salvage_unfinished_shards()
        todo = b.plan(items)
        if todo or not b.adopt_previous_settings():
            b.load_model()
            b.check_settings()
        else:
            log.info("nothing left to build for this rank; the store's settings match (model not loaded)")
        b.prepare_output()  # the first shared write: above, only this rank's own leftovers were touched
        b.write_missing_ledger(found)
        b.record_settings()
        _barrier(distributed)  # every rank has read the store state before anyone writes
        if b.gid == 0:
            log.info("Processing %d %s... (%d already stored, %d ranks, device %s, batch %d, dtype %s)",
                     len(todo) if b.gworld == 1 else len(items), b.unit + "s", b.stats.skipped, b.gworld, b.device,
                     opts.batch_size, dtype_name(b.store_dtype))
        b.bar = None
        if todo:
            b.run_sample_loop(todo) if opts.context == "sample" else b.run_loop(todo)
        if b.device.type == "cuda":
            torch.cuda.synchronize()
        finished = time.time()
        write_part(b.parts, b.gid, b.summary(started, finished), b.closed)
        _barrier(distributed)
        manifest = None
        if b.is_leader:
            if b.gworld > 1 and not distributed:
                wait_for_parts(b.parts, b.gworld)
            manifest = _merge(b)
        if b.remote:
            shutil.rmtree(b.out, ignore_errors=True)  # the local staging folder (every shard is uploaded)
    return _report(b, opts, started, manifest)


SHOW_SOURCES = 20


def _log_discovery(found: Any, data_root: Path, ledger: Path | str) -> None:
    """Say which sources were used, how many images each named, and what was missing or malformed."""
    def rel(p: str) -> str:
        return os.path.relpath(p, data_root) if p.startswith(str(data_root) + os.sep) else p

    if found.scanned:
        log.info("no annotation files (*.jsonl, annotations.json) under %s: scanning it for images", data_root)
    elif found.source_stats:
        how = "found under the data root" if found.auto else "given"
        log.info("using %d source file(s) %s:", len(found.source_stats), how)
        for s in found.source_stats[:SHOW_SOURCES]:
            extra = f", {s.missing} missing" if s.missing else ""
            extra += f", {s.malformed_lines} malformed line(s) skipped" if s.malformed_lines else ""
            log.info("  %s: %d records, %d images%s", rel(s.file), s.records, s.images, extra)
        if len(found.source_stats) > SHOW_SOURCES:
            log.info("  ... and %d more (all listed in the manifest's sources)", len(found.source_stats) - SHOW_SOURCES)
    for bad in found.malformed[:5]:
        log.warning("%s; line skipped (--strict-annotations makes this an error)", bad)
    if len(found.malformed) > 5:
        log.warning("%d malformed annotation lines skipped in all", len(found.malformed))
    if found.missing_refs:
        first = found.missing_refs[0]
        log.warning("%d images named by the sources do not exist (first: %s, named at %s:%d); each is listed with "
                    "the file and line naming it in %s", len(found.missing_refs), first.path, rel(first.file),
                    first.line, ledger)


def _log_sample_discovery(found: Any, ledger: Path | str) -> None:
    """Say where the samples came from and which could not be built for want of a frame."""
    rec = found.record
    if rec.get("method") == "episodes":
        log.info("%d samples from %d episode folders (%d frames; JanusVLN history rule, %d frames%s)", rec["samples"],
                 rec["episodes"], rec["frames"], rec["history"]["frames"], ", front-padded" if rec["history"]["pad"] else "")
    else:
        log.info("using %d annotation file(s):", len(rec["annotations"]))
        for a in rec["annotations"][:SHOW_SOURCES]:
            log.info("  %s: %d records, %d samples%s", a["file"], a["records"], a["samples"],
                     f", {a['missing']} with a missing frame" if a["missing"] else "")
    for bad in found.malformed[:5]:
        log.warning("%s; line skipped (--strict-annotations makes this an error)", bad)
    if found.missing:
        first = found.missing[0]
        log.warning("%d samples name a frame that does not exist (first: %s, named at %s:%d); each is listed with "
                    "its frame in %s", len(found.missing), first["path"], first["annotation"], first["line"], ledger)


def _merge(b: Build) -> dict[str, Any]:
    if b.opts.format == "shards":
        return merge_shard_store(b.store)
    return merge_per_image_store(b.out, per_image_manifest_path(b.data_root, b.cache_root))


def _report(b: Build, opts: BuildOptions, started: float, manifest: dict[str, Any] | None) -> int:
    s = b.stats
    secs = max(time.time() - started, 1e-9)
    if b.gid == 0:
        log.log(25, "Processed %d %ss", s.processed, b.unit)
        where = (f"{b.store.describe(SHARDS_DIR)}/*.tar (index {b.store.describe(INDEX_NAME)})"
                 if opts.format == "shards"
                 else "<image_path>.vggt_cache.pt" + (f" under {b.cache_root}" if b.cache_root else ""))
        log.info("Cache files stored as: %s", where)
        log.info("Summary: processed %d, skipped %d, failed %d, missing %d, stale rebuilt %d | %.1f s, %.2f %ss/s, "
                 "%s written%s", s.processed, s.skipped, s.failed, s.missing, s.stale_rebuilt, secs,
                 s.processed / secs, b.unit, _human(s.bytes_written),
                 f" | batch size used {s.batch_size_used}" if 0 < s.batch_size_used < opts.batch_size else "")
        if s.stage_seconds:
            log.info("Pipeline seconds (main thread waiting for decode / model launch / waiting for the writer; "
                     "writer thread): %s", ", ".join(f"{k} {v:.1f}" for k, v in sorted(s.stage_seconds.items())))
        if manifest is not None and manifest.get("failures_ledger") and s.failed:
            log.warning("%d %ss failed; see %s", s.failed, b.unit, b.store.describe(manifest["failures_ledger"]))
    if s.failed > opts.allow_failures:
        log.error("%d %ss failed (allowed: %d); the exit status is 1. Fix or remove them, or pass "
                  "--allow-failures N", s.failed, b.unit, opts.allow_failures)
        return 1
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


