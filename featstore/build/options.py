"""``featstore build``'s options: :class:`BuildOptions` (every default defined here, once: the CLI and the
environment stand-ins read them), and the checks that run before anything is read or written.

Each problem is an :class:`~featstore.errors.OptionError` whose message names the value as the user set it
(``--zstd-level 99`` or ``BATCH_SIZE=0``, see ``BuildOptions.origins``), what was expected, and what to do.
Checks that need the model (a layer index against its depth) happen when the model is loaded, still before
any output is created.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featstore.constants import DEFAULT_IMAGE_SIZE, JANUSVLN_IMAGE_SIZE, PATCH_SIZE, is_patch_multiple
from featstore.errors import OptionError
from featstore.formats.layout import DEFAULT_SHARD_BYTES

MAX_ZSTD_LEVEL = 22
CONTEXTS = ("image", "sample", "joint")
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass
class BuildOptions:
    """Everything ``featstore build`` needs; the CLI fills it from flags and environment stand-ins, and takes
    the defaults it shows in ``--help`` from here."""

    data_root: Path
    model: str
    out: Path | None = None
    format: str = "shards"
    annotations: list[Path] = field(default_factory=list)
    image_list: Path | None = None
    data_path: str | None = None
    strict_annotations: bool = False
    batch_size: int = 16
    device: str = "cuda:0"
    dtype: str | None = None
    layers: tuple[int, ...] = (-2,)
    preprocess: str = "crop"
    image_size: int = DEFAULT_IMAGE_SIZE
    # "image": a record per image; "sample": a record per training sample, its frames streamed (JanusVLN);
    # "joint": a record per sample, its frames through the aggregator together (VG-LLM)
    context: str = "image"
    reference_frame: str = "first"
    history: int | None = None  # samples from episode folders with JanusVLN's history rule
    history_pad: bool = False
    autocast: bool = False  # the old spelling of precision="amp"
    precision: str | None = None  # a recipe of featstore.model.precision; None: fp32 on CPU, bf16 on GPUs with bf16
    frame_transform: str | None = None  # "MODULE:FUNCTION" giving the images VGGT sees of a sample's frames
    apply_exif: bool = False
    tokens: str = "patch"
    shard_size: int = DEFAULT_SHARD_BYTES
    shard_prefix: str = "vggt"
    skip_existing: bool = True
    rebuild_stale: bool = False
    hash_inputs: bool = False
    allow_failures: int = 0
    num_workers: int = min(8, os.cpu_count() or 1)
    writer_threads: int = 4
    zstd_level: int = 1
    codec: str = "zstd"  # shard codec of every tensor (featstore.formats.codecs)
    compile: str = "auto"  # torch.compile of the model's blocks: auto (on for CUDA devices), on, off
    num_parts: int = 1
    part: int = 0
    max_pixels: int | None = None
    fsync: bool = True
    progress: bool = True
    origins: dict[str, str] = field(default_factory=dict)  # option -> the flag or variable that set it (messages)
    storage_options: dict[str, Any] | None = None  # for an --out URL (s3://...); never written anywhere


def build_default(name: str) -> Any:
    """The default of the :class:`BuildOptions` field ``name``."""
    f = BuildOptions.__dataclass_fields__[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise KeyError(f"BuildOptions.{name} has no default (it is required)")


def shown(opts: Any, dest: str, value: Any = None) -> str:
    """How the user set option ``dest``: ``--flag value``, or ``VAR=value`` when it came from the environment."""
    origin = getattr(opts, "origins", {}).get(dest) or "--" + dest.replace("_", "-")
    value = getattr(opts, dest) if value is None else value
    if isinstance(value, (tuple, list)):
        value = ",".join(map(str, value))
    return f"{origin}={value}" if not origin.startswith("-") or str(value).startswith("-") else f"{origin} {value}"


def _at_least(opts: Any, dest: str, low: int, meaning: str) -> None:
    value = getattr(opts, dest)
    if value is not None and value < low:
        raise OptionError(f"{shown(opts, dest)}: expected {meaning}, at least {low}")


def check_device(opts: Any) -> None:
    """The device must be one torch knows (cpu, cuda, cuda:N, mps) and, for cuda:N, a GPU that exists."""
    import torch

    try:
        dev = torch.device(str(opts.device))
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise OptionError(f"{shown(opts, 'device')}: not a device featstore can use; use cpu, cuda or cuda:N "
                          f"(the GPU index)")
    if dev.type == "cuda" and dev.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if dev.index >= count:
            raise OptionError(f"{shown(opts, 'device')}: this machine has {count} GPU(s) (cuda:0..cuda:{count - 1})")


def check_layers(opts: Any) -> None:
    """At least one layer, none requested twice as written (ranges are checked against the model's depth)."""
    layers = list(opts.layers)
    if not layers:
        raise OptionError(f"{shown(opts, 'layers', '')}: expected at least one layer index, e.g. --layers=-2")
    repeated = sorted({i for i in layers if layers.count(i) > 1})
    if repeated:
        raise OptionError(f"{shown(opts, 'layers')}: layer {repeated[0]} is requested twice; list each layer once")


def check_output_writable(out: Path) -> None:
    """The output folder (or the nearest folder that exists above it) must be writable by this process."""
    probe = Path(out)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise OptionError(f"output folder {out} is not writable ({probe} does not allow this user to write); "
                          f"choose a writable --out or fix the folder's permissions")


def check_build_options(opts: Any) -> None:
    """Every check that needs neither the model nor the data: raises OptionError at the first problem."""
    if not opts.model:
        raise OptionError("--model is required: pass the VGGT checkpoint (a folder or file), 'tiny' for the "
                          "built-in test model, or set VGGT_MODEL_PATH")
    if not opts.data_root:
        raise OptionError("--data-root is required: pass the folder of training images, or set DATA_ROOT")
    _at_least(opts, "batch_size", 1, "a whole number of images per forward pass")
    _at_least(opts, "num_workers", 0, "a number of decoding processes (0 decodes in the main process)")
    _at_least(opts, "writer_threads", 1, "a number of writer threads")
    _at_least(opts, "allow_failures", 0, "a number of images allowed to fail")
    _at_least(opts, "num_parts", 1, "a number of job-array parts")
    _at_least(opts, "max_pixels", 1, "a pixel count")
    if not 1 <= opts.zstd_level <= MAX_ZSTD_LEVEL:
        raise OptionError(f"{shown(opts, 'zstd_level')}: expected a zstd level from 1 to {MAX_ZSTD_LEVEL} (1 is "
                          f"fastest and compresses features about as well as higher levels)")
    if not 0 <= opts.part < opts.num_parts:
        raise OptionError(f"{shown(opts, 'part')}: expected a part index from 0 to {opts.num_parts - 1} "
                          f"(--num-parts {opts.num_parts})")
    check_layers(opts)
    check_device(opts)
    check_context(opts)


def check_precision(opts: Any) -> None:
    """``--precision`` names a recipe and agrees with ``--autocast`` (its old spelling for amp)."""
    from featstore.model.precision import resolve_precision

    resolve_precision(getattr(opts, "precision", None), True if getattr(opts, "autocast", False) else None)


def check_context(opts: Any) -> None:
    """Image size, codec and the training-sample options (--context sample, --history) fit together."""
    size = opts.image_size
    if not is_patch_multiple(size):
        raise OptionError(f"{shown(opts, 'image_size')}: expected a positive multiple of {PATCH_SIZE} (the patch "
                          f"size): use {DEFAULT_IMAGE_SIZE} (official VGGT) or {JANUSVLN_IMAGE_SIZE} (JanusVLN)")
    if opts.context not in CONTEXTS:
        raise OptionError(f"{shown(opts, 'context')}: expected image, sample or joint")
    _at_least(opts, "history", 0, "a number of history frames, e.g. 8")
    if (opts.history is not None or opts.history_pad) and opts.context == "image":
        raise OptionError("--history and --history-pad make training samples: add --context sample (or "
                          "--preset janusvln)")
    if opts.context != "image" and opts.format != "shards":
        raise OptionError(f"--context {opts.context} writes shard stores only: a per-image cache file beside an image "
                          f"cannot hold a sample's features, which depend on every frame of the sample; drop "
                          f"--format per-image")
    if getattr(opts, "frame_transform", None) and opts.context != "joint":
        raise OptionError(f"{shown(opts, 'frame_transform')} transforms the frames of a joint sample: add --context "
                          f"joint (or --preset vgllm)")
    check_precision(opts)
    if getattr(opts, "codec", "zstd") != "zstd" and opts.format != "shards":
        raise OptionError(f"{shown(opts, 'codec')} needs --format shards (per-image caches are torch.save files); "
                          f"drop --codec or write shards")
