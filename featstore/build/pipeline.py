"""The build's streaming stages: decode -> shape-bucketed batches (or a context plan's steps) -> (model) ->
records -> sink. A record is computed from an ordered list of frames: one frame for an image
(:class:`WorkItem`), a training sample's frames for ``--context sample`` (``samples.SampleItem``).

* :class:`ImageDataset` runs in DataLoader workers: stat, read, optionally hash, decode, preprocess.
  A bad image becomes a failure item, never an exception.
* :class:`StepDataset` decodes, in workers, the distinct frames of each step of a context plan.
* :func:`shape_batches` groups decoded images of the same preprocessed shape into batches, on a thread of
  its own (:mod:`featstore.build.ring`: the main thread does nothing per image).
* :mod:`featstore.build.writer`: the sinks that encode and write records, behind a writer thread.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from featstore.build.ring import Batch, BatchFeeder
from featstore.constants import DEFAULT_IMAGE_SIZE
from featstore.build.writer import BackgroundWriter, PerImageSink, ShardSink  # noqa: F401 - re-exported
from featstore.formats.codecs import empty_tensor
from featstore.model.preprocess import UINT8_MODES, open_image, preprocess_image, preprocess_image_u8, preprocessed_size


@dataclass(frozen=True)
class WorkItem:
    """One image to build: its store key and its file path. Its record is that of a one-frame sample
    (:class:`featstore.discover.samples.RecordItem`): frames ``(key,)``, paths ``(path,)``."""

    key: str
    path: str

    @property
    def frames(self) -> tuple[str, ...]:
        """The frame keys the record is computed from: the image alone."""
        return (self.key,)

    @property
    def paths(self) -> tuple[str, ...]:
        """The frames' file paths: the image's."""
        return (self.path,)

    @property
    def owner_frame(self) -> str:
        """The frame whose key decides the rank that builds the record: the image."""
        return self.key


@dataclass
class Decoded:
    """A worker's result: the preprocessed image or the reason it failed, plus the source fingerprint."""

    item: WorkItem
    image: torch.Tensor | None
    error: str | None
    source: dict[str, Any] = field(default_factory=dict)

    def pin_memory(self) -> "Decoded":
        """The same result with its image in pinned memory (called by the DataLoader's pin thread)."""
        return Decoded(self.item, None if self.image is None else self.image.pin_memory(), self.error, self.source)


def sample_fingerprint(frames: list[dict[str, Any]]) -> dict[str, Any]:
    """One fingerprint for a sample's frames: total size, newest mtime, and a digest of the frames' sha256."""
    fp: dict[str, Any] = {"size": sum(int(f["size"]) for f in frames),
                          "mtime_ns": max(int(f["mtime_ns"]) for f in frames)}
    if frames and all("sha256" in f for f in frames):
        fp["sha256"] = hashlib.sha256("".join(f["sha256"] for f in frames).encode("ascii")).hexdigest()
    return fp


def preprocessed_size_of(path: str, opts: "DecodeOptions") -> tuple[int, int]:
    """The (H, W) an image becomes after preprocessing, from its header alone (no pixel decode)."""
    with open_image(path) as img:
        w, h = img.size
        if opts.apply_exif and img.getexif().get(0x0112) in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
            w, h = h, w
    return preprocessed_size(w, h, opts.mode, opts.image_size)


def source_fingerprint(st: os.stat_result, sha256: str | None = None) -> dict[str, Any]:
    """The record's note of its source image: size and mtime (and content hash with --hash-inputs)."""
    fp: dict[str, Any] = {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
    if sha256 is not None:
        fp["sha256"] = sha256
    return fp


@dataclass(frozen=True)
class DecodeOptions:
    """How every image of a build is decoded and preprocessed."""

    mode: str = "crop"
    image_size: int = DEFAULT_IMAGE_SIZE
    apply_exif: bool = False
    hash_inputs: bool = False
    max_pixels: int | None = None


def decode_image(path: str, opts: DecodeOptions) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read, optionally hash, decode and preprocess one image; returns ``[3,H,W]`` and its source fingerprint.

    ``crop`` and ``pad`` images come as uint8 (a quarter of the bytes to move between processes and to the
    device); :func:`featstore.model.preprocess.to_unit_float` turns them into the model's exact float input.
    """
    st = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest() if opts.hash_inputs else None
    kwargs: dict[str, Any] = {"apply_exif": opts.apply_exif, "image_size": opts.image_size}
    if opts.max_pixels is not None:
        kwargs["max_pixels"] = opts.max_pixels
    with open_image(io.BytesIO(data)) as img:
        img.filename = path  # type: ignore[attr-defined]  # for error messages
        preprocess = preprocess_image_u8 if opts.mode in UINT8_MODES else preprocess_image
        tensor = preprocess(img, opts.mode, **kwargs)
    return tensor, source_fingerprint(st, digest)


def decode_or_error(path: str, opts: DecodeOptions) -> tuple[torch.Tensor | None, dict[str, Any], str | None]:
    """:func:`decode_image`, with any failure returned as a message instead of raised."""
    try:
        tensor, source = decode_image(path, opts)
        return tensor, source, None
    except Exception as e:  # noqa: BLE001 - a broken image must never end a long build
        return None, {}, f"{type(e).__name__}: {e}"


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers; failures are returned, not raised.

    Item ``i`` is a list of up to ``chunk`` consecutive images. Images of one shape in a chunk are views of one
    stacked tensor, so they cross from the worker in one shared-memory block: fewer transfers for the main
    thread to receive, which feeds the GPU.
    """

    def __init__(self, items: list[WorkItem], opts: DecodeOptions, chunk: int = 1):
        self.items, self.opts, self.chunk = items, opts, max(1, chunk)

    def __len__(self) -> int:
        return -(-len(self.items) // self.chunk)

    def __getitem__(self, i: int) -> list[Decoded]:
        out = []
        for item in self.items[i * self.chunk:(i + 1) * self.chunk]:
            tensor, source, error = decode_or_error(item.path, self.opts)
            out.append(Decoded(item, tensor, error, source))
        return share_storage(out)


def share_storage(decoded: list[Decoded]) -> list[Decoded]:
    """Make the images of equal shape consecutive rows of one stacked tensor (one storage to send between
    processes, and a whole batch the main process uses as it is)."""
    by_shape: dict[tuple, list[Decoded]] = {}
    for d in decoded:
        if d.image is not None:
            by_shape.setdefault((tuple(d.image.shape), d.image.dtype), []).append(d)
    for (shape, dtype), group in by_shape.items():
        if len(group) > 1:
            stacked = empty_tensor((len(group), *shape), dtype)  # shared memory in a worker: sent without a copy
            torch.stack([d.image for d in group], out=stacked)  # type: ignore[misc]
            for j, d in enumerate(group):
                d.image = stacked[j]
    return decoded


@dataclass
class DecodedStep:
    """The distinct frames of one context step, decoded (a failed frame is a zero image and an error)."""

    index: int
    images: torch.Tensor  # [distinct frames, 3, H, W], uint8 for crop/pad (see decode_image)
    errors: dict[str, str]  # frame key -> why it could not be used
    sources: dict[str, dict[str, Any]]  # frame key -> source fingerprint

    def pin_memory(self) -> "DecodedStep":
        """The same step with its images in pinned memory (called by the DataLoader's pin thread)."""
        return DecodedStep(self.index, self.images.pin_memory(), self.errors, self.sources)


class StepDataset(torch.utils.data.Dataset):
    """Item ``i`` is step ``i`` of a context plan: each distinct frame of the step decoded once, stacked."""

    def __init__(self, steps: list[Any], frame_paths: dict[str, str], opts: DecodeOptions):
        self.frames = [(s.distinct_frames, s.image_size) for s in steps]
        self.paths, self.opts = frame_paths, opts

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> DecodedStep:
        keys, size = self.frames[i]
        dtype = torch.uint8 if self.opts.mode in UINT8_MODES else torch.float32
        images = torch.zeros((len(keys), 3, *size), dtype=dtype)
        errors, sources = {}, {}
        for j, key in enumerate(keys):
            tensor, source, error = decode_or_error(self.paths[key], self.opts)
            if error is None and tuple(tensor.shape[-2:]) != tuple(size):  # type: ignore[union-attr]
                error = (f"preprocessed to {tensor.shape[-2]}x{tensor.shape[-1]}, but the frames of its sample "  # type: ignore[union-attr]
                         f"are {size[0]}x{size[1]}: every frame of a sample must have one size")
            if error is None:
                images[j] = tensor
                sources[key] = source
            else:
                errors[key] = error
        return DecodedStep(i, images, errors, sources)


def _identity(x: Any) -> Any:
    return x


def make_loader(dataset: torch.utils.data.Dataset, num_workers: int, pin_memory: bool = False,
                prefetch: int = 8) -> torch.utils.data.DataLoader:
    """A DataLoader yielding the dataset's items one at a time, in order, decoded in ``num_workers`` processes.

    ``pin_memory``: the DataLoader's pin thread moves each item's images to pinned memory (``Decoded`` and
    ``DecodedStep`` define ``pin_memory()``), for asynchronous copies to a GPU; torch ignores it (with a
    warning) where there is no accelerator. The image loop leaves it off: :func:`shape_batches` stacks each
    batch into pinned memory itself, which a pinned source image would only copy once more."""
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=num_workers,
                                       collate_fn=_identity, pin_memory=pin_memory, **kwargs)


MAX_DECODE_CHUNK = 64  # images a decode worker sends at once, at most
PREFETCH_IMAGES = 32  # images each worker keeps decoded ahead


def decode_chunk(items: int, batch_size: int, workers: int) -> int:
    """Images per worker chunk: a whole batch (one storage, one file descriptor, and the batch needs no copy),
    unless the workers would then idle for want of chunks."""
    if workers == 0:
        return 1
    return max(1, min(batch_size, MAX_DECODE_CHUNK, -(-items // workers)))


def image_loader(items: list[WorkItem], opts: DecodeOptions, batch_size: int, num_workers: int
                 ) -> torch.utils.data.DataLoader:
    """The image loop's loader: batch-sized chunks of decoded images from ``num_workers`` processes
    (in-process for a single item)."""
    workers = num_workers if len(items) > 1 else 0
    chunk = decode_chunk(len(items), batch_size, workers)
    return make_loader(ImageDataset(items, opts, chunk=chunk), workers, prefetch=max(2, PREFETCH_IMAGES // chunk))


def shape_batches(decoded: Iterable[Any], batch_size: int, on_failure: Callable[[Decoded], None],
                  pin_memory: bool = False, device: torch.device | None = None) -> Iterator[Batch]:
    """Group successfully decoded images by shape into batches of ``batch_size`` (remainders at the end), on a
    thread of its own (:class:`featstore.build.ring.BatchFeeder`); ``pin_memory``: batches in pinned ring
    slots, reused once the device's current stream has passed the copy of the batch taken before."""
    fence = None
    if pin_memory and torch.cuda.is_available():
        def fence() -> Any:
            return torch.cuda.current_stream(device).record_event()
    return iter(BatchFeeder(decoded, batch_size, on_failure, pin_memory, fence=fence))
