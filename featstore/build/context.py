"""Executor for per-sample streaming features: runs a static plan (:mod:`featstore.build.schedule`) on the model.

For each step: the parents' caches are stacked along the batch (no copy when the step continues the
previous batch in the same row order, or a contiguous range of it; forking a cache is free because the
model's attention concatenates into new tensors), ``model.stream_step`` runs the step's frames, the caches
of nodes with children are kept, the features of the samples ending in the step are emitted, and caches no
longer needed are dropped. On ``torch.cuda.OutOfMemoryError`` the step is retried in halves (and later
steps keep the smaller size), as :class:`featstore.build.extract.Extractor` does.

Features are named like the per-image Extractor's: ``features`` for the first requested layer, then
``layer_<i>``; each is ``[1, P, C]`` (patch tokens from ``model.patch_start_idx``, or every token with
``tokens="all"``) in the storage dtype, a view into the step's batched output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Protocol, Sequence, Union

import torch

from featstore.build.extract import resolve_layers, tensor_names
from featstore.model.config import VGGTConfig
from featstore.model.stream import StreamCache, stack_caches
from featstore.discover.samples import Sample
from featstore.build.schedule import Step

log = logging.getLogger("featstore")

Features = dict[str, torch.Tensor]
StepFrames = Union[Callable[[Step], torch.Tensor], Iterable[torch.Tensor]]
StepPart = tuple[int, dict[int, torch.Tensor], StreamCache]  # (first row, model outputs, output cache)


class StreamingModel(Protocol):
    """What the executor needs from a model (a :class:`featstore.model.VGGTAggregator`)."""

    depth: int
    patch_start_idx: int

    def stream_step(self, frame: torch.Tensor, cache: StreamCache | None,
                    layers: Sequence[int]) -> tuple[dict[int, torch.Tensor], StreamCache]: ...


@dataclass
class _Held:
    """A batched cache and the nodes whose caches are its rows."""

    cache: StreamCache
    row_of: dict[int, int]


@dataclass
class CachePool:
    """Live node caches, as rows of batched caches; a batch at most half in use is compacted (copied)."""

    where: dict[int, _Held] = field(default_factory=dict)

    def frames_held(self) -> int:
        """Frame caches held by every live batched cache (used rows and holes)."""
        return sum(h.cache.frames_held for h in {id(h): h for h in self.where.values()}.values())

    def put(self, cache: StreamCache, nodes: Sequence[int], rows: Sequence[int]) -> None:
        """Hold `cache` for `nodes` (row `rows[j]` is node `nodes[j]`); a half-used batch is compacted first."""
        if not nodes:
            return
        if 2 * len(nodes) <= (cache.batch_size or 0):
            cache, rows = stack_caches([cache.rows(r, r + 1) for r in rows]), range(len(nodes))
        held = _Held(cache, dict(zip(nodes, rows)))
        self.where.update((n, held) for n in nodes)

    def release(self, nodes: Iterable[int]) -> None:
        """Drop the caches of `nodes`; compact a batch whose remaining rows are at most half of it."""
        touched = {}
        for n in nodes:
            held = self.where.pop(n)
            del held.row_of[n]
            touched[id(held)] = held
        for held in touched.values():
            if held.row_of and 2 * len(held.row_of) <= (held.cache.batch_size or 0):
                live = list(held.row_of.items())
                self.put(held.cache, [n for n, _ in live], [r for _, r in live])

    def gather(self, parents: Sequence[int]) -> tuple[StreamCache, int]:
        """A cache whose row j continues `parents[j]`, and how many frame caches were copied to make it."""
        runs: list[tuple[_Held, int, int]] = []  # (batch, first row, end row)
        for p in parents:
            held, row = self.where[p], self.where[p].row_of[p]
            if runs and runs[-1][0] is held and runs[-1][2] == row:
                runs[-1] = (held, runs[-1][1], row + 1)
            else:
                runs.append((held, row, row + 1))
        if len(runs) == 1:
            held, start, stop = runs[0]
            whole = start == 0 and stop == held.cache.batch_size
            return (held.cache.fork() if whole else held.cache.rows(start, stop)), 0
        stacked = stack_caches([h.cache.rows(a, b) for h, a, b in runs])
        return stacked, stacked.frames_held


def _step_images(step: Step, images: torch.Tensor) -> torch.Tensor:
    """Per-node frames [n,3,H,W] from the step's images: one per node, or one per distinct frame."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"step images must be [N, 3, H, W], got shape {list(images.shape)}")
    if step.image_size is not None and tuple(images.shape[-2:]) != tuple(step.image_size):
        raise ValueError(f"step images are {images.shape[-2]}x{images.shape[-1]}, the plan says "
                         f"{step.image_size[0]}x{step.image_size[1]}")
    n = images.shape[0]
    if n == step.size:
        return images
    if n != len(step.distinct_frames):
        raise ValueError(f"a step with {step.size} nodes and {len(step.distinct_frames)} distinct frames got "
                         f"{n} images: pass one per node or one per distinct frame (step.distinct_frames order)")
    return images.index_select(0, torch.tensor(step.frame_index, device=images.device))


@dataclass
class PlanExecutor:
    """Runs plans on `model`; `max_rows` caps the rows per model call (lowered on CUDA out-of-memory)."""

    model: StreamingModel
    layers: tuple[int, ...]
    store_dtype: torch.dtype | None = None
    tokens: str = "patch"
    max_rows: int | None = None
    peak_frames_held: int = 0  # most frame caches held at once (live, copies for stacking, step output)
    reserve_frames: int | None = None  # longest sample: caps the room KV buffers get (None: set by run())

    def __post_init__(self) -> None:
        if self.tokens not in ("patch", "all"):
            raise ValueError(f"tokens must be 'patch' or 'all', got {self.tokens!r}")
        self.layers = resolve_layers(tuple(self.layers), int(self.model.depth))
        self.names = tensor_names(self.layers)
        self.pool = CachePool()

    def _chunk_rows(self, n: int) -> list[tuple[int, int]]:
        size = n if self.max_rows is None else max(1, min(n, self.max_rows))
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def _compute(self, step: Step, frames: torch.Tensor) -> list[StepPart]:
        """Run the step in chunks of at most `max_rows` rows: [(first row, outputs, cache)]."""
        parts = []
        for a, b in self._chunk_rows(step.size):
            cache, copied = ((StreamCache(reserve_frames=self.reserve_frames), 0) if step.depth == 0
                             else self.pool.gather(step.parents[a:b]))
            out, cache = self.model.stream_step(frames[a:b, None], cache, layers=self.layers)
            self.peak_frames_held = max(self.peak_frames_held, self.pool.frames_held() + copied
                                        + sum(c.frames_held for _, _, c in parts) + cache.frames_held)
            parts.append((a, out, cache))
        return parts

    def _compute_adaptive(self, step: Step, frames: torch.Tensor) -> list[StepPart]:
        """:meth:`_compute`, retried with half the rows per call on CUDA out-of-memory."""
        while True:
            try:
                return self._compute(step, frames)
            except torch.cuda.OutOfMemoryError:
                rows = max(b - a for a, b in self._chunk_rows(step.size))
                if rows == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.max_rows = (rows + 1) // 2
                log.warning("CUDA out of memory at a %d-row context step: retrying with at most %d rows",
                            rows, self.max_rows)

    def _emit(self, step: Step, a: int, out: dict[int, torch.Tensor]) -> list[tuple[Sample, Features]]:
        """(sample, features) for the samples ending at rows a.. of the step (views of one cast per layer)."""
        start = int(self.model.patch_start_idx) if self.tokens == "patch" else 0
        feats = {n: out[i][:, 0, start:].to(self.store_dtype or out[i].dtype) for n, i in zip(self.names, self.layers)}
        rows = next(iter(feats.values())).shape[0]
        return [(sample, {n: t[j:j + 1] for n, t in feats.items()}) for j in range(rows) for sample in step.ends[a + j]]

    @torch.inference_mode()
    def run_step(self, step: Step, images: torch.Tensor) -> list[tuple[Sample, Features]]:
        """Run one step (its parents must have run): keep and release caches as the step says, and return
        (sample, features) for the samples ending in it."""
        parts = self._compute_adaptive(step, _step_images(step, images))
        keep = set(step.keep)
        for a, _, cache in parts:
            rows = [j for j in range(cache.batch_size or 0) if step.nodes[a + j] in keep]
            self.pool.put(cache, [step.nodes[a + j] for j in rows], rows)
        self.pool.release(step.release)
        return [item for a, out, _ in parts for item in self._emit(step, a, out)]

    def run(self, steps: Iterable[Step], frames: StepFrames) -> Iterator[tuple[Sample, Features]]:
        """Run a plan; `frames` gives each step's images (a callable of the step, or an iterable in step
        order), [N, 3, H, W] in [0, 1] on the model's device, N = nodes or distinct frames of the step."""
        source = frames if callable(frames) else iter(frames)
        if self.reserve_frames is None and isinstance(steps, Sequence) and steps:
            self.reserve_frames = max(st.depth for st in steps) + 1
        for i, step in enumerate(steps):
            images = source(step) if callable(source) else next(source, None)
            if images is None:
                raise ValueError(f"step images ran out at step {i}: give one tensor per step of the plan")
            yield from self.run_step(step, images)


def run_plan(model: StreamingModel, steps: Iterable[Step], frames: StepFrames, layers: Sequence[int] = (-2,),
             store_dtype: torch.dtype | None = None, tokens: str = "patch",
             max_rows: int | None = None) -> Iterator[tuple[Sample, Features]]:
    """Run a plan and yield (sample, {name: [1, P, C]}) as samples finish (see :class:`PlanExecutor`)."""
    return PlanExecutor(model, tuple(layers), store_dtype, tokens, max_rows).run(steps, frames)


def kv_bytes_per_frame(config: VGGTConfig, image_size: tuple[int, int], deepest_layer: int,
                       dtype: torch.dtype) -> int:
    """KV cache bytes one frame of one sample adds: tokens x cached layers (0..deepest) x keys+values x
    embed dim x dtype size (VGGT-1B, 490x644, layer 22, bf16: 1615 x 23 x 2 x 1024 x 2 = 152,135,680)."""
    tokens = config.patch_start_idx + (image_size[0] // config.patch_size) * (image_size[1] // config.patch_size)
    return tokens * (deepest_layer + 1) * 2 * config.embed_dim * torch.empty((), dtype=dtype).element_size()
