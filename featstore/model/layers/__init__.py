"""Building blocks of the VGGT aggregator, one per file (DINOv2 style)."""

from featstore.model.layers.attention import Attention
from featstore.model.layers.block import Block
from featstore.model.layers.dino import DinoVisionTransformer
from featstore.model.layers.layer_scale import LayerScale
from featstore.model.layers.mlp import Mlp
from featstore.model.layers.patch_embed import PatchEmbed
from featstore.model.layers.rope import RotaryEmbedding2D, apply_rope

__all__ = [
    "Attention", "Block", "DinoVisionTransformer", "LayerScale", "Mlp", "PatchEmbed",
    "RotaryEmbedding2D", "apply_rope",
]
