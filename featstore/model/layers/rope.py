"""2D rotary position embedding (VGGT flavour): first half of head_dim rotated by row, second by column."""

from __future__ import annotations

import torch
from torch import nn


def rope_angles(grid_h: int, grid_w: int, head_dim: int, freq: float, num_special: int,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Rotation angles [num_special + grid_h*grid_w, head_dim], float32, for one frame's tokens.

    Patch (y, x) in row-major order sits at position (y+1, x+1); the special tokens sit at (0, 0),
    which is no rotation. Within each half of size d, inv_freq_j = freq^(-2j/d), angles duplicated.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    d = head_dim // 2
    inv_freq = 1.0 / (freq ** (torch.arange(0, d, 2, device=device).float() / d))
    zeros = torch.zeros(num_special, device=device, dtype=torch.float32)
    ys = torch.arange(grid_h, device=device, dtype=torch.float32).repeat_interleave(grid_w) + 1
    xs = torch.arange(grid_w, device=device, dtype=torch.float32).repeat(grid_h) + 1
    ang_y = torch.cat([zeros, ys])[:, None] * inv_freq[None, :]
    ang_x = torch.cat([zeros, xs])[:, None] * inv_freq[None, :]
    return torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)


def cos_sin(angles: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of `angles` taken in `dtype`: the angles are cast first, as the reference does
    (in bf16 an angle of 27 is rounded to a multiple of 0.125 before its cosine is taken)."""
    a = angles.to(dtype)
    return a.cos(), a.sin()


class RopeTables:
    """One frame's RoPE angles; the cos/sin tables are made in the dtype of the tensor they rotate
    (q/k follow autocast and the weights' dtype), once per dtype unless `memo` is None."""

    def __init__(self, angles: torch.Tensor, memo: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        self.angles = angles
        self._memo = memo

    def for_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [P, head_dim] in `dtype`."""
        if self._memo is None:
            return cos_sin(self.angles, dtype)
        hit = self._memo.get(dtype)
        if hit is None:
            hit = self._memo[dtype] = cos_sin(self.angles, dtype)
        return hit


def _rotate_halves(t: torch.Tensor) -> torch.Tensor:
    """Within the row half and the column half separately: [t1, t2] -> [-t2, t1]."""
    q = t.unflatten(-1, (2, 2, t.shape[-1] // 4))
    return torch.stack((-q[..., 1, :], q[..., 0, :]), dim=-2).flatten(-3)


def apply_rope(t: torch.Tensor, tables: RopeTables) -> torch.Tensor:
    """Rotate `t` [..., N, D] where N is a whole number of frames of P tokens (tables are [P, D]),
    with tables in t's dtype."""
    cos, sin = tables.for_dtype(t.dtype)
    p = cos.shape[0]
    n = t.shape[-2]
    if n != p:  # several frames concatenated (global attention): broadcast the per-frame table
        t = t.unflatten(-2, (n // p, p))
        out = t * cos + _rotate_halves(t) * sin
        return out.flatten(-3, -2)
    return t * cos + _rotate_halves(t) * sin


class RotaryEmbedding2D(nn.Module):
    """Builds (and caches, outside torch.compile) the per-frame RoPE tables for a patch grid."""

    def __init__(self, head_dim: int, freq: float = 100.0, num_special: int = 5) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.freq = freq
        self.num_special = num_special
        self._cache: dict[tuple, RopeTables] = {}

    def tables(self, grid_h: int, grid_w: int, device: torch.device) -> RopeTables:
        """The tables of a grid_h x grid_w frame; cos/sin come in whichever dtype q/k have at the call."""
        if torch.compiler.is_compiling():
            # A plain computation compiles to a tiny constant-like kernel; a dict cache would add guards.
            return RopeTables(rope_angles(grid_h, grid_w, self.head_dim, self.freq, self.num_special, device), None)
        key = (grid_h, grid_w, str(device))
        hit = self._cache.get(key)
        if hit is None:
            angles = rope_angles(grid_h, grid_w, self.head_dim, self.freq, self.num_special, device)
            hit = RopeTables(angles, {})
            if len(self._cache) > 32:
                self._cache.clear()
            self._cache[key] = hit
        return hit
