"""DINOv2 ViT with register tokens, used as VGGT's patch embedding (returns normalised patch tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from featstore.model.layers.block import Block
from featstore.model.layers.patch_embed import PatchEmbed


class DinoVisionTransformer(nn.Module):
    """Conv patchify, cls token + resized position embedding, register tokens, pre-norm blocks, final norm."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float, num_register_tokens: int, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, init_values: float = 1.0,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.pos_grid = img_size // patch_size
        # Parameter registration order fixes the state_dict order (matches the official ViT).
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid ** 2, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # unused at inference; kept for the keys
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, ffn_bias=ffn_bias,
                  init_values=init_values, qk_norm=False, norm_eps=norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[1, 1 + grid_h*grid_w, C]: cls position unchanged, patch part bicubic-resized (antialias, float32),
        cast to `dtype` (the tokens' dtype, as the official ViT does; default the weights' dtype)."""
        if grid_h == self.pos_grid and grid_w == self.pos_grid:
            return self.pos_embed
        pe = self.pos_embed.float()
        m, c = self.pos_grid, pe.shape[-1]
        patch = pe[:, 1:].reshape(1, m, m, c).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(grid_h, grid_w), mode="bicubic", antialias=True)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, c)
        return torch.cat([pe[:, :1], patch], dim=1).to(self.pos_embed.dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] (already normalised) -> normalised patch tokens [N, (H/p)*(W/p), C]."""
        _, _, h, w = x.shape
        tokens = self.patch_embed(x)
        n = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), tokens], dim=1)
        tokens = tokens + self.position_embedding(h // self.patch_size, w // self.patch_size, tokens.dtype)
        tokens = torch.cat([tokens[:, :1], self.register_tokens.expand(n, -1, -1), tokens[:, 1:]], dim=1)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)[:, 1 + self.num_register_tokens:]
