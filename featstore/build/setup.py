"""A build process's place and tools: its rank in the job, its device, and the loaded model with the extractor
that cuts records' tensors from its output."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from featstore.build.extract import Extractor, autocast_dtype, default_store_dtype, pick_device, resolve_layers
from featstore.build.options import BuildOptions, shown
from featstore.constants import NAMED_MODELS
from featstore.errors import OptionError
from featstore.formats.record import parse_dtype
from featstore.runtime.env import DistEnv, dist_env



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
    return None if model in NAMED_MODELS or Path(model).exists() else model


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


def load_model(opts: BuildOptions, device: torch.device, model: torch.nn.Module | None = None) -> ModelSetup:
    """Load the model on ``device`` (or adopt an already loaded one); settle dtype and layers."""
    from featstore.model import load_vggt

    dtype = torch.float32 if opts.autocast else None  # None: bf16 on GPUs with bf16, else fp32
    model = model if model is not None else load_vggt(opts.model, device=str(device), dtype=dtype)
    layers = layers_of(opts, int(model.config.depth))
    store_dtype = store_dtype_of(opts, device)
    forward = torch.compile(model) if opts.compile else None
    return ModelSetup(model, Extractor(model, layers, store_dtype, opts.tokens, forward), layers, store_dtype)


def compute_context(opts: BuildOptions, device: torch.device) -> Any:
    """The autocast context of every model call (``--autocast``), or a context that does nothing."""
    if not opts.autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=autocast_dtype(device))
