"""Feature extraction: run the model on a batch of preprocessed images and cut per-image tensors.

This is the only place that knows which tokens of which layers become a record's tensors: ``features``
is the first requested layer, further layers are stored as ``layer_<i>``. Patch tokens only by default
(what JanusVLN feeds its projector), or every token with ``tokens="all"``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from featstore.build.hostcopy import to_host  # noqa: F401 - the build's device-to-host copy, re-exported
from featstore.formats.record import FEATURES
from featstore.model.preprocess import to_unit_float

log = logging.getLogger("featstore")


def tensor_names(layers: tuple[int, ...]) -> list[str]:
    """Record tensor names for non-negative layer indices: ``features`` then ``layer_<i>``."""
    return [FEATURES] + [f"layer_{i}" for i in layers[1:]]


def resolve_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Normalise negative layer indices against ``depth``; reject out-of-range or repeated layers."""
    out = []
    for i in layers:
        j = i + depth if i < 0 else i
        if not 0 <= j < depth:
            raise ValueError(f"layer {i} is out of range for a model with {depth} layers (use -{depth}..{depth - 1})")
        if j in out:
            raise ValueError(f"layer {i} is requested twice (as {j})")
        out.append(j)
    return tuple(out)


@dataclass
class Extractor:
    """Runs a model on ``[B,3,H,W]`` batches and returns ``{name: [B,1,P,C]}`` in the storage dtype."""

    model: torch.nn.Module
    layers: tuple[int, ...]  # non-negative
    store_dtype: torch.dtype
    tokens: str = "patch"
    forward: Callable[..., dict[int, torch.Tensor]] | None = None
    input_dtype: torch.dtype = torch.float32  # the model input's dtype (a precision recipe's; bf16 for "bf16")

    def __post_init__(self) -> None:
        self.names = tensor_names(self.layers)
        if self.forward is None:
            self.forward = self.model

    @torch.inference_mode()
    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features for a batch (float in [0,1], or uint8 = value * 255) on the model's device (call
        :func:`to_host` to copy them out)."""
        assert self.forward is not None
        pixels = images if getattr(self.model, "ignores_pixels", False) else to_unit_float(images).to(self.input_dtype)
        out = self.forward(pixels[:, None], layers=self.layers)
        start = int(getattr(self.model, "patch_start_idx", 5)) if self.tokens == "patch" else 0
        return {n: out[i][:, :, start:].to(self.store_dtype) for n, i in zip(self.names, self.layers)}

    def run_adaptive(self, images: torch.Tensor, max_batch: int) -> tuple[dict[str, torch.Tensor], int]:
        """Like :meth:`run`, but on CUDA out-of-memory halve the chunk size and retry; returns the size that worked."""
        chunk = max(1, min(max_batch, images.shape[0]))
        while True:
            try:
                parts = [self.run(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)]
                return ({n: torch.cat([p[n] for p in parts]) if len(parts) > 1 else parts[0][n] for n in self.names},
                        chunk)
            except torch.cuda.OutOfMemoryError:
                if chunk == 1:
                    raise
                torch.cuda.empty_cache()
                chunk //= 2
                log.warning("CUDA out of memory: retrying with batch size %d", chunk)


def default_store_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it, float16 on older GPUs, float32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def pick_device(requested: str, shown: str | None = None) -> torch.device:
    """The requested device, falling back to CPU with a warning when CUDA is asked for but absent (``shown``
    is how the user set it, e.g. ``--device cuda:0`` or ``DEVICE=cuda:0``)."""
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("%s requested but no CUDA GPU is available: falling back to cpu (slow)",
                    shown or f"device {requested}")
        return torch.device("cpu")
    return dev
