"""VGGTAggregator: DINOv2 patch embedding + alternating frame / global attention blocks."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from featstore.model.config import VGGTConfig
from featstore.model.layers import Block, DinoVisionTransformer, RotaryEmbedding2D
from featstore.model.layers.rope import RopeTables
from featstore.model.stream import StreamCache

_RESNET_MEAN = (0.485, 0.456, 0.406)
_RESNET_STD = (0.229, 0.224, 0.225)


class VGGTAggregator(nn.Module):
    """The VGGT aggregator. `model(images, layers)` returns {layer: [B, S, P, 2C]} for the requested layers.

    Tokens per frame are [camera (1), registers (R), patches]; frame 0 of each sequence uses the first
    camera/register token slot, later frames the second. Layer i output = cat(frame block i output,
    global block i output). Attributes `fingerprint` and `source` are set by `load_vggt`.
    """

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_size = c.patch_size
        self.patch_start_idx = c.patch_start_idx
        self.depth = c.depth
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        self.patch_embed = DinoVisionTransformer(
            img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, embed_dim=c.embed_dim,
            depth=c.dino_depth, num_heads=c.dino_num_heads, mlp_ratio=c.dino_mlp_ratio,
            num_register_tokens=c.dino_num_register_tokens, qkv_bias=c.qkv_bias, proj_bias=c.proj_bias,
            ffn_bias=c.ffn_bias, init_values=c.dino_init_values, norm_eps=c.dino_norm_eps)
        self.rope = RotaryEmbedding2D(c.head_dim, c.rope_freq, c.patch_start_idx)

        def make_block() -> Block:
            return Block(c.embed_dim, c.num_heads, c.mlp_ratio, qkv_bias=c.qkv_bias, proj_bias=c.proj_bias,
                         ffn_bias=c.ffn_bias, init_values=c.init_values, qk_norm=c.qk_norm, norm_eps=c.norm_eps)

        self.frame_blocks = nn.ModuleList(make_block() for _ in range(c.depth))
        self.global_blocks = nn.ModuleList(make_block() for _ in range(c.depth))
        self.reset_buffers()
        self.fingerprint: str = ""
        self.source: str = ""

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the non-persistent input-normalisation buffers (float32), e.g. after meta-device build;
        a precision recipe casts them afterwards (`module.bfloat16()` rounds them, as DeepSpeed does)."""
        device = self.camera_token.device if device is None else device
        self.register_buffer("_resnet_mean", torch.tensor(_RESNET_MEAN, device=device).view(1, 1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("_resnet_std", torch.tensor(_RESNET_STD, device=device).view(1, 1, 3, 1, 1),
                             persistent=False)

    # ----------------------------------------------------------------------------------------------
    def normalize_layers(self, layers: int | Iterable[int]) -> list[int]:
        """Sorted unique non-negative layer indices; negative indices count from the end (-1 = last)."""
        if isinstance(layers, int):
            layers = (layers,)
        out = set()
        for i in layers:
            j = int(i) + self.depth if int(i) < 0 else int(i)
            if not 0 <= j < self.depth:
                raise ValueError(f"layer index {i} is out of range for a model with {self.depth} layers")
            out.add(j)
        if not out:
            raise ValueError("at least one layer index is required")
        return sorted(out)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be [B, S, 3, H, W], got shape {list(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}")

    def _special_tokens(self, b: int, s: int, first_frame_is_start: bool) -> torch.Tensor:
        """[B*S, 1+R, C] camera + register tokens; slot 0 for a sequence's first frame, slot 1 after."""
        tok = torch.cat([self.camera_token, self.register_token], dim=2)  # [1, 2, 1+R, C]
        later = tok[:, 1:2]
        if first_frame_is_start:
            per_frame = torch.cat([tok[:, :1], later.expand(-1, s - 1, -1, -1)], dim=1)
        else:
            per_frame = later.expand(-1, s, -1, -1)
        return per_frame.expand(b, -1, -1, -1).reshape(b * s, tok.shape[2], tok.shape[3])

    def _embed(self, images: torch.Tensor, first_frame_is_start: bool) -> tuple[torch.Tensor, RopeTables]:
        """Images [B,S,3,H,W] in [0,1] -> tokens [B*S, P, C] and the per-frame RoPE tables.

        Normalisation follows torch type promotion as the reference does: bf16 images with bf16 buffers
        normalise in bf16, float32 images with bf16 buffers in float32 with the bf16-rounded constants.
        """
        b, s, _, h, w = images.shape
        x = (images - self._resnet_mean) / self._resnet_std
        weight = self.patch_embed.patch_embed.proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)  # weights in another dtype than the input, no autocast to bridge them
        patches = self.patch_embed(x.reshape(b * s, 3, h, w))
        tokens = torch.cat([self._special_tokens(b, s, first_frame_is_start), patches], dim=1)
        rope = self.rope.tables(h // self.patch_size, w // self.patch_size, tokens.device)
        return tokens, rope

    # ----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, layers: int | Iterable[int] = (-2,),
                causal: bool = False) -> dict[int, torch.Tensor]:
        """Images [B,S,3,H,W] in [0,1] -> {layer: [B,S,P,2C]}; computation stops at the deepest layer.

        `causal=True` makes global attention causal over frames (frame k sees frames 0..k), which equals
        streaming the frames one by one with `stream_step`; the default is official VGGT (bidirectional).
        """
        self._check_images(images)
        wanted = self.normalize_layers(layers)
        b, s = images.shape[:2]
        x, rope = self._embed(images, first_frame_is_start=True)
        p, c = x.shape[1], x.shape[2]
        mask = None
        if causal and s > 1:
            frame_of = torch.arange(s, device=x.device).repeat_interleave(p)
            mask = frame_of[:, None] >= frame_of[None, :]
        outputs: dict[int, torch.Tensor] = {}
        for i in range(wanted[-1] + 1):
            x = self.frame_blocks[i](x, rope)
            frame_out = x
            x = self.global_blocks[i](x.reshape(b, s * p, c), rope, mask)
            if i in wanted:
                outputs[i] = torch.cat([frame_out.reshape(b, s, p, c), x.reshape(b, s, p, c)], dim=-1)
            x = x.reshape(b * s, p, c)
        return outputs

    def stream_step(self, frame: torch.Tensor, cache: StreamCache | None = None,
                    layers: int | Iterable[int] = (-2,)) -> tuple[dict[int, torch.Tensor], StreamCache]:
        """Process the next frame [B,1,3,H,W] (or [B,3,H,W]) of B streams; returns ({layer: [B,1,P,2C]}, cache).

        Global attention sees the cached keys/values of all earlier frames plus this frame (JanusVLN's
        streaming path, any batch size). The cache is updated in place and returned; pass None to start.
        The first frame fixes how many layers are cached; later frames may not ask for deeper layers.
        """
        if frame.dim() == 4:
            frame = frame.unsqueeze(1)
        self._check_images(frame)
        if frame.shape[1] != 1:
            raise ValueError(f"stream_step takes one frame per stream, got S={frame.shape[1]}")
        wanted = self.normalize_layers(layers)
        cache = StreamCache() if cache is None else cache
        b = frame.shape[0]
        size = (int(frame.shape[-2]), int(frame.shape[-1]))
        cache.check_frame(b, size)
        if cache.num_frames == 0:
            cache.batch_size, cache.image_size = b, size
            cache.depth = wanted[-1] + 1
            cache.kv = [None] * cache.depth
        elif wanted[-1] >= cache.depth:
            raise ValueError(f"this stream caches {cache.depth} layers (set by its first frame); layer "
                             f"{wanted[-1]} was requested: start the stream with the deepest layer you need")
        x, rope = self._embed(frame, first_frame_is_start=cache.num_frames == 0)
        p, c = x.shape[1], x.shape[2]
        outputs: dict[int, torch.Tensor] = {}
        for i in range(cache.depth):
            x = self.frame_blocks[i](x, rope)
            frame_out = x
            x, cache.kv[i] = self.global_blocks[i].forward_cached(x, rope, cache.kv[i])
            if i in wanted:
                outputs[i] = torch.cat([frame_out.reshape(b, 1, p, c), x.reshape(b, 1, p, c)], dim=-1)
        cache.num_frames += 1
        return outputs, cache
