"""A build process's place and tools: its rank in the job, its device, and the loaded model with the extractor
that cuts records' tensors from its output."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from featstore.build.extract import Extractor, default_store_dtype, pick_device, resolve_layers
from featstore.build.options import BuildOptions, shown
from featstore.build.nullmodel import NULL_MODEL, load_model as load_build_model
from featstore.constants import NAMED_MODELS
from featstore.build.settings import precision_of
from featstore.errors import OptionError
from featstore.formats.record import parse_dtype
from featstore.model.precision import Precision
from featstore.runtime.env import DistEnv, dist_env

log = logging.getLogger("featstore")



@dataclass(frozen=True)
class Rank:
    """Where this process stands in the job: torchrun's environment and the global id over job-array parts."""

    dist: DistEnv
    gid: int  # part * world_size + rank
    gworld: int  # num_parts * world_size
    is_leader: bool  # merges the store after every rank finished (a single-part job's rank 0)

    @classmethod
    def of(cls, opts: BuildOptions) -> "Rank":
        """This process's rank (from the torchrun variables and ``--part``)."""
        d = dist_env()
        gid = opts.part * d.world_size + d.rank
        return cls(d, gid, opts.num_parts * d.world_size, gid == 0 and opts.num_parts == 1)


def setup_distributed(world: int) -> bool:
    """Join the torchrun process group (gloo, for a handful of barriers: builds can take days)."""
    if world <= 1 or not torch.distributed.is_available():
        return False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=timedelta(days=7))
    return True


def barrier(distributed: bool) -> None:
    """Wait for every rank (a no-op without a process group)."""
    if distributed:
        torch.distributed.barrier()


def model_path_problem(model: str) -> str | None:
    """The ``--model`` value when it names neither a built-in model nor an existing path."""
    return None if model in NAMED_MODELS or model == NULL_MODEL or Path(model).exists() else model


def resolve_device(opts: BuildOptions, rank: Rank) -> torch.device:
    """This rank's device: the requested one (cuda:LOCAL_RANK under torchrun), or cpu when CUDA is absent."""
    dev = pick_device(opts.device, shown(opts, "device"))
    if dev.type == "cuda" and rank.dist.world_size > 1:
        dev = torch.device("cuda", rank.dist.local_rank)
    elif dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)  # set_device and per-rank logic need an explicit index
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def store_dtype_of(opts: BuildOptions, device: torch.device) -> torch.dtype:
    """The dtype records are stored in: ``--dtype``, else the device's default."""
    return parse_dtype(opts.dtype) if opts.dtype else default_store_dtype(device)


def layers_of(opts: BuildOptions, depth: int) -> tuple[int, ...]:
    """``--layers`` as non-negative indices of a model ``depth`` layers deep (OptionError naming the flag)."""
    try:
        return resolve_layers(tuple(opts.layers), depth)
    except ValueError as e:
        raise OptionError(f"{shown(opts, 'layers')}: {e}") from None


@dataclass
class ModelSetup:
    """The loaded model on this rank's device and the extractor of records' tensors."""

    model: Any
    extractor: Extractor
    layers: tuple[int, ...]
    store_dtype: torch.dtype
    precision: Precision
    compile_report: Any = None


def warmup_shapes(opts: BuildOptions, first_image: str | None) -> list[tuple[int, ...]]:
    """[B, 1, 3, H, W] shapes of the first batch (`first_image`'s preprocessed size); for --context sample also
    B-1 and 1, so the batch dimension turns dynamic in the warm-up, not at the first short step."""
    if first_image is None:
        return []
    from PIL import Image

    from featstore.model.preprocess import preprocessed_size

    try:
        with Image.open(first_image) as im:
            h, w = preprocessed_size(im.width, im.height, opts.preprocess, opts.image_size)
    except (OSError, ValueError):
        return []  # no warm-up: the first batch compiles
    b = opts.batch_size
    sizes = {b, max(1, b - 1), 1} if opts.context == "sample" else {b}
    return [(n, 1, 3, h, w) for n in sorted(sizes, reverse=True)]


def compile_model(opts: BuildOptions, model: Any, layers: tuple[int, ...], device: torch.device,
                  first_image: str | None, recipe: Precision) -> Any:
    """``--compile`` (auto: on for CUDA): the blocks compiled in place and warmed up (featstore.model.compile)."""
    from featstore.model.compile import CompileReport, prepare_compiled

    if opts.model == NULL_MODEL:
        return CompileReport(False, "stand-in model")
    report = prepare_compiled(model, opts.compile, warmup_shapes(opts, first_image), layers, recipe.input_dtype,
                              compute_context(recipe, device), stream=opts.context == "sample")
    log.info("%s", report.line())
    return report


def load_model(opts: BuildOptions, device: torch.device, model: torch.nn.Module | None = None,
               first_image: str | None = None) -> ModelSetup:
    """Load the model on ``device`` (or adopt an already loaded one); settle dtype and layers; compile it as
    ``--compile`` says (warmed up at `first_image`'s shape when given)."""
    if opts.model == NULL_MODEL and opts.context != "image":
        raise OptionError(f"{shown(opts, 'model')}: the stand-in model has no streaming steps; use it with "
                          f"--context image, or pass a VGGT checkpoint")
    recipe = precision_of(opts, device)
    store_dtype = store_dtype_of(opts, device)
    model = model if model is not None else load_build_model(opts.model, device, recipe, store_dtype)
    layers = layers_of(opts, int(model.config.depth))
    report = compile_model(opts, model, layers, device, first_image, recipe)
    extractor = Extractor(model, layers, store_dtype, opts.tokens, input_dtype=recipe.input_dtype)
    return ModelSetup(model, extractor, layers, store_dtype, recipe, report)


def compute_context(recipe: Precision, device: torch.device) -> Any:
    """The context every model call of the recipe runs in (autocast, or one that does nothing)."""
    return recipe.autocast(device)
