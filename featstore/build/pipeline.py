"""The build's streaming stages: decode -> shape-bucketed batches (or a context plan's steps) -> (model) ->
records -> sink. A record is computed from an ordered list of frames: one frame for an image
(:class:`WorkItem`), a training sample's frames for ``--context sample`` (``samples.SampleItem``).

* :class:`ImageDataset` runs in DataLoader workers: stat, read, optionally hash, decode, preprocess.
  A bad image becomes a failure item, never an exception.
* :func:`shape_batches` groups decoded images of the same preprocessed shape into batches.
* :class:`StepDataset` decodes, in workers, the distinct frames of each step of a context plan.
* :class:`ShardSink` / :class:`PerImageSink` encode (a thread pool: zstd releases the GIL) and write.
* :class:`BackgroundWriter` runs a sink on its own thread behind a bounded queue, so device-to-host
  copies, compression and writing overlap the next batch with a bounded number of batches in flight.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from featstore.constants import DEFAULT_IMAGE_SIZE
from featstore.runtime.faults import crash_point
from featstore.formats.keys import CacheLayout
from featstore.formats.perimage import encode_pt
from featstore.formats.record import Record, encode_record
from featstore.formats.shards import ShardWriter
from featstore.runtime.fsutil import atomic_write_bytes
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
    """Make the images of equal shape views of one stacked tensor (one storage to send between processes)."""
    by_shape: dict[tuple, list[Decoded]] = {}
    for d in decoded:
        if d.image is not None:
            by_shape.setdefault((tuple(d.image.shape), d.image.dtype), []).append(d)
    for group in by_shape.values():
        if len(group) > 1:
            stacked = torch.stack([d.image for d in group])  # type: ignore[misc]
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


@dataclass
class Batch:
    """Images of one shape, stacked (pinned when feeding a GPU)."""

    items: list[WorkItem]
    sources: list[dict[str, Any]]
    images: torch.Tensor


def _each(decoded: Iterable[Decoded | list[Decoded]]) -> Iterator[Decoded]:
    """The decoded images one by one, whether they come singly or in chunks."""
    for d in decoded:
        if isinstance(d, list):
            yield from d
        else:
            yield d


def shape_batches(decoded: Iterable[Decoded | list[Decoded]], batch_size: int, on_failure: Callable[[Decoded], None],
                  pin_memory: bool = False) -> Iterator[Batch]:
    """Group successfully decoded images by shape into batches of ``batch_size`` (remainders at the end)."""
    buckets: dict[tuple[int, ...], list[Decoded]] = {}

    def emit(group: list[Decoded]) -> Batch:
        imgs = [d.image for d in group]
        out = torch.empty((len(imgs), *imgs[0].shape), dtype=imgs[0].dtype, pin_memory=pin_memory)  # type: ignore
        torch.stack(imgs, out=out)  # type: ignore[arg-type]
        return Batch([d.item for d in group], [d.source for d in group], out)

    for d in _each(decoded):
        if d.image is None:
            on_failure(d)
            continue
        group = buckets.setdefault(tuple(d.image.shape), [])
        group.append(d)
        if len(group) >= batch_size:
            del buckets[tuple(d.image.shape)]
            yield emit(group)
    for group in buckets.values():
        yield emit(group)


class ShardSink:
    """Encodes records with a thread pool and appends them, in order, to this rank's shards."""

    def __init__(self, writer: ShardWriter, threads: int, zstd_level: int, codec: str = "zstd"):
        self.writer, self.level, self.codec = writer, zstd_level, codec
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="featstore-encode")
        self.bytes_written = 0
        self.seconds: Counter = Counter()  # "append": waiting for encodes + tar append + rollover fsync

    def write(self, records: list[Record]) -> None:
        """Encode and append a batch of records."""
        t0 = time.perf_counter()
        encoded = self.pool.map(lambda r: encode_record(r, self.level, self.codec), records)
        for rec, data in zip(records, encoded):
            self.writer.write(rec.key, data)
            self.bytes_written += len(data)
        self.seconds["append"] += time.perf_counter() - t0

    def close(self) -> None:
        """Close the open shard (making it visible) and stop the pool."""
        self.writer.close_shard()
        self.pool.shutdown()

    def __enter__(self) -> "ShardSink":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: Any) -> None:
        """Leaving on an error drops the open shard (:class:`ShardWriter`'s exit) and stops the pool."""
        self.writer.__exit__(exc_type, *rest)
        self.pool.shutdown()


class PerImageSink:
    """Writes each record as its per-image cache file (the layout's checked destination; temporary name, then
    rename) using a thread pool."""

    def __init__(self, layout: CacheLayout, threads: int, fsync: bool = True):
        self.layout, self.fsync = layout, fsync
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="featstore-write")
        self.bytes_written = 0
        self.seconds: Counter = Counter()

    def _write_one(self, rec: Record) -> int:
        data = encode_pt(rec)
        atomic_write_bytes(self.layout.destination(rec.key), data, fsync=self.fsync)
        crash_point("per-image-written")
        return len(data)

    def write(self, records: list[Record]) -> None:
        """Write a batch of records, one file each."""
        t0 = time.perf_counter()
        self.bytes_written += sum(self.pool.map(self._write_one, records))
        self.seconds["append"] += time.perf_counter() - t0

    def close(self) -> None:
        """Stop the pool."""
        self.pool.shutdown()

    def __enter__(self) -> "PerImageSink":
        return self

    def __exit__(self, *_: Any) -> None:
        self.pool.shutdown()


class BackgroundWriter:
    """Runs ``make_records`` + ``sink.write`` on a thread behind a bounded queue; re-raises its errors."""

    def __init__(self, sink: ShardSink | PerImageSink, make_records: Callable[[Any], list[Record]],
                 on_written: Callable[[list[Record]], None], depth: int = 3):
        self.sink, self.make_records, self.on_written = sink, make_records, on_written
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.wait_seconds = 0.0  # time put() blocked because the queue was full (the writer is the bottleneck)
        self.thread = threading.Thread(target=self._loop, name="featstore-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.q.get()
            if job is None:
                return
            if self.error is not None:
                continue
            try:
                t0 = time.perf_counter()
                records = self.make_records(job)
                self.sink.seconds["device_to_host"] += time.perf_counter() - t0
                self.sink.write(records)
                self.on_written(records)
            except BaseException as e:  # noqa: BLE001 - surfaced to the main thread in put()/close()
                self.error = e

    def put(self, job: Any) -> None:
        """Queue a job (blocks when the queue is full: backpressure on the model loop)."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.q.put(job)
        self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Drain the queue, close the sink, and raise the first writer error, if any."""
        self.q.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        self.sink.close()
