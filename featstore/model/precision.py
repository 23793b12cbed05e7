"""Precision recipes: how a trainer runs the frozen VGGT (weights' dtype, input dtype, autocast).

A recipe is applied to a model loaded in float32 (``load_vggt(..., dtype=torch.float32)``): ``prepare``
casts it, ``cast_input`` casts the float32 images in [0, 1] the data loader gives, and ``autocast`` is
the context every forward runs in. See docs/model.md, "Precision recipes".
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, TypeVar

import torch
from torch import nn

from featstore.errors import OptionError

M = TypeVar("M", bound=nn.Module)

#: The recipe the legacy ``--autocast`` flag stands for.
LEGACY_AUTOCAST = "amp"
#: The recipe used when none is asked for.
DEFAULT_PRECISION = "fp32"


def autocast_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype the trainers' autocast uses: bfloat16, or float16 on CUDA GPUs without bf16 (as JanusVLN's and
    VG-LLM's code choose: compute capability < 8)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@dataclass(frozen=True)
class Precision:
    """One recipe: `name` (recorded in manifests), the dtype of weights and floating buffers, of the model
    input, and whether the forward runs under autocast."""

    name: str
    weights_dtype: torch.dtype
    input_dtype: torch.dtype
    uses_autocast: bool
    reproduces: str  # one line for --help and docs

    def prepare(self, model: M) -> M:
        """Cast `model` in place (parameters and floating buffers, as ``module.bfloat16()``) and return it.

        The fp32 recipes need float32 weights: a model loaded in another dtype is refused, since casting
        it up would not restore the checkpoint's values.
        """
        if self.weights_dtype == torch.float32:
            wrong = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
            if wrong:
                raise OptionError(f"precision {self.name!r} needs float32 weights, but the model holds {wrong}: "
                                  "load it with dtype=torch.float32 (load_vggt(..., dtype=torch.float32)).")
            return model
        return model.to(self.weights_dtype)

    def cast_input(self, images: torch.Tensor) -> torch.Tensor:
        """The model input: float images in [0, 1] (computed in float32, e.g. u8/255) cast to `input_dtype`."""
        if not images.is_floating_point():
            raise ValueError(f"cast_input takes float images in [0, 1], got {images.dtype}: divide uint8 by 255 "
                             "in float32 first")
        return images.to(self.input_dtype)

    def autocast(self, device: torch.device | str) -> ContextManager:
        """The context every forward of this recipe runs in: ``torch.autocast`` (see `autocast_dtype`) or none."""
        if not self.uses_autocast:
            return contextlib.nullcontext()
        dev = torch.device(device)
        return torch.autocast(dev.type, dtype=autocast_dtype(dev))

    def compute_name(self, device: torch.device | str) -> str:
        """How the model computes on `device`, e.g. ``bf16-weights+autocast-bfloat16`` (for logs and manifests)."""
        weights = str(self.weights_dtype).removeprefix("torch.")
        if not self.uses_autocast:
            return f"{weights}-weights"
        return f"{weights}-weights+autocast-{str(autocast_dtype(device)).removeprefix('torch.')}"


_RECIPES = (
    Precision("fp32", torch.float32, torch.float32, False,
              "float32 weights and input, no autocast (official VGGT; exact reference)"),
    Precision("bf16", torch.bfloat16, torch.bfloat16, False,
              "weights, buffers and input in bfloat16, no autocast (pure-bf16 trainers)"),
    Precision("amp", torch.float32, torch.float32, True,
              "float32 weights under torch.autocast bf16 (plain PyTorch AMP; the old --autocast)"),
    Precision("deepspeed-bf16", torch.bfloat16, torch.float32, True,
              "every parameter and floating buffer in bf16 (DeepSpeed's bf16 engine), float32 input, forward "
              "under autocast bf16 (JanusVLN's and VG-LLM's training scripts)"),
)
PRECISIONS: dict[str, Precision] = {p.name: p for p in _RECIPES}
PRECISION_NAMES: tuple[str, ...] = tuple(PRECISIONS)


def get_precision(name: str | Precision, shown: str = "precision") -> Precision:
    """The recipe called `name`; OptionError naming the valid ones (`shown`: how the user set it, e.g.
    ``--precision``)."""
    if isinstance(name, Precision):
        return name
    try:
        return PRECISIONS[name]
    except (KeyError, TypeError):
        raise OptionError(f"{shown} {name!r} is not a precision recipe: expected one of "
                          f"{', '.join(PRECISION_NAMES)}") from None


def resolve_precision(precision: str | None, autocast: bool | None = None, shown: str = "--precision",
                      default: str = DEFAULT_PRECISION) -> Precision:
    """The recipe from ``--precision`` and the legacy ``--autocast`` / ``--no-autocast`` (True / False / None
    when not given): ``--autocast`` alone is ``amp``; contradicting settings raise OptionError."""
    if precision is None:
        return get_precision(LEGACY_AUTOCAST if autocast else default, shown)
    recipe = get_precision(precision, shown)
    if autocast is not None and autocast != recipe.uses_autocast:
        flag = "--autocast" if autocast else "--no-autocast"
        raise OptionError(f"{flag} contradicts {shown} {precision}: {recipe.name} runs "
                          f"{'under' if recipe.uses_autocast else 'without'} autocast; drop {flag} "
                          f"(--autocast is the old spelling of {shown} {LEGACY_AUTOCAST})")
    return recipe
