"""VGGT aggregator configuration: every size is a field; named configs "vggt-1b" and "tiny"."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from featstore.constants import DEFAULT_IMAGE_SIZE, PATCH_SIZE

@dataclass(frozen=True)
class VGGTConfig:
    """Sizes of the VGGT aggregator and of its DINOv2 patch-embedding ViT (defaults: VGGT-1B)."""

    name: str = "vggt-1b"
    # Image / patch grid. `img_size` fixes the stored position-embedding grid (img_size / patch_size squared).
    img_size: int = DEFAULT_IMAGE_SIZE
    patch_size: int = PATCH_SIZE
    in_chans: int = 3
    # Aggregator (alternating frame / global attention).
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    qk_norm: bool = True
    rope_freq: float = 100.0
    init_values: float = 0.01
    norm_eps: float = 1e-5
    # DINOv2 ViT with registers used as patch embedding (same embed_dim as the aggregator).
    dino_depth: int = 24
    dino_num_heads: int = 16
    dino_mlp_ratio: float = 4.0
    dino_num_register_tokens: int = 4
    dino_init_values: float = 1.0
    dino_norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        """Per-head feature size of the aggregator attention."""
        return self.embed_dim // self.num_heads

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in each frame (camera token + register tokens come first)."""
        return 1 + self.num_register_tokens

    @property
    def pos_grid(self) -> int:
        """Side of the square grid the stored position embedding covers (37 for 518 / 14)."""
        return self.img_size // self.patch_size

    @property
    def output_dim(self) -> int:
        """Channels of each returned layer: frame and global block outputs concatenated."""
        return 2 * self.embed_dim

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-able dict (for manifests)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VGGTConfig":
        """Inverse of `to_dict`; unknown fields raise TypeError."""
        return cls(**d)

    def same_sizes(self, other: "VGGTConfig") -> bool:
        """True when every field except `name` is equal."""
        return dataclasses.replace(self, name="") == dataclasses.replace(other, name="")


_NAMED: dict[str, VGGTConfig] = {
    "vggt-1b": VGGTConfig(),
    # tests/golden/tiny/config.json: the official Aggregator and ViT, shrunk.
    "tiny": VGGTConfig(
        name="tiny", embed_dim=64, depth=2, num_heads=4, dino_depth=2, dino_num_heads=4,
    ),
}


def config_names() -> list[str]:
    """Names accepted by `get_config`."""
    return sorted(_NAMED)


def get_config(name: str) -> VGGTConfig:
    """The named config: "vggt-1b" (official VGGT-1B sizes) or "tiny" (the golden tiny fixture)."""
    try:
        return _NAMED[name]
    except KeyError:
        raise ValueError(f"unknown VGGT config {name!r}: expected one of {config_names()}") from None
