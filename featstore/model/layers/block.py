"""Pre-norm transformer block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

from __future__ import annotations

import torch
from torch import nn

from featstore.model.layers.attention import KV, Attention
from featstore.model.layers.layer_scale import LayerScale
from featstore.model.layers.mlp import Mlp
from featstore.model.layers.rope import RopeTables


class Block(nn.Module):
    """One transformer block with LayerScale on both residual branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float = 1e-5,
                 qk_norm: bool = False, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm,
                              norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values)

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope, attn_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_cached(self, x: torch.Tensor, rope: RopeTables | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        """Like `forward`, but attention also sees the cached keys/values; returns the grown cache."""
        a, kv = self.attn.forward_cached(self.norm1(x), rope, past)
        x = x + self.ls1(a)
        return x + self.ls2(self.mlp(self.norm2(x))), kv
