"""The ``featstore`` command line: build, verify, export, merge (every parser is defined here; the module
that runs a command is imported when it runs, and a failed import is one ``[ERROR]`` line naming it).

Every option of ``build`` that users' existing scripts set through the environment (``VGGT_MODEL_PATH``,
``DATA_ROOT``, ``BATCH_SIZE``, ``DEVICE``, ``SKIP_EXISTING``) takes its default from there (see
:mod:`featstore.runtime.env`); a flag always wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from featstore import __version__
from featstore.build.env_defaults import resolve_build_env
from featstore.errors import FeatstoreError
from featstore.formats.layout import DEFAULT_SHARD_BYTES
from featstore.storage import add_storage_options_argument, is_remote, redact, storage_options_of
from featstore.build.options import BuildOptions, build_default

SUCCESS = 25
#: formats.codecs.CODECS, spelled out because importing that module loads torch (tests pin the two equal)
CODEC_CHOICES = ("zstd", "raw", "int8")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte size such as ``512MB``, ``2GB``, ``1.5GiB`` or ``1000000`` (KB/MB/GB are powers of 1000)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use a number with an optional unit, e.g. 512MB, 2GB")
    base = 1024 if m.group(3) else 1000
    exp = " KMGT".index(m.group(2).upper() or " ")
    size = int(float(m.group(1)) * base**exp)
    if size < 1024:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (at least 1KB)")
    return size


def format_size(n: int) -> str:
    """``n`` bytes as users type it (``1GB``, ``512MB``): the largest unit of :func:`parse_size` dividing it."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_layers(layers: Sequence[int]) -> str:
    """Layer indices as users type them: ``-2`` or ``22,23``."""
    return ",".join(map(str, layers))


def parse_layers(text: str) -> tuple[int, ...]:
    """Parse ``-2`` or ``-2,-1`` or ``22,23`` into a tuple of ints."""
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer indices: use comma-separated integers "
                                         f"such as -2 or 22,23") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one layer")
    return layers


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` in the form users type (``-2``, ``1GB``; ``none`` for an unset value), but not for
    on/off flags or helps that state their default themselves (environment stand-ins, machine-dependent ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                                argparse._VersionAction, argparse._HelpAction)) or "default" in text or not action.option_strings):
            return text
        if action.default is None:
            return text + " (default: none)"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with one ``[ERROR]`` line (exit 2) for a bad command line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"[ERROR] {message}; see `{self.prog} --help`\n")
        raise SystemExit(2)


def _skip_existing_flags(p: argparse._ActionsContainer) -> None:
    on = "on" if build_default("skip_existing") else "off"
    p.add_argument("--skip-existing", dest="skip_existing", action="store_const", const=True, default=None,
                   help=f"skip images whose features are already stored (default: {on}, or $SKIP_EXISTING)")
    p.add_argument("--no-skip-existing", dest="skip_existing", action="store_const", const=False,
                   help="rebuild every image")


#: Option values a preset stands for; options the user passes explicitly win over them.
PRESETS = {"janusvln": {"context": "sample", "image_size": 644, "preprocess": "crop", "layers": (-2,),
                        "reference_frame": "first", "autocast": True}}
#: The options a preset may set: left unset (None) by the parser, filled by :func:`apply_preset`.
PRESET_FIELDS = ("context", "image_size", "preprocess", "layers", "reference_frame", "autocast")


def preset_flags(name: str) -> str:
    """What a preset stands for, as flags (``--context sample --image-size 644 ...``)."""
    flags = []
    for dest, value in PRESETS[name].items():
        flag = "--" + dest.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            flags.append(f"{flag}={format_layers(value)}")
        else:
            flags.append(f"{flag} {value}")
    return " ".join(flags)


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options left unset from the chosen preset, then from the defaults of :class:`BuildOptions`."""
    preset = PRESETS.get(args.preset or "", {})
    for name in PRESET_FIELDS:
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, build_default(name)))


def add_build_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore build`` and its options."""
    p = sub.add_parser(
        "build", help="precompute features for a data set into a store",
        formatter_class=HelpFormatter,
        description="Discover images, run batched VGGT inference in a pipelined loop, and write per-image "
                    ".vggt_cache.pt files or zstd tar shards with an index. Resumable: re-running skips finished "
                    "images. Multi-GPU / multi-node: `torchrun --nproc-per-node N -m featstore build ...`. "
                    "DATA_ROOT, VGGT_MODEL_PATH, BATCH_SIZE, DEVICE and SKIP_EXISTING stand in for their flags.")
    _build_inputs_args(p)
    _build_output_args(p)
    _build_model_args(p)
    _build_samples_args(p)
    _build_resume_args(p)
    _build_scale_out_args(p)
    p.set_defaults(func=_cmd_build)


def _build_inputs_args(p: argparse.ArgumentParser) -> None:
    """Where the images and annotations come from."""
    g = p.add_argument_group("inputs")
    g.add_argument("--data-root", type=Path,
                   help="root folder of the training images; relative image paths resolve against it "
                        "(required, default: $DATA_ROOT: the environment variable stands in for the flag)")
    g.add_argument("--model",
                   help="VGGT checkpoint: a folder or a model.safetensors / model.pt / sharded index file; "
                        "'tiny' for the built-in test model (required, default: $VGGT_MODEL_PATH: the environment "
                        "variable stands in for the flag)")
    g.add_argument("--annotations", type=Path, action="append", default=[],
                   help="a .jsonl or .json annotation file (or a folder of them) listing images; repeatable "
                        "(default: every *.jsonl and annotations.json found under the data root, featstore's own "
                        "files excluded; with none there and no --image-list, the data root is scanned for "
                        "jpg/jpeg/png/webp/bmp)")
    g.add_argument("--image-list", type=Path, help="text file with one image path per line (relative to the data root)")
    g.add_argument("--data-path", help="sub-folder of the data root that relative annotation paths resolve against "
                                       "first (as in JanusVLN data configs)")
    g.add_argument("--strict-annotations", action="store_true",
                   help="stop with an error at a malformed annotation line (default: report it with file and "
                        "line, skip it, and count it in the manifest, as the original scripts skip it)")


def _build_output_args(p: argparse.ArgumentParser) -> None:
    """What the store looks like on disk."""
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("shards", "per-image"), default=build_default("format"),
                   help="shards: zstd-compressed tar shards + index under --out; per-image: "
                        "<image>.vggt_cache.pt beside each image (or mirrored under --out), what existing "
                        "training code loads")
    g.add_argument("--out", type=_out_location, help="output folder, or for shards an fsspec URL such as "
                                                     "s3://bucket/prefix (see docs/object-storage.md; shards default: "
                                                     "DATA_ROOT/vggt_featstore; per-image default: beside the images)")
    g.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="storage dtype (default, machine-dependent: bfloat16 on GPUs with bf16, float16 on older "
                        "GPUs, float32 on CPU)")
    g.add_argument("--layers", type=parse_layers, default=None,
                   help="comma-separated aggregator layers to store, written --layers=-2,-1 when the first is "
                        "negative; the first is stored as 'features', others as 'layer_<i>'; -2 is the layer "
                        f"JanusVLN uses (default: {format_layers(build_default('layers'))})")
    g.add_argument("--tokens", choices=("patch", "all"), default=build_default("tokens"),
                   help="patch: patch tokens only [1, P, 2C] (JanusVLN); all: camera + register + patch tokens")
    g.add_argument("--shard-size", type=parse_size, default=format_size(build_default("shard_size")),
                   help="target shard size, e.g. 512MB or 2GB")
    g.add_argument("--shard-prefix", default=build_default("shard_prefix"),
                   help="shard file name prefix: <prefix>-<rank>-<n>.tar")
    g.add_argument("--zstd-level", type=int, default=build_default("zstd_level"),
                   help="zstd level, 1-22 (1 is fastest and, with byte shuffling, compresses bf16 features best)")
    g.add_argument("--codec", choices=CODEC_CHOICES, default=build_default("codec"),
                   help="shard codec per tensor: zstd (lossless, byte-shuffled), raw (uncompressed, fastest "
                        "reads), int8 (lossy: about 0.8%% relative L2 error, stored in each record; 2.5-2.6 MB "
                        "per 518x518 bf16 image, zstd 3.8). Readers need no flag; see docs/building.md")


def _build_model_args(p: argparse.ArgumentParser) -> None:
    """The model, its device and how images are preprocessed and fed."""
    g = p.add_argument_group("model and preprocessing")
    g.add_argument("--preprocess", choices=("crop", "pad", "janusvln"), default=None,
                   help="crop/pad: the official VGGT load_and_preprocess_images at --image-size (JanusVLN feeds "
                        "VGGT 644-pixel crop images, NewJanusVLN 644-pixel pad images); janusvln: pad then resize "
                        "each side down to a multiple of 28, kept for stores built with it "
                        f"(default: {build_default('preprocess')})")
    g.add_argument("--image-size", type=int, default=None,
                   help="target size N, a multiple of 14: crop makes images N wide, pad N x N (default: "
                        f"{build_default('image_size')}, the official model; JanusVLN uses "
                        f"{PRESETS['janusvln']['image_size']})")
    g.add_argument("--apply-exif", action="store_true",
                   help="rotate images by their EXIF orientation (the official code ignores it; only use this if "
                        "your training code does the same)")
    g.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this (decompression-bomb "
                                                  "guard; default: 178956970, Pillow's own limit)")
    g.add_argument("--device",
                   help="torch device: cpu, cuda or cuda:N; falls back to cpu with a warning when CUDA is absent; "
                        "under torchrun each rank uses cuda:LOCAL_RANK "
                        f"(default: {build_default('device')}, or $DEVICE)")
    g.add_argument("--batch-size", type=int,
                   help="images per forward pass (--context sample: frame streams per step, which sets the KV "
                        "cache memory, see docs/building.md); halved automatically on CUDA out of memory "
                        f"(default: {build_default('batch_size')}, or $BATCH_SIZE)")
    g.add_argument("--compile", action="store_true",
                   help="run the model under torch.compile (faster on GPU after warm-up)")
    g.add_argument("--num-workers", type=int, default=build_default("num_workers"),
                   help="DataLoader processes decoding images (0: decode in the main process); one decodes roughly "
                        "30 640x480 JPEGs/s, so a GPU at 150 images/s needs about 6 (default, machine-dependent: "
                        "the number of CPUs, at most 8)")
    g.add_argument("--writer-threads", type=int, default=build_default("writer_threads"),
                   help="threads compressing and writing records")


def _build_samples_args(p: argparse.ArgumentParser) -> None:
    """Training samples: records with causal context (--context sample) and the presets."""
    g = p.add_argument_group("training samples (records with causal context, as JanusVLN computes them)")
    g.add_argument("--context", choices=("image", "sample"), default=None,
                   help="image: one record per image, no context; sample: one record per training sample, its "
                        "frames streamed through VGGT with a KV cache as JanusVLN's training does, the last fed "
                        "frame's tokens kept; samples come from annotation records (images, history_images + "
                        "current_image, image) or episode folders with --history "
                        f"(default: {build_default('context')})")
    g.add_argument("--reference-frame", choices=("first", "last"), default=None,
                   help="JanusVLN's reference_frame: first streams the frames oldest first and keeps the current "
                        "frame's tokens; last streams them newest first and keeps the oldest frame's "
                        f"(default: {build_default('reference_frame')})")
    g.add_argument("--history", type=int, default=None, metavar="N",
                   help="make samples from episode folders (frames sorted by name) instead of annotations: one per "
                        "frame i, frames range(i+1) while i <= N, else linspace(0, i, N+1) (JanusVLN: 8)")
    g.add_argument("--history-pad", action="store_true",
                   help="with --history: repeat frame 0 in front until a sample has N+1 frames (NewJanusVLN)")
    g.add_argument("--autocast", dest="autocast", action="store_true", default=None,
                   help="keep the weights in fp32 and run VGGT under torch.autocast in bf16 (fp16 on GPUs without "
                        "bf16), as JanusVLN's forward does; without it the model runs with bf16 weights on GPUs "
                        "(the same rounding at every matmul, not the same bits) and fp32 on CPU")
    g.add_argument("--no-autocast", dest="autocast", action="store_false", help="run the model in its own dtype")
    g.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help=f"janusvln = {preset_flags('janusvln')}; flags given explicitly win")


def _build_resume_args(p: argparse.ArgumentParser) -> None:
    """Resume, staleness and failure tolerance."""
    g = p.add_argument_group("resume and incremental builds")
    _skip_existing_flags(g)
    g.add_argument("--rebuild-stale", action="store_true",
                   help="rebuild records whose source image changed since they were built: for records built "
                        "with --hash-inputs the content (sha256) decides, for the others size and mtime; "
                        "featstore verify reports stale records by the same rule")
    g.add_argument("--hash-inputs", action="store_true",
                   help="record a sha256 of each source image in its record, so that staleness (--rebuild-stale, "
                        "verify) is judged by content, not by size and mtime")
    g.add_argument("--allow-failures", type=int, default=build_default("allow_failures"),
                   help="exit 0 even if up to N images fail to decode (they are listed in the failures ledger)")


def _build_scale_out_args(p: argparse.ArgumentParser) -> None:
    """Job arrays, fsync, progress and storage."""
    g = p.add_argument_group("scale-out")
    g.add_argument("--num-parts", type=int, default=build_default("num_parts"),
                   help="split the job into K parts (job arrays); run each with --part i, then `featstore merge`")
    g.add_argument("--part", type=int, default=build_default("part"), help="which part this job builds (0-based)")
    g.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="skip fsync after writes (faster on some network filesystems; less safe on power loss)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_storage_options_argument(g)


def _out_location(text: str) -> Path | str:
    """``--out``: a local folder (Path) or an fsspec URL kept as text."""
    return text if is_remote(text) else Path(text)


def build_options_of(args: argparse.Namespace) -> BuildOptions:
    """The :class:`BuildOptions` a parsed ``featstore build`` command line asks for: flags, then their environment
    stand-ins, then the preset, then the defaults. Raises ValueError (or OptionError) naming a bad value."""
    flags = {name: getattr(args, name) for name in ("model", "data_root", "batch_size", "device", "skip_existing")}
    env, origins = resolve_build_env(flags)
    if args.skip_existing is False:
        origins["skip_existing"] = "--no-skip-existing"
    apply_preset(args)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildOptions) if hasattr(args, f.name)}
    values.update(env, annotations=list(args.annotations), origins=origins, storage_options=storage_options_of(args))
    values["data_root"] = Path(env["data_root"]) if env["data_root"] else None
    return BuildOptions(**values)


def _cmd_build(args: argparse.Namespace) -> int:
    try:
        opts = build_options_of(args)
    except (ValueError, FeatstoreError) as e:
        logging.getLogger("featstore").error("%s", e)
        return 2
    return command_module("featstore.build.orchestrator").run_build(opts)


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore merge``."""
    p = sub.add_parser("merge", help="join the parts of a job-array build into one index and manifest",
                       description="Merge the part files that `featstore build --num-parts K --part i` jobs leave "
                                   "into one index and manifest. Safe to re-run.")
    p.add_argument("store", type=_out_location, help="the shard store folder or URL (--out of the builds), or the "
                                                     "per-image root")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    from featstore.errors import StoreError
    from featstore.formats.layout import PER_IMAGE_MANIFEST
    from featstore.formats.locate import locate_store
    from featstore.build.merge import merge_per_image_store, merge_shard_store

    log = logging.getLogger("featstore")
    try:
        loc = locate_store(args.store, storage_options_of(args), unmerged=True)
        if loc.layout == "per-image":
            m = merge_per_image_store(Path(loc.root), Path(loc.root) / PER_IMAGE_MANIFEST)
        else:
            m = merge_shard_store(loc.storage)
    except (StoreError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("merged: %d records of %d images (complete: %s)", m["processed_images"], m["total_images"], m["complete"])
    return 0


def add_verify_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore verify``."""
    p = sub.add_parser(
        "verify", help="check that a store is complete and right",
        formatter_class=HelpFormatter,
        description="Check a shard store or a data root with per-image caches: counts, every record (decode, "
                    "checksum, dtype/shape, finite values, provenance, stale sources), the images the build's "
                    "recorded sources name, shard sha256/size/tar structure, stray temporary files, locks and the "
                    "index. Checks that could not run are printed as skipped. Exit 0: everything holds; 1: problems "
                    "found; 2: verification could not run. See docs/verify.md.")
    p.add_argument("path", help="shard store folder or URL (s3://bucket/prefix, any fsspec URL), per-image "
                                "cache/data root, or a manifest file")
    p.add_argument("--data-root", help="where the images are now (default: the manifest's data root); the store's "
                                       "recorded sources are listed there to find missing images and orphan "
                                       "features, or, for a store that recorded none, the folder is scanned")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="re-run the model on N seeded records and compare within the stored dtype's tolerance")
    p.add_argument("--model", help="checkpoint for --recompute ('tiny' for the test model); default: the model "
                                   "the manifest records, when it is a built-in name or an existing path")
    p.add_argument("--device", default="cpu",
                   help="torch device --recompute runs the model on: cpu, cuda or cuda:N (in float32; falls back to "
                        "cpu with a warning when CUDA is absent)")
    p.add_argument("--sample", type=int, metavar="N", help="check only N seeded records (fast partial check)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample and --recompute")
    p.add_argument("--json", nargs="?", const="", metavar="REPORT",
                   help="write the machine-readable report to the file REPORT, or to stdout with --json - (the "
                        "table then goes to stderr)")
    p.add_argument("--workers", type=int, help="checking processes (default: the number of CPUs, at most 8; "
                                               "machine-dependent)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_verify)


def _verify_usage_problem(args: argparse.Namespace) -> str | None:
    """Why verify's command line cannot run, or None."""
    from featstore.errors import OptionError
    from featstore.build.options import check_device

    if args.json == "":
        return "--json needs a value: give a file path for the report, or - to write it to stdout"
    for flag, value, low in (("--workers", args.workers, 1), ("--recompute", args.recompute, 0),
                             ("--sample", args.sample, 1)):
        if value is not None and value < low:
            return f"{flag} {value}: expected an integer of at least {low}"
    try:
        check_device(args)
    except OptionError as e:
        return str(e)
    return None


def _write_json(target: str, doc: dict) -> None:
    """Write a JSON document to the file ``target`` (atomically) or, for ``-``, to stdout."""
    import json

    from featstore.runtime.fsutil import atomic_write_json

    if target == "-":
        sys.stdout.write(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    atomic_write_json(Path(target), doc)


def _cmd_verify(args: argparse.Namespace) -> int:
    from featstore.errors import FeatstoreError
    from featstore.storage import redact

    verify = command_module("featstore.verify").verify
    log = logging.getLogger("featstore")
    problem = _verify_usage_problem(args)
    if problem:
        log.error("%s", problem)
        return 2
    try:
        report = verify(args.path, data_root=args.data_root, sample=args.sample, seed=args.seed,
                        workers=args.workers, progress=args.progress and sys.stderr.isatty(),
                        recompute_n=args.recompute, model=args.model, device=args.device,
                        storage_options=storage_options_of(args))
    except (FeatstoreError, OSError, ValueError) as e:
        log.error("verification could not run: %s", e)
        if args.json:
            _write_json(args.json, {"path": redact(str(args.path)), "ok": False, "exit_code": 2, "error": redact(str(e))})
        return 2
    report.print_summary(sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        _write_json(args.json, report.to_json())
    return report.exit_code


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore export``."""
    p = sub.add_parser(
        "export", help="convert a store between shards and per-image caches",
        formatter_class=HelpFormatter,
        description="featstore export STORE --format per-image [--out DIR]: write <image>.vggt_cache.pt files "
                    "beside the images (or mirrored under --out) from a shard store, bit for bit. "
                    "featstore export DATA_ROOT --format shards --out DIR [--codec C]: pack per-image caches "
                    "(including legacy ones with only 'features' and 'path') into shards, or re-encode a shard "
                    "store with another codec. Lossy (int8) records are exported dequantized, marked lossy "
                    "with their error bound. Exit 0 when every record was "
                    "exported, 1 when some were refused or unreadable, 2 when the export could not run.")
    p.add_argument("source", help="a shard store folder, or for --format per-image its URL (s3://bucket/prefix, "
                                  "any fsspec URL); or a data root holding per-image caches (for --format shards)")
    p.add_argument("--format", required=True, choices=("per-image", "shards"), help="the layout to write")
    p.add_argument("--out", type=Path, help="per-image: mirror caches under this folder instead of beside the "
                                            "images; shards: the new store folder (required)")
    p.add_argument("--shard-size", type=parse_size, default=format_size(DEFAULT_SHARD_BYTES),
                   help="target shard size (shards only)")
    p.add_argument("--shard-prefix", default=build_default("shard_prefix"), help="shard file name prefix (shards only)")
    p.add_argument("--codec", choices=CODEC_CHOICES, default=build_default("codec"),
                   help="shards only: codec of every tensor (zstd lossless, raw uncompressed, int8 lossy with its "
                        "error stored per record); re-encodes a shard store or packs per-image caches")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="skip fsync after writes")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    export = command_module("featstore.export")
    log = logging.getLogger("featstore")
    if args.format == "shards" and is_remote(args.source):
        log.error("--format shards reads a local store or data root, not %s; export the remote store with "
                  "--format per-image, or copy it to local disk first", redact(args.source))
        return 2
    if args.format == "shards" and args.out is None:
        log.error("--format shards needs --out DIR (the new shard store folder)")
        return 2
    try:
        if args.format == "per-image":
            res = export.export_to_per_image(args.source, args.out, fsync=args.fsync,
                                             storage_options=storage_options_of(args))
        else:
            res = export.export_to_shards(Path(args.source), args.out, shard_size=args.shard_size,
                                          prefix=args.shard_prefix, fsync=args.fsync, codec=args.codec)
    except (FeatstoreError, OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("exported to %s: %d written, %d unchanged, %d refused, %d unreadable", res.out, res.written,
             res.unchanged, len(res.refused), len(res.failed))
    if res.refused:
        log.error("refused %d keys that would land outside %s, e.g. %s", len(res.refused), res.out, res.refused[:3])
    return 0 if res.ok else 1


class CommandUnavailable(FeatstoreError):
    """The module that runs a subcommand failed to import (a broken install or a missing dependency)."""

    def __init__(self, module: str, error: ImportError):
        super().__init__(f"cannot run this command: importing {module} failed ({type(error).__name__}: {error}); "
                         f"reinstall featstore with its dependencies (pip install -e .) and retry")
        self.module, self.error = module, error


def command_module(module: str) -> Any:
    """Import the module that runs a subcommand (imported only when that command runs, so ``--help`` stays
    fast); an ImportError becomes :class:`CommandUnavailable` naming the module and the error."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CommandUnavailable(module, e) from e


def make_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = Parser(
        prog="featstore", formatter_class=HelpFormatter,
        description="Precompute frozen-backbone (VGGT) image features, store them compactly, prove they are "
                    "right, and stream them into training.")
    parser.add_argument("--version", action="version", version=f"featstore {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_build_parser(sub)
    add_verify_parser(sub)
    add_export_parser(sub)
    add_merge_parser(sub)
    return parser


def setup_logging(verbose: bool = False) -> None:
    """``[INFO] message`` lines on stderr, plus a SUCCESS level, as users' scripts print."""
    logging.addLevelName(SUCCESS, "SUCCESS")
    logging.addLevelName(logging.WARNING, "WARN")  # users' scripts and docs grep for "[WARN] No images found!"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    log = logging.getLogger("featstore")
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    log.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    parser = make_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        return int(args.func(args))
    except CommandUnavailable as e:
        log = logging.getLogger("featstore")
        log.error("%s", e)
        log.debug("the import error", exc_info=e.error)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("featstore").error("interrupted; re-run the same command to resume")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
