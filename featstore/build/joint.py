"""``--context joint``: VG-LLM's use of VGGT. Every frame of a sample goes through the aggregator in one call
(bidirectional global attention); a record keeps, per requested layer, the patch tokens of every frame
``[S, h*w, C]``. Samples of equal frame count and size are batched; on CUDA out of memory the batch is halved,
and a single sample too large for memory fails naming how many of its frames fit at its size."""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from featstore.build.pipeline import DecodeOptions, decode_or_error, source_fingerprint
from featstore.build.transform import LoadedTransform, apply_transform
from featstore.discover.samples import SampleItem
from featstore.model.joint import joint_features
from featstore.model.precision import Precision
from featstore.model.preprocess import UINT8_MODES, open_image, preprocess_image

log = logging.getLogger("featstore")


@dataclass
class JointBatch:
    """Samples of one frame count and one preprocessed size (H, W), run in one call."""

    items: list[SampleItem]
    size: tuple[int, int]


def plan_joint_batches(items: list[SampleItem], sizes: dict[str, tuple[int, int]], batch: int) -> list[JointBatch]:
    """Group samples by (frame count, size), in order of first appearance, at most ``batch`` a call."""
    groups: dict[tuple[int, tuple[int, int]], list[SampleItem]] = {}
    for it in items:
        groups.setdefault((len(it.frames), sizes[it.frames[0]]), []).append(it)
    return [JointBatch(group[i:i + batch], size) for (_, size), group in groups.items()
            for i in range(0, len(group), max(1, batch))]


@dataclass
class DecodedJoint:
    """A batch's frames decoded: images ``[B, S, 3, H, W]`` (a failed sample's rows are zeros), why samples
    failed (key -> (frame, error)) and each sample's frame fingerprints."""

    images: torch.Tensor
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)
    sources: list[list[dict[str, Any]]] = field(default_factory=list)

    def pin_memory(self) -> "DecodedJoint":
        """The same batch with its images in pinned memory (the DataLoader's pin thread calls it)."""
        return DecodedJoint(self.images.pin_memory(), self.errors, self.sources)


def _decode_transformed(paths: tuple[str, ...], record: dict[str, Any], opts: DecodeOptions,
                        transform: LoadedTransform) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """A sample's frames opened as PIL images, given to the transform with the annotation record, and the
    images it returns preprocessed (float in [0, 1])."""
    images, sources = [], []
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        img = open_image(io.BytesIO(data))
        img.load()
        images.append(img)
        sources.append(source_fingerprint(os.stat(path), _sha256(data) if opts.hash_inputs else None))
    seen = apply_transform(transform, images, record)
    kwargs: dict[str, Any] = {"apply_exif": opts.apply_exif, "image_size": opts.image_size}
    if opts.max_pixels is not None:
        kwargs["max_pixels"] = opts.max_pixels
    return [preprocess_image(im, opts.mode, **kwargs) for im in seen], sources


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class JointDataset(torch.utils.data.Dataset):
    """Item ``i`` is joint batch ``i``, every frame of its samples decoded (in DataLoader workers)."""

    def __init__(self, batches: list[JointBatch], opts: DecodeOptions, transform: LoadedTransform | None = None):
        self.batches, self.opts, self.transform = batches, opts, transform

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> DecodedJoint:
        b = self.batches[i]
        uint8 = self.opts.mode in UINT8_MODES and self.transform is None
        s = len(b.items[0].frames)
        out = DecodedJoint(torch.zeros((len(b.items), s, 3, *b.size), dtype=torch.uint8 if uint8 else torch.float32))
        for row, item in enumerate(b.items):
            frames, sources, problem = self._sample(item)
            if problem is None:
                problem = next(((f, _size_problem(t, b.size)) for f, t in zip(item.frames, frames)
                                if tuple(t.shape[-2:]) != tuple(b.size)), None)
            if problem is not None:
                out.errors[item.key] = problem
                sources = []
            else:
                out.images[row] = torch.stack(frames)
            out.sources.append(sources)
        return out

    def _sample(self, item: SampleItem) -> tuple[list[torch.Tensor], list[dict[str, Any]], tuple[str, str] | None]:
        if self.transform is not None:
            try:
                frames, sources = _decode_transformed(item.paths, item_record(item), self.opts, self.transform)
                return frames, sources, None
            except Exception as e:  # noqa: BLE001 - reported per sample, never fatal
                return [], [], (item.frames[0], f"frame transform {self.transform.name}: {type(e).__name__}: {e}")
        frames, sources = [], []
        for key, path in zip(item.frames, item.paths):
            tensor, source, error = decode_or_error(path, self.opts)
            if error is not None:
                return [], [], (key, error)
            frames.append(tensor)
            sources.append(source)
        return frames, sources, None


def item_record(item: SampleItem) -> dict[str, Any]:
    """The annotation record a sample came from ({} for episode samples)."""
    return dict(item.annotation or {})


def _size_problem(t: torch.Tensor, size: tuple[int, int]) -> str:
    return (f"preprocessed to {t.shape[-2]}x{t.shape[-1]}, but the sample's first frame to {size[0]}x{size[1]}: "
            f"the frames of one sample must have one size")


class FramesDoNotFit(Exception):
    """One sample's frames do not fit in device memory at its size; says how many do."""


@dataclass
class JointRunner:
    """Runs joint batches: ``{name: [B, S, N, C]}`` in the storage dtype; ``max_batch`` drops on CUDA OOM."""

    model: Any
    layers: tuple[int, ...]
    names: list[str]
    store_dtype: torch.dtype
    tokens: str
    precision: Precision
    reference_frame: str
    max_batch: int

    def _call(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = joint_features(self.model, images, self.layers, self.reference_frame, self.tokens, self.precision)
        return {n: out[i].to(self.store_dtype) for n, i in zip(self.names, self.layers)}

    def run(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of a batch ``[B, S, 3, H, W]`` (float in [0, 1]); FramesDoNotFit for a single sample too
        large for memory."""
        while True:
            chunk = max(1, min(self.max_batch, images.shape[0]))
            try:
                parts = [self._call(images[a:a + chunk]) for a in range(0, images.shape[0], chunk)]
                return {n: torch.cat([p[n] for p in parts]) if len(parts) > 1 else parts[0][n] for n in self.names}
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                if chunk == 1:
                    raise FramesDoNotFit(self._fitting_frames(images[:1])) from None
                self.max_batch = chunk // 2
                log.warning("CUDA out of memory: continuing with %d joint samples per call", self.max_batch)

    def _fitting_frames(self, one: torch.Tensor) -> str:
        """Why one sample cannot run: the most frames (halving) that do fit at its size."""
        s, fit = one.shape[1], one.shape[1] // 2
        while fit >= 1:
            try:
                self._call(one[:, :fit])
                break
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                fit //= 2
        h, w = one.shape[-2:]
        return (f"its {s} frames at {h}x{w} do not fit in device memory in one joint call; "
                f"{fit if fit else 'not even 1'} frame(s) do at that size: use a smaller --image-size or a "
                f"device with more memory")
