"""Multi-head self-attention with fused qkv, optional q/k LayerNorm, optional 2D RoPE and a KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featstore.model.layers.rope import RopeTables, apply_rope

KV = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Self-attention over [B, N, C] tokens using `F.scaled_dot_product_attention` (scale 1/sqrt(head_dim))."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _qkv(self, x: torch.Tensor, rope: RopeTables | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return q, k, v

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of all tokens to all tokens (or as `attn_mask`, True = may attend, allows)."""
        q, k, v = self._qkv(x, rope)
        return self._out(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))

    def forward_cached(self, x: torch.Tensor, rope: RopeTables | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        """Attention of the new tokens `x` to the cached keys/values plus themselves; returns the grown cache.

        Cached keys are stored after q/k-norm and RoPE. That equals re-applying both to raw cached keys
        (JanusVLN) because both act per token and every frame of a stream has the same positions.
        """
        q, k, v = self._qkv(x, rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        return self._out(F.scaled_dot_product_attention(q, k, v)), (k, v)
