"""``featstore build``: discover images or training samples, run VGGT in a pipelined loop, write a store.

This module orchestrates; each step has its own module: the rank, device and model (:mod:`.setup`), the
settings records get (:mod:`.settings`), what is built (:mod:`.discovery`), resume planning (:mod:`.resume`),
the output (:mod:`.output`), counts and failures (:mod:`.ledger`), the loops (:mod:`.image_loop`,
:mod:`.sample_loop`), the end (:mod:`.summary`). Order of work for one process (a torchrun rank or a ``--part``
of a job array), as :func:`run_build` runs it:

1. check options, environment, data root and output folder (exit 2 with one line, nothing written);
2. discover images (or training samples, ``--context sample``) and take this rank's lock;
3. keep the complete records of this rank's unfinished shard (a crash's leftovers), then plan: this rank's
   share (crc32 of the key, or of a sample's first streamed frame, modulo the world size) minus what is
   stored plus, with ``--rebuild-stale``, what is stale;
4. load the model (a missing checkpoint is exit 2, never random weights) and refuse a store built with other
   settings (formats.manifest.BuildSettings); with nothing left to build and matching recorded settings, skip
   loading it;
5. the first writes: create the output (removing dead writers' temporary files), the missing-images ledger
   and ``build.json``; then wait for every rank;
6. decode in DataLoader workers -> shape-bucketed batches (or the context plan's steps) -> model ->
   background encode + write;
7. leave part files; rank 0 waits for every rank, then merges index and manifest.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from featstore.build.discovery import Found, discover_items
from featstore.build.image_loop import run_image_loop
from featstore.build.joint_loop import run_joint_loop
from featstore.build.ledger import Ledger, RunStats, write_missing_ledger
from featstore.build.locks import lock_for_rank
from featstore.build.merge import merge_per_image_store, merge_shard_store, per_image_manifest_path, wait_for_parts, write_part
from featstore.build.options import BuildOptions, check_build_options, check_output_writable, shown
from featstore.build.output import Output
from featstore.build.pipeline import DecodeOptions
from featstore.build.resume import check_compatible, plan_resume, previous_settings, rank_share, reusable_settings
from featstore.build.sample_loop import frame_sizes, run_sample_loop
from featstore.build.settings import precision_of, requested_settings
from featstore.build.setup import (Rank, barrier, compute_context, layers_of, load_model, model_path_problem,
                                   resolve_device, setup_distributed, store_dtype_of)
from featstore.build.summary import part_summary, report
from featstore.errors import FeatstoreError, OptionError
from featstore.formats.manifest import BuildSettings
from featstore.formats.record import dtype_name

log = logging.getLogger("featstore")
__all__ = ["Build", "BuildOptions", "run_build"]


class Build:
    """One process's build: its options, rank, output, ledger, model and the settings its records get."""

    def __init__(self, opts: BuildOptions):
        self.opts = opts
        self.rank = Rank.of(opts)
        self.gid, self.gworld = self.rank.gid, self.rank.gworld
        self.unit = "image" if opts.context == "image" else "sample"  # what one record is
        self.data_root = Path(opts.data_root).resolve()
        self.output = Output(opts, self.data_root, self.gid)
        self.out = self.output.out
        self.ledger = Ledger(self.unit, show_progress=opts.progress and self.gid == 0)
        self.stats: RunStats = self.ledger.stats
        self.done_before = 0
        self.discovery_record: dict[str, Any] | None = None
        self.missing_examples: list[str] = []
        self.missing_ledger: str | None = None
        self.device: torch.device | None = None
        self.first_image: str | None = None  # a local image of the work: the compile warm-up's shape
        self.compile_report: Any = None
        # set by load_model (or, with nothing left to build, by adopt_previous_settings)
        self.model: Any = None
        self.extractor: Any = None
        self.layers: tuple[int, ...] = ()
        self.store_dtype: torch.dtype | None = None
        self._settings: BuildSettings | None = None

    def resolve_device(self) -> torch.device:
        """This rank's device (see setup.resolve_device), resolved once."""
        if self.device is None:
            self.device = resolve_device(self.opts, self.rank)
        return self.device

    def load_model(self, model: torch.nn.Module | None = None) -> None:
        """Load the model on this rank's device (or adopt an already loaded one); settle dtype and layers."""
        s = load_model(self.opts, self.resolve_device(), model, self.first_image)
        self.model, self.extractor, self.layers, self.store_dtype = s.model, s.extractor, s.layers, s.store_dtype
        self.compile_report = s.compile_report

    def adopt_previous_settings(self) -> bool:
        """When nothing is left to build, reuse the store's recorded settings instead of loading the model, if
        the request matches them; any difference loads the model and is checked against the store as usual."""
        prev = previous_settings(self.output.target)
        try:
            layers = layers_of(self.opts, int(((prev.model if prev else {}) or {})["config"]["depth"]))
        except (OptionError, KeyError, TypeError, ValueError):
            return False
        dtype = store_dtype_of(self.opts, self.resolve_device())
        carried = reusable_settings(prev, requested_settings(self.opts, self.device, layers, dtype))
        if carried is None:
            return False
        self._settings, self.store_dtype, self.layers = carried, dtype, layers
        return True

    def settings(self) -> BuildSettings:
        """The settings every record this run writes shares (checked on resume and merge)."""
        if self._settings is None:
            self._settings = requested_settings(self.opts, self.resolve_device(), self.layers, self.store_dtype,
                                                self.model)
        return self._settings

    def check_settings(self) -> None:
        """Refuse to resume into a store whose records were built with settings that change the numbers."""
        if self.opts.skip_existing:
            check_compatible(previous_settings(self.output.target), self.settings(), self.output.where)

    def compute_context(self) -> Any:
        """The context every model call runs in: the precision recipe's autocast, or one that does nothing."""
        return compute_context(precision_of(self.opts, self.resolve_device()), self.resolve_device())

    def decode_options(self) -> DecodeOptions:
        """How this build decodes and preprocesses every image."""
        o = self.opts
        return DecodeOptions(o.preprocess, o.image_size, o.apply_exif, o.hash_inputs, o.max_pixels)

    def prepare_output(self) -> None:
        """Create the output (the first shared write)."""
        self.output.prepare()

    def discover(self) -> Found:
        """The images or samples to build; rank 0 counts and logs what is missing or malformed."""
        found = discover_items(self.opts, self.data_root, self.output.folders(), self.output.missing_ledger_where(),
                               talk=self.gid == 0)
        self.discovery_record, self.missing_examples = found.record, found.missing_examples
        if self.gid == 0:
            self.stats.missing, self.stats.malformed = found.missing, found.malformed
        return found

    def plan(self, items: list[Any]) -> list[Any]:
        """This rank's items still to build (featstore.build.resume): its share, minus what is stored, plus what
        is stale with --rebuild-stale."""
        p = plan_resume(self.output.target, rank_share(items, self.gid, self.gworld), self.opts.skip_existing,
                        self.opts.rebuild_stale)
        self.stats.skipped += p.skipped
        self.stats.stale_rebuilt += p.stale
        self.done_before = self.stats.skipped
        return p.todo

    def run_loop(self, todo: list[Any]) -> None:
        """Build one record per image of ``todo`` (featstore.build.image_loop)."""
        run_image_loop(self, todo)

    def run_sample_loop(self, todo: list[Any]) -> None:
        """Build one record per training sample of ``todo`` (featstore.build.sample_loop)."""
        run_sample_loop(self, todo)

    def run_joint_loop(self, todo: list[Any]) -> None:
        """Build one record per training sample of ``todo``, its frames in one call (featstore.build.joint_loop)."""
        run_joint_loop(self, todo)

    def frame_sizes(self, todo: list[Any]) -> tuple[list[Any], dict[str, tuple[int, int]]]:
        """The samples whose frames share one readable size, and each frame's size."""
        return frame_sizes(self, todo)


def _check_inputs(opts: BuildOptions) -> Build:
    """Every check that needs neither the model nor the images, before anything is read or written."""
    check_build_options(opts)
    if model_path_problem(opts.model) is not None:
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
    distributed = setup_distributed(b.rank.dist.world_size)
    out_existed = b.out.exists()
    try:
        return _run(b, started, distributed)
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


def first_local_image(todo: list[Any]) -> str | None:
    """The first work item's (first) image path, if it is a local file."""
    if not todo:
        return None
    path = getattr(todo[0], "path", None) or next(iter(getattr(todo[0], "paths", None) or ()), None)
    return path if isinstance(path, str) and os.path.isfile(path) else None


def _run(b: Build, started: float, distributed: bool) -> int:
    b.resolve_device()
    found = b.discover()
    if not found.items:
        return 1
    b.stats.total_images = len(found.items) + found.missing
    with lock_for_rank(b.gid, b.out, b.output.store if b.output.remote else None):
        b.output.salvage()
        todo = b.plan(found.items)
        if todo or not b.adopt_previous_settings():
            b.first_image = first_local_image(todo)
            b.load_model()
            b.check_settings()
        else:
            log.info("nothing left to build for this rank; the store's settings match (model not loaded)")
        b.prepare_output()  # the first shared write: above, only this rank's own leftovers were touched
        if b.gid == 0:
            b.missing_ledger = write_missing_ledger(b.output, found.discovery)
        b.output.record_settings(b.settings(), b.data_root, b.rank.is_leader)
        barrier(distributed)  # every rank has read the store state before anyone writes
        _run_loop(b, todo, len(found.items))
        write_part(b.output.parts, b.gid, part_summary(b, started, time.time()), b.output.closed)
        barrier(distributed)
        manifest = _merge(b, distributed) if b.rank.is_leader else None
        if b.output.remote:
            shutil.rmtree(b.out, ignore_errors=True)  # the local staging folder (every shard is uploaded)
    return report(b, started, manifest)


def _run_loop(b: Build, todo: list[Any], found: int) -> None:
    """Say what is built, then build it with the image or the sample loop."""
    if b.gid == 0:
        log.info("Processing %d %s... (%d already stored, %d ranks, device %s, batch %d, dtype %s)",
                 len(todo) if b.gworld == 1 else found, b.unit + "s", b.stats.skipped, b.gworld, b.device,
                 b.opts.batch_size, dtype_name(b.store_dtype))
    if todo:
        {"image": b.run_loop, "sample": b.run_sample_loop, "joint": b.run_joint_loop}[b.opts.context](todo)
    if b.device.type == "cuda":
        torch.cuda.synchronize()


def _merge(b: Build, distributed: bool) -> dict[str, Any]:
    if b.gworld > 1 and not distributed:
        wait_for_parts(b.output.parts, b.gworld)
    if b.opts.format == "shards":
        return merge_shard_store(b.output.store)
    return merge_per_image_store(b.out, per_image_manifest_path(b.data_root, b.output.cache_root))
