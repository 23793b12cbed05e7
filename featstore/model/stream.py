"""Key/value cache for streaming VGGT one frame at a time (JanusVLN-style, causal over frames)."""

from __future__ import annotations

from dataclasses import dataclass, field


from featstore.model.layers.attention import KV


@dataclass
class StreamCache:
    """Per global block: keys/values [B, heads, frames*P, head_dim] of every frame seen so far.

    `depth` is how many global blocks the first frame ran (later frames run the same blocks, so
    every cached layer stays complete). Keys are stored after q/k-norm and RoPE.
    """

    num_frames: int = 0
    batch_size: int | None = None
    image_size: tuple[int, int] | None = None
    depth: int | None = None
    kv: list[KV | None] = field(default_factory=list)

    def memory_bytes(self) -> int:
        """Bytes held by the cached tensors."""
        return sum(t.numel() * t.element_size() for entry in self.kv if entry is not None for t in entry)

    def check_frame(self, batch_size: int, image_size: tuple[int, int]) -> None:
        """Raise ValueError if a new frame does not match the batch size and image size of the stream."""
        if self.num_frames == 0:
            return
        if batch_size != self.batch_size or image_size != self.image_size:
            raise ValueError(
                f"stream frame has batch {batch_size} and size {image_size[0]}x{image_size[1]}, but the stream "
                f"started with batch {self.batch_size} and size {self.image_size[0]}x{self.image_size[1]}: "
                "start a new StreamCache for a different stream")
