"""``--model null``: a stand-in for VGGT that returns correctly shaped outputs at no cost, so a build (or
``benchmarks/build_bench.py --model null``) measures everything but the model: decode, batching, the
device copies, encode and write.

Its outputs are those of VGGT-1B (``[B, S, 5 + patches, 2048]`` per requested layer, bfloat16 by default) and
hold feature-like values (normal, per-channel scales spread over two decades), so zstd and int8 cost what
they cost on real features. Every image gets the same values: a store built with it is for measurement
only, and its model fingerprint (``null``) keeps it from mixing with real features.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from featstore.model.config import VGGTConfig, get_config
from featstore.model.precision import Precision

log = logging.getLogger("featstore")
NULL_MODEL = "null"


class NullModel(torch.nn.Module):
    """Outputs of the VGGT-1B shapes without computing anything: one buffer per token count, returned as a
    broadcast view for every batch (no per-batch allocation, copy or kernel)."""

    ignores_pixels = True  # the extractor hands it the batch as decoded (no conversion to float)

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.bfloat16,
                 config: VGGTConfig | None = None):
        super().__init__()
        self.config = dataclasses.replace(config or get_config("vggt-1b"), name=NULL_MODEL)
        self.fingerprint, self.source = NULL_MODEL, NULL_MODEL
        self.patch_start_idx = self.config.patch_start_idx
        self.device, self.dtype = torch.device(device), dtype
        self._values: dict[int, torch.Tensor] = {}

    def values(self, tokens: int) -> torch.Tensor:
        """The ``[tokens, 2 * embed_dim]`` output every frame with ``tokens`` tokens gets (made once)."""
        if tokens not in self._values:
            g = torch.Generator().manual_seed(tokens)
            channels = self.config.output_dim
            scale = torch.logspace(-1, 1, channels)[torch.randperm(channels, generator=g)]
            x = torch.randn(tokens, channels, generator=g) * scale
            self._values[tokens] = x.to(self.device, self.dtype)
        return self._values[tokens]

    def forward(self, images: torch.Tensor, layers: tuple[int, ...] = (-1,)) -> dict[int, torch.Tensor]:
        """``{layer: [B, S, tokens, 2 * embed_dim]}`` for ``[B, S, 3, H, W]`` images (H, W multiples of the patch)."""
        b, s, _, h, w = images.shape
        p = self.config.patch_size
        out = self.values(self.patch_start_idx + (h // p) * (w // p))
        view = out.expand(b, s, *out.shape)
        return {i: view for i in layers}


def load_null_model(device: torch.device | str, dtype: torch.dtype | None = None) -> NullModel:
    """The stand-in model on ``device`` (outputs in ``dtype``, default bfloat16), with a warning that its
    features are not VGGT's."""
    log.warning("--model null: a stand-in that returns constant feature-like values at no cost (for "
                "measuring the pipeline; the store holds no real features)")
    return NullModel(torch.device(device), dtype or torch.bfloat16)


def load_model(name: str, device: torch.device, precision: Precision, store_dtype: torch.dtype) -> torch.nn.Module:
    """The build's model: the stand-in for ``null`` (its outputs already in the storage dtype, so the build
    converts nothing), else :func:`featstore.model.load_vggt`."""
    if name == NULL_MODEL:
        return load_null_model(device, store_dtype)
    from featstore.model import load_vggt

    return load_vggt(name, device=str(device), precision=precision)
