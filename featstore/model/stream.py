"""Key/value cache for streaming VGGT one frame at a time (JanusVLN-style, causal over frames)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

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

    @property
    def frames_held(self) -> int:
        """Frame caches held (rows x frames), the unit of the memory bounds in `featstore.build.schedule`."""
        return (self.batch_size or 0) * self.num_frames

    def _like(self, kv: list[KV | None], batch_size: int) -> "StreamCache":
        return StreamCache(self.num_frames, batch_size, self.image_size, self.depth, kv)

    def fork(self) -> "StreamCache":
        """A cache holding the same tensors in a new list: stepping it (which replaces list entries) leaves
        this cache valid, so a prefix can be continued in several ways without copying."""
        return self._like(list(self.kv), self.batch_size or 0)

    def rows(self, start: int, stop: int) -> "StreamCache":
        """Streams `start:stop` of the batch, as views (no copy)."""
        kv = [None if e is None else (e[0][start:stop], e[1][start:stop]) for e in self.kv]
        return self._like(kv, stop - start)


def stack_caches(parts: "list[StreamCache]") -> StreamCache:
    """Concatenate caches of equal length, image size and depth along the batch (one copy); one part is
    returned as it is."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if (p.num_frames, p.image_size, p.depth) != (first.num_frames, first.image_size, first.depth):
            raise ValueError("caches to stack must have the same number of frames, image size and depth")
    kv: list[KV | None] = []
    for i, entry in enumerate(first.kv):
        if entry is None:
            kv.append(None)
            continue
        entries = [p.kv[i] for p in parts]
        kv.append((torch.cat([e[0] for e in entries]), torch.cat([e[1] for e in entries])))  # type: ignore[index]
    return first._like(kv, sum(p.batch_size or 0 for p in parts))
