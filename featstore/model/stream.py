"""Key/value cache for streaming VGGT one frame at a time (JanusVLN-style, causal over frames), and the
stream step's global-block computation over it.

Each global block's cache is a view of the first `length` tokens of a buffer with spare room: a step that
continues the buffer's newest tokens writes its frame into the room in place (no copy of the past), and
attention reads the view through ``F.scaled_dot_product_attention``. A cache continued twice (siblings in a
prefix tree) copies on the second continuation, so every view stays valid. `STATS` counts the bytes moved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class CopyStats:
    """Bytes written into caches: new frames appended, old tokens copied by a step (buffer growth, a prefix
    continued twice) or by stacking rows of several batches into one, and buffers made."""

    appended_bytes: int = 0
    copied_bytes: int = 0
    stacked_bytes: int = 0
    allocations: int = 0

    def reset(self) -> None:
        self.appended_bytes = self.copied_bytes = self.stacked_bytes = self.allocations = 0


STATS = CopyStats()


@dataclass
class _Fill:
    """Tokens written so far in each row of one buffer (shared by every view of the buffer)."""

    tokens: list[int]


@dataclass
class LayerKV:
    """One global block's keys/values [b, heads, length, head_dim] for b streams: rows `row0..` of a buffer
    with room for more tokens. Indexing [0] / [1] gives the keys / values (views)."""

    kbuf: torch.Tensor  # [b, H, capacity, D]
    vbuf: torch.Tensor
    length: int
    fill: _Fill
    row0: int = 0

    @property
    def keys(self) -> torch.Tensor:
        return self.kbuf[:, :, :self.length]

    @property
    def values(self) -> torch.Tensor:
        return self.vbuf[:, :, :self.length]

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.keys, self.values)[i]

    def __iter__(self):
        return iter((self.keys, self.values))

    @property
    def capacity(self) -> int:
        return int(self.kbuf.shape[2])

    def rows(self, start: int, stop: int) -> "LayerKV":
        return LayerKV(self.kbuf[start:stop], self.vbuf[start:stop], self.length, self.fill, self.row0 + start)

    def _owns_end(self) -> bool:
        rows = self.fill.tokens[self.row0:self.row0 + self.kbuf.shape[0]]
        return all(t == self.length for t in rows)


Entry = Union[LayerKV, KV]


def as_layer_kv(entry: Entry) -> LayerKV:
    """A LayerKV for a cache entry given as a plain (keys, values) pair (treated as a full buffer)."""
    if isinstance(entry, LayerKV):
        return entry
    k, v = entry
    return LayerKV(k, v, int(k.shape[2]), _Fill([int(k.shape[2])] * int(k.shape[0])))


def _capacity(have: int, need: int, limit: int | None) -> int:
    """Tokens to allocate: the stream's whole length when known (`limit`: no copy until it ends), else double
    what is held (amortised growth); at least `need`."""
    return max(need, limit) if limit is not None else max(need, 2 * have)


def _new_buffers(like: torch.Tensor, rows: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (rows, like.shape[1], capacity, like.shape[3])
    STATS.allocations += 2
    return (torch.empty(shape, dtype=like.dtype, device=like.device),
            torch.empty(shape, dtype=like.dtype, device=like.device))


def append_kv(past: Entry | None, k: torch.Tensor, v: torch.Tensor, limit_tokens: int | None = None) -> LayerKV:
    """The cache grown by the new tokens k, v [b, H, n, D]: in place when `past` ends at its buffer's newest
    tokens and has room, else copied into a new buffer (room by `_capacity`, `limit_tokens` at most)."""
    n = int(k.shape[2])
    new_bytes = 2 * k.numel() * k.element_size()
    STATS.appended_bytes += new_bytes
    if past is not None:
        past = as_layer_kv(past)
        if past.length + n <= past.capacity and past._owns_end():
            end = past.length + n
            past.kbuf[:, :, past.length:end].copy_(k)
            past.vbuf[:, :, past.length:end].copy_(v)
            for r in range(past.row0, past.row0 + int(k.shape[0])):
                past.fill.tokens[r] = end
            return LayerKV(past.kbuf, past.vbuf, end, past.fill, past.row0)
    have = 0 if past is None else past.length
    kb, vb = _new_buffers(k, int(k.shape[0]), _capacity(have, have + n, limit_tokens))
    if past is not None and have:
        kb[:, :, :have].copy_(past.keys)
        vb[:, :, :have].copy_(past.values)
        STATS.copied_bytes += 2 * past.keys.numel() * k.element_size()
    kb[:, :, have:have + n].copy_(k)
    vb[:, :, have:have + n].copy_(v)
    return LayerKV(kb, vb, have + n, _Fill([have + n] * int(k.shape[0])))


# --- the stream step of one global block ------------------------------------------------------------------
def attn_inputs(block: Any, x: torch.Tensor, rope: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [b, H, n, D] of the new tokens (norm1, qkv, q/k-norm, RoPE): the cache-free first half."""
    return block.attn._qkv(block.norm1(x), rope)


def attn_finish(block: Any, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The block's output from its input `x` and the attention result `o` [b, H, n, D]: the second half."""
    x = x + block.ls1(block.attn._out(o))
    return x + block.ls2(block.mlp(block.norm2(x)))


_PARTS = "_featstore_stream_parts"
Parts = tuple[Callable[..., Any], Callable[..., Any]]


def stream_parts(block: Any) -> Parts:
    """The (first half, second half) functions `block` runs in a stream step (compiled ones if set)."""
    return getattr(block, _PARTS, (attn_inputs, attn_finish))


def compile_stream_parts(model: Any, **options: Any) -> Parts:
    """Compile the two cache-free halves once (torch.compile `options`) and use them in every global block;
    attention over the cache stays eager (its length changes every step; SDPA picks its fastest kernel)."""
    parts = (torch.compile(attn_inputs, **options), torch.compile(attn_finish, **options))
    for blk in model.global_blocks:
        object.__setattr__(blk, _PARTS, parts)
    return parts


def cached_block_step(block: Any, x: torch.Tensor, rope: Any, past: Entry | None,
                      limit_tokens: int | None = None) -> tuple[torch.Tensor, LayerKV]:
    """One global block on the new frame's tokens `x` [b, P, C], attending to the cache plus themselves.

    Cached keys are stored after q/k-norm and RoPE. That equals re-applying both to raw cached keys
    (JanusVLN) because both act per token and every frame of a stream has the same positions.
    """
    first, second = stream_parts(block)
    q, k, v = first(block, x, rope)
    kv = append_kv(past, k, v, limit_tokens)
    return second(block, x, F.scaled_dot_product_attention(q, kv.keys, kv.values)), kv


# --- the cache of every global block ----------------------------------------------------------------------
@dataclass
class StreamCache:
    """Per global block: keys/values [B, heads, frames*P, head_dim] of every frame seen so far.

    `depth` is how many global blocks the first frame ran (later frames run the same blocks, so
    every cached layer stays complete). Keys are stored after q/k-norm and RoPE. `reserve_frames`, when
    known (the longest sample of a plan), is the room a new buffer gets (else buffers grow by doubling).
    """

    num_frames: int = 0
    batch_size: int | None = None
    image_size: tuple[int, int] | None = None
    depth: int | None = None
    kv: list[Entry | None] = field(default_factory=list)
    reserve_frames: int | None = None

    def memory_bytes(self) -> int:
        """Bytes of the cached keys and values (the tokens held, not the room reserved after them)."""
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

    def limit_tokens(self, tokens_per_frame: int) -> int | None:
        """The most tokens a buffer of this stream needs room for (None: unknown, grow by doubling)."""
        return None if self.reserve_frames is None else self.reserve_frames * tokens_per_frame

    def _like(self, kv: list[Entry | None], batch_size: int) -> "StreamCache":
        return StreamCache(self.num_frames, batch_size, self.image_size, self.depth, kv, self.reserve_frames)

    def fork(self) -> "StreamCache":
        """A cache holding the same tensors in a new list: stepping it leaves this cache valid (the step
        appends after this cache's tokens, or copies when another continuation already did)."""
        return self._like(list(self.kv), self.batch_size or 0)

    def rows(self, start: int, stop: int) -> "StreamCache":
        """Streams `start:stop` of the batch, as views (no copy)."""
        kv = [None if e is None else (e.rows(start, stop) if isinstance(e, LayerKV)
                                      else (e[0][start:stop], e[1][start:stop])) for e in self.kv]
        return self._like(kv, stop - start)


def _stack_entries(entries: list[Entry], per_frame: int, limit: int | None) -> LayerKV:
    """One buffer holding the entries' rows in order, with room for the next frame (within `limit`)."""
    have = int(entries[0][0].shape[2])
    rows = sum(int(e[0].shape[0]) for e in entries)
    room = have + per_frame
    kb, vb = _new_buffers(entries[0][0], rows, max(have, min(room, limit)) if limit is not None else room)
    r = 0
    for e in entries:
        n = int(e[0].shape[0])
        kb[r:r + n, :, :have].copy_(e[0])
        vb[r:r + n, :, :have].copy_(e[1])
        r += n
    STATS.stacked_bytes += 2 * kb[:, :, :have].numel() * kb.element_size()
    return LayerKV(kb, vb, have, _Fill([have] * rows))


def stack_caches(parts: "list[StreamCache]") -> StreamCache:
    """Concatenate caches of equal length, image size and depth along the batch (one copy, with room for the
    next frame); one part is returned as it is."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if (p.num_frames, p.image_size, p.depth) != (first.num_frames, first.image_size, first.depth):
            raise ValueError("caches to stack must have the same number of frames, image size and depth")
    kv: list[Entry | None] = []
    for i, entry in enumerate(first.kv):
        if entry is None:
            kv.append(None)
            continue
        per_frame = int(entry[0].shape[2]) // max(1, first.num_frames)
        kv.append(_stack_entries([p.kv[i] for p in parts], per_frame, first.limit_tokens(per_frame)))  # type: ignore[misc]
    return first._like(kv, sum(p.batch_size or 0 for p in parts))
