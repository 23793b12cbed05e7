"""``featstore plan``: what a build with these settings will compute and store, without loading the model.

It discovers the samples as the build does (image headers read for their sizes, no pixel decoded; with
``assume_size`` every frame is taken to be that size and no image is looked at), deduplicates them
(:func:`featstore.discover.dedup.dedup_samples`), and counts:

* ``samples``: images (``--context image``) or training samples whose frames all exist;
* ``records``: what the store will hold after deduplication (``failed``: records the build cannot make: a
  frame it cannot read, frames of one sample with different sizes, or a record with ``spar_info`` and no
  ``--frame-transform``);
* ``frames_decoded``: distinct frames the records name (each is decoded at least once; a sample step
  decodes each of its distinct frames once, so a frame used in several steps is decoded again);
* ``frame_passes``: frames run through the model: one per image, one per node of the prefix forest of the
  records' stream orders (``--context sample``: every distinct stream prefix once, as the build's
  ``tree`` schedule), every frame of every record (``--context joint``);
  ``frame_passes_without_sharing``: one pass per frame of every record (no prefix shared);
* ``bytes``: the store per codec, from the record shapes the settings imply and the measured bytes per value
  of :mod:`featstore.build.plan_data`; ``gpu_hours`` at the measured rate (or ``rate``).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from itertools import chain, count
from typing import Any, Sequence

import numpy as np

from featstore.build.options import BuildOptions
from featstore.build.plan_data import (CODEC_BYTES_PER_VALUE, CODEC_MEASURED_IN, DEFAULT_GPU, GPU_RATES,
                                       PER_IMAGE_OVERHEAD_BYTES, RECORD_OVERHEAD_BYTES, SHARD_OVERHEAD_BYTES,
                                       STORE_OVERHEAD_BYTES)
from featstore.constants import NAMED_MODELS, PATCH_SIZE
from featstore.errors import OptionError
from featstore.runtime.fsutil import free_bytes
from featstore.runtime.gcpause import paused_gc

Size = tuple[int, int]  # (H, W) after preprocessing


@dataclass(frozen=True)
class PlanSettings:
    """What ``plan`` adds to the build's options: a frame size to trust (``(W, H)`` of the original images),
    the GPU whose measured rate projects the time, or a rate of one's own (frame passes per second)."""

    assume_size: tuple[int, int] | None = None
    gpu: str = DEFAULT_GPU
    rate: float | None = None


@dataclass
class BuildPlan:
    """The plan's numbers (``to_json`` is ``--json``'s document)."""

    samples: int = 0
    records: int = 0
    frames_decoded: int = 0
    frame_passes: int = 0
    frame_passes_without_sharing: int = 0
    missing: int = 0
    failed: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    gpu: dict[str, Any] = field(default_factory=dict)
    out: str = ""
    free_bytes: int | None = None

    @property
    def projected_bytes(self) -> int:
        """The store's bytes with the chosen codec (per-image stores: their files)."""
        return self.bytes[self.settings["codec"]]

    @property
    def fits(self) -> bool | None:
        """Whether the projected store fits in the free space at the output (None when unknown)."""
        return None if self.free_bytes is None else self.projected_bytes <= self.free_bytes

    def to_json(self) -> dict[str, Any]:
        doc = {k: getattr(self, k) for k in ("samples", "records", "frames_decoded", "frame_passes",
                                             "frame_passes_without_sharing", "missing", "failed", "shapes",
                                             "bytes", "settings", "gpu", "out", "free_bytes")}
        doc.update(projected_bytes=self.projected_bytes, fits=self.fits, bytes_measured_in=CODEC_MEASURED_IN)
        return doc


def parse_assume_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> (640, 480); ValueError naming the value otherwise."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) <= 0 or int(h) <= 0:
        raise ValueError(f"--assume-size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 640x480")
    return int(w), int(h)


def model_width(model: str) -> tuple[int, int, str]:
    """(channels per token, special tokens, which config) of the model, read from its name only: a named model's
    config, else VGGT-1B's (the checkpoint is not opened)."""
    from featstore.model.config import get_config

    name = NAMED_MODELS.get(model, "vggt-1b")
    c = get_config(name)
    return 2 * c.embed_dim, c.num_register_tokens + 1, name if model in NAMED_MODELS else "vggt-1b (assumed)"


def store_dtype(opts: BuildOptions) -> str:
    """The dtype records are stored in: ``--dtype``, else bfloat16 for a CUDA device, float32 otherwise."""
    return opts.dtype or ("bfloat16" if str(opts.device).startswith("cuda") else "float32")


# ---------------------------------------------------------------- what is computed

@dataclass
class _Records:
    """The records to compute: frame keys in stream order, frame keys in training order, and paths."""

    frames: list[tuple[str, ...]] = field(default_factory=list)
    streams: list[tuple[str, ...]] = field(default_factory=list)
    paths: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    missing: int = 0
    refused: int = 0


def _discover(opts: BuildOptions, settings: PlanSettings) -> _Records:
    """Discover and deduplicate as the build does (``assume_size``: no image looked at)."""
    from featstore.build.discovery import discover_records
    from featstore.build.transform import no_transform_problem
    from featstore.discover import discover_images
    from featstore.discover.samples import stream_order

    trust = settings.assume_size is not None
    exclude = [opts.out] if opts.out is not None and not str(opts.out).startswith(("s3:", "gs:")) else []
    out = _Records()
    if opts.context == "image":
        found = discover_images(opts.data_root, annotations=tuple(opts.annotations), image_list=opts.image_list,
                                data_path=opts.data_path, find_annotations=True, exclude=exclude,
                                strict=opts.strict_annotations, trust_files=trust)
        out.frames = out.streams = [(i.key,) for i in found.items]
        out.paths = {i.key: str(i.path) for i in found.items}
        out.samples, out.missing = len(found.items), len(found.missing)
        return out
    found, plans = discover_records(opts.data_root, annotations=tuple(opts.annotations), data_path=opts.data_path,
                                    exclude=exclude, strict=opts.strict_annotations,
                                    reference_frame=opts.reference_frame, history=opts.history,
                                    history_pad=opts.history_pad, trust_files=trust)
    found.items.clear()  # the records hold what is needed (a plan of 612k samples stays under 1 GB)
    for plan in plans:
        out.samples += plan.samples
        if not opts.frame_transform and no_transform_problem(plan.annotation):  # type: ignore[arg-type]
            out.refused += 1  # the build refuses it with a ledger line (no --frame-transform)
            continue
        out.frames.append(plan.frames)
        out.streams.append(stream_order(plan.sample))
        if not trust:  # the headers to read
            out.paths.update(zip(plan.frames, plan.paths))
    out.missing = len(found.missing)
    return out


def _frame_sizes(recs: _Records, opts: BuildOptions, settings: PlanSettings) -> dict[str, Size | None] | Size:
    """Each frame's preprocessed (H, W): from its header (None when it cannot be read), or the one assumed size."""
    from featstore.model.preprocess import preprocessed_size

    if settings.assume_size is not None:
        return preprocessed_size(*settings.assume_size, opts.preprocess, opts.image_size)
    from featstore.build.pipeline import DecodeOptions, preprocessed_size_of

    dec = DecodeOptions(mode=opts.preprocess, image_size=opts.image_size, apply_exif=opts.apply_exif)

    def probe(path: str) -> Size | None:
        try:
            return preprocessed_size_of(path, dec)
        except Exception:  # an unreadable header: the build fails this frame's records the same way
            return None

    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="featstore-plan") as pool:
        return dict(zip(recs.paths, pool.map(probe, recs.paths.values())))


def count_prefix_nodes(streams: Sequence[Sequence[str]]) -> int:
    """Distinct non-empty prefixes of the streams: the nodes of their prefix forest, i.e. the frame passes when
    every shared prefix is computed once (exact: prefixes are numbered depth by depth with ``np.unique``)."""
    if not streams:
        return 0
    ids: defaultdict[str, int] = defaultdict(count().__next__)
    flat = np.fromiter(map(ids.__getitem__, chain.from_iterable(streams)), dtype=np.int32)
    lengths = np.fromiter(map(len, streams), dtype=np.int32, count=len(streams))
    table = np.full((len(streams), int(lengths.max())), -1, dtype=np.int32)
    cols = np.arange(len(flat), dtype=np.int32) - np.repeat(np.cumsum(lengths, dtype=np.int32) - lengths, lengths)
    table[np.repeat(np.arange(len(streams), dtype=np.int32), lengths), cols] = flat
    del flat, cols
    longest, nodes, parent = table.shape[1], 0, np.zeros(len(streams), dtype=np.int64)
    for depth in range(longest):
        alive = table[:, depth] >= 0
        keys = parent[alive] * len(ids) + table[alive, depth]
        uniq, inverse = np.unique(keys, return_inverse=True)
        nodes += len(uniq)
        parent, table = inverse.astype(np.int64), table[alive]
    return nodes


# ---------------------------------------------------------------- what is stored, how long it takes

def _record_shapes(recs: _Records, sizes: dict[str, Size | None] | Size, opts: BuildOptions
                   ) -> tuple[Counter, int, list[int]]:
    """(records per feature shape ``[S, P, C]``, records that cannot be built, indexes of the buildable ones):
    a record fails when a frame cannot be read or its frames differ in size (they must share one)."""
    channels, special = model_width(opts.model)[:2]
    extra = special if opts.tokens == "all" else 0
    frames_of = (lambda fs: len(fs)) if opts.context == "joint" else (lambda fs: 1)
    if isinstance(sizes, tuple):  # one assumed size: every record can be built
        tokens = (sizes[0] // PATCH_SIZE) * (sizes[1] // PATCH_SIZE) + extra
        return Counter((frames_of(fs), tokens, channels) for fs in recs.frames), 0, list(range(len(recs.frames)))
    shapes: Counter = Counter()
    ok, failed = [], 0
    for n, frames in enumerate(recs.frames):
        got = {sizes.get(f) for f in frames}
        if None in got or len(got) != 1:
            failed += 1
            continue
        h, w = got.pop()  # type: ignore[misc]
        shapes[(frames_of(frames), (h // PATCH_SIZE) * (w // PATCH_SIZE) + extra, channels)] += 1
        ok.append(n)
    return shapes, failed, ok


def _bytes(shapes: Counter, opts: BuildOptions) -> dict[str, int]:
    """The projected store per codec (shard stores) or of its ``.pt`` files (per-image stores)."""
    dtype = store_dtype(opts)
    values = sum(s * p * c * n for (s, p, c), n in shapes.items()) * len(opts.layers)
    records = sum(shapes.values())
    if opts.format == "per-image":
        per = CODEC_BYTES_PER_VALUE["raw"][dtype]
        return {"per-image": int(values * per + records * PER_IMAGE_OVERHEAD_BYTES)}
    out = {}
    for codec, per in CODEC_BYTES_PER_VALUE.items():
        body = values * per[dtype] + records * RECORD_OVERHEAD_BYTES
        shards = max(1, -(-int(body) // opts.shard_size))
        out[codec] = int(body + STORE_OVERHEAD_BYTES + shards * SHARD_OVERHEAD_BYTES)
    return out


def _gpu(frame_passes: int, shapes: Counter, opts: BuildOptions, settings: PlanSettings) -> dict[str, Any]:
    """GPU time at the measured rate of ``settings.gpu`` for this context (scaled to the records' patches),
    or at ``settings.rate``."""
    frames = sum((s if opts.context == "joint" else 1) * n for (s, _, _), n in shapes.items())
    patches = sum(p * (s if opts.context == "joint" else 1) * n for (s, p, _), n in shapes.items()) / max(1, frames)
    if settings.rate is not None:
        rate, where = settings.rate, "--rate"
    else:
        measured = GPU_RATES[settings.gpu][opts.context]
        rate = measured.frames_per_s * measured.patches / patches if patches else measured.frames_per_s
        where = f"{measured.measured_in}; scaled from {measured.patches} to {patches:.0f} patches per frame"
    hours = frame_passes / rate / 3600 if rate > 0 else None
    return {"name": None if settings.rate is not None else settings.gpu, "frame_passes_per_s": round(rate, 3),
            "hours": None if hours is None else round(hours, 3), "rate_measured_in": where}


def _free_at(out: Path | str | None, data_root: Path) -> tuple[str, int | None]:
    """The output location and the free bytes of the filesystem it will be on (None for a URL)."""
    where = str(out) if out is not None else str(Path(data_root) / "vggt_featstore")
    if "://" in where:
        return where, None
    probe = Path(where).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return where, free_bytes(probe)


def check_plan_settings(opts: BuildOptions, settings: PlanSettings) -> None:
    """OptionError for a GPU without measured rates or a rate that is not positive."""
    if settings.rate is not None and not settings.rate > 0:
        raise OptionError(f"--rate {settings.rate}: expected frame passes per second, a positive number")
    if settings.rate is None and settings.gpu not in GPU_RATES:
        raise OptionError(f"--gpu {settings.gpu}: no measured rates for it (measured: {', '.join(GPU_RATES)}); "
                          "pass --rate FRAMES_PER_S with a rate measured on your GPU (benchmarks/gpu_bench.py)")
    if settings.assume_size is not None and opts.history is not None:
        raise OptionError("--assume-size trusts annotation files, but --history makes samples from the image files "
                          "of episode folders: pass --annotations, or drop --assume-size")


def plan_build(opts: BuildOptions, settings: PlanSettings = PlanSettings()) -> BuildPlan:
    """The plan of a build with ``opts`` (see the module docs); reads no pixel and loads no model."""
    check_plan_settings(opts, settings)
    with paused_gc():
        recs = _discover(opts, settings)
    shapes, failed, ok = _record_shapes(recs, _frame_sizes(recs, opts, settings), opts)
    frames = recs.frames if len(ok) == len(recs.frames) else [recs.frames[n] for n in ok]
    passes_plain = sum(map(len, frames))
    streams = recs.streams if len(ok) == len(recs.streams) else [recs.streams[n] for n in ok]
    passes = count_prefix_nodes(streams) if opts.context == "sample" else passes_plain
    plan = BuildPlan(samples=recs.samples, records=len(frames), frames_decoded=len(set(chain.from_iterable(frames))),
                     frame_passes=passes, frame_passes_without_sharing=passes_plain, missing=recs.missing,
                     failed=failed + recs.refused, shapes={f"[{s}, {p}, {c}]": n for (s, p, c), n in sorted(shapes.items())},
                     bytes=_bytes(shapes, opts))
    plan.settings = {"context": opts.context, "format": opts.format, "codec": "per-image" if opts.format ==
                     "per-image" else opts.codec, "dtype": store_dtype(opts), "layers": len(opts.layers),
                     "tokens": opts.tokens, "image_size": opts.image_size, "preprocess": opts.preprocess,
                     "model": model_width(opts.model)[2], "assume_size": settings.assume_size}
    plan.gpu = _gpu(passes, shapes, opts, settings)
    plan.out, plan.free_bytes = _free_at(opts.out, opts.data_root)
    return plan
