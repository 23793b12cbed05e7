"""VG-LLM's use of VGGT: every frame of a sample through the aggregator in one call (bidirectional global
attention), keeping the chosen layers' tokens of every frame."""

from __future__ import annotations

from typing import Iterable

import torch

from featstore.model.aggregator import VGGTAggregator
from featstore.model.precision import Precision, get_precision

REFERENCE_FRAMES = ("first", "last")
TOKEN_SETS = ("patch", "all")


def _check(model: VGGTAggregator, frames: torch.Tensor, reference_frame: str, tokens: str,
           precision: Precision | None) -> None:
    if frames.dim() not in (4, 5):
        raise ValueError(f"frames must be [S, 3, H, W] or [B, S, 3, H, W], got shape {list(frames.shape)}")
    if reference_frame not in REFERENCE_FRAMES:
        raise ValueError(f"reference_frame {reference_frame!r}: expected one of {', '.join(REFERENCE_FRAMES)}")
    if tokens not in TOKEN_SETS:
        raise ValueError(f"tokens {tokens!r}: expected one of {', '.join(TOKEN_SETS)}")
    if precision is not None and model.camera_token.dtype != precision.weights_dtype:
        raise ValueError(f"precision {precision.name!r} needs {precision.weights_dtype} weights, the model holds "
                         f"{model.camera_token.dtype}: call get_precision({precision.name!r}).prepare(model) first")


def joint_features(model: VGGTAggregator, frames: torch.Tensor, layers: int | Iterable[int] = (-2,),
                   reference_frame: str = "first", tokens: str = "patch",
                   precision: str | Precision | None = None) -> dict[int, torch.Tensor]:
    """{layer: features} for one joint call over all frames; layers keyed by non-negative index, as `model`.

    `frames` [S,3,H,W] gives [S, N, C] per layer, [B,S,3,H,W] gives [B, S, N, C]; N = h*w patch tokens
    (`tokens="patch"`) or every token (`"all"`). `reference_frame="last"` flips the frames before the call and
    the features back after (VG-LLM), so index i stays input frame i. `precision` (a recipe name, the model
    already prepared with it) casts the input and runs the call under the recipe's autocast.
    """
    recipe = None if precision is None else get_precision(precision)
    _check(model, frames, reference_frame, tokens, recipe)
    batched = frames.dim() == 5
    x = frames if batched else frames[None]
    if reference_frame == "last":
        x = torch.flip(x, dims=(1,))
    if recipe is not None:
        x = recipe.cast_input(x)
    with torch.no_grad():
        if recipe is None:
            out = model(x, layers=layers)
        else:
            with recipe.autocast(x.device):
                out = model(x, layers=layers)
    start = model.patch_start_idx if tokens == "patch" else 0
    result = {}
    for i, t in out.items():
        t = t[:, :, start:]
        if reference_frame == "last":
            t = torch.flip(t, dims=(1,))
        result[i] = t if batched else t[0]
    return result
