"""The ``featstore`` command line: build, verify, export, merge.

Every option of ``build`` that users' existing scripts set through the environment (``VGGT_MODEL_PATH``,
``DATA_ROOT``, ``BATCH_SIZE``, ``DEVICE``, ``SKIP_EXISTING``) takes its default from there (see
:mod:`featstore.env`); a flag always wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from featstore import __version__
from featstore.env import resolve_build_env
from featstore.formats.storage import add_storage_options_argument, is_remote, storage_options_of

SUCCESS = 25
DEFAULT_WORKERS = min(8, os.cpu_count() or 1)
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
    p.add_argument("--skip-existing", dest="skip_existing", action="store_const", const=True, default=None,
                   help="skip images whose features are already stored (default: on, or $SKIP_EXISTING)")
    p.add_argument("--no-skip-existing", dest="skip_existing", action="store_const", const=False,
                   help="rebuild every image")


#: Option values a preset stands for; options the user passes explicitly win over them.
PRESETS = {"janusvln": {"context": "sample", "image_size": 644, "preprocess": "crop", "layers": (-2,),
                        "reference_frame": "first", "autocast": True}}
PRESET_FIELDS = {"context": "image", "image_size": 518, "preprocess": "crop", "layers": (-2,),
                 "reference_frame": "first", "autocast": False}


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options left unset from the chosen preset, then from the plain defaults."""
    preset = PRESETS.get(args.preset or "", {})
    for name, default in PRESET_FIELDS.items():
        if getattr(args, name) is None:
            setattr(args, name, preset.get(name, default))


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
    g.add_argument("--format", choices=("shards", "per-image"), default="shards",
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
                        "JanusVLN uses (default: -2)")
    g.add_argument("--tokens", choices=("patch", "all"), default="patch",
                   help="patch: patch tokens only [1, P, 2C] (JanusVLN); all: camera + register + patch tokens")
    g.add_argument("--shard-size", type=parse_size, default="1GB",
                   help="target shard size, e.g. 512MB or 2GB")
    g.add_argument("--shard-prefix", default="vggt", help="shard file name prefix: <prefix>-<rank>-<n>.tar")
    g.add_argument("--zstd-level", type=int, default=1, help="zstd level, 1-22 (1 is fastest and, with byte "
                                                              "shuffling, compresses bf16 features best)")
    g.add_argument("--codec", choices=("zstd", "raw", "int8"), default="zstd",
                   help="shard codec per tensor: zstd (lossless, byte-shuffled), raw (uncompressed, fastest "
                        "reads), int8 (lossy: about 0.8%% relative L2 error, stored in each record; 2.5-2.6 MB "
                        "per 518x518 bf16 image, zstd 3.8). Readers need no flag; see docs/building.md")


def _build_model_args(p: argparse.ArgumentParser) -> None:
    """The model, its device and how images are preprocessed and fed."""
    g = p.add_argument_group("model and preprocessing")
    g.add_argument("--preprocess", choices=("crop", "pad", "janusvln"), default=None,
                   help="crop/pad: the official VGGT load_and_preprocess_images at --image-size (JanusVLN feeds "
                        "VGGT 644-pixel crop images, NewJanusVLN 644-pixel pad images); janusvln: pad then resize "
                        "each side down to a multiple of 28, kept for stores built with it (default: crop)")
    g.add_argument("--image-size", type=int, default=None,
                   help="target size N, a multiple of 14: crop makes images N wide, pad N x N (default: 518, the "
                        "official model; JanusVLN uses 644)")
    g.add_argument("--apply-exif", action="store_true",
                   help="rotate images by their EXIF orientation (the official code ignores it; only use this if "
                        "your training code does the same)")
    g.add_argument("--max-pixels", type=int, help="refuse images with more pixels than this (decompression-bomb "
                                                  "guard; default: 178956970, Pillow's own limit)")
    g.add_argument("--device",
                   help="torch device: cpu, cuda or cuda:N; falls back to cpu with a warning when CUDA is absent; "
                        "under torchrun each rank uses cuda:LOCAL_RANK (default: cuda:0, or $DEVICE)")
    g.add_argument("--batch-size", type=int,
                   help="images per forward pass (--context sample: frame streams per step, which sets the KV "
                        "cache memory, see docs/building.md); halved automatically on CUDA out of memory "
                        "(default: 16, or $BATCH_SIZE)")
    g.add_argument("--compile", action="store_true", help="run the model under torch.compile (faster on GPU after warm-up)")
    g.add_argument("--num-workers", type=int, default=DEFAULT_WORKERS,
                   help="DataLoader processes decoding images (0: decode in the main process); one decodes roughly "
                        "30 640x480 JPEGs/s, so a GPU at 150 images/s needs about 6 (default, machine-dependent: "
                        "the number of CPUs, at most 8)")
    g.add_argument("--writer-threads", type=int, default=4, help="threads compressing and writing records")


def _build_samples_args(p: argparse.ArgumentParser) -> None:
    """Training samples: records with causal context (--context sample) and the presets."""
    g = p.add_argument_group("training samples (records with causal context, as JanusVLN computes them)")
    g.add_argument("--context", choices=("image", "sample"), default=None,
                   help="image: one record per image, no context; sample: one record per training sample, its "
                        "frames streamed through VGGT with a KV cache as JanusVLN's training does, the last fed "
                        "frame's tokens kept; samples come from annotation records (images, history_images + "
                        "current_image, image) or episode folders with --history (default: image)")
    g.add_argument("--reference-frame", choices=("first", "last"), default=None,
                   help="JanusVLN's reference_frame: first streams the frames oldest first and keeps the current "
                        "frame's tokens; last streams them newest first and keeps the oldest frame's (default: first)")
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
                   help="janusvln = --context sample --image-size 644 --preprocess crop --layers=-2 "
                        "--reference-frame first --autocast; flags given explicitly win")


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
    g.add_argument("--allow-failures", type=int, default=0,
                   help="exit 0 even if up to N images fail to decode (they are listed in the failures ledger)")


def _build_scale_out_args(p: argparse.ArgumentParser) -> None:
    """Job arrays, fsync, progress and storage."""
    g = p.add_argument_group("scale-out")
    g.add_argument("--num-parts", type=int, default=1,
                   help="split the job into K parts (job arrays); run each with --part i, then `featstore merge`")
    g.add_argument("--part", type=int, default=0, help="which part this job builds (0-based)")
    g.add_argument("--no-fsync", dest="fsync", action="store_false",
                   help="skip fsync after writes (faster on some network filesystems; less safe on power loss)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    add_storage_options_argument(g)


def _out_location(text: str) -> Path | str:
    """``--out``: a local folder (Path) or an fsspec URL kept as text."""
    return text if is_remote(text) else Path(text)


def _cmd_build(args: argparse.Namespace) -> int:
    from featstore.build import BuildOptions, run_build

    log = logging.getLogger("featstore")
    flags = {"model": args.model, "data_root": args.data_root, "batch_size": args.batch_size,
             "device": args.device, "skip_existing": args.skip_existing}
    try:
        env, origins = resolve_build_env(flags)
    except ValueError as e:
        log.error("%s", e)
        return 2
    if args.skip_existing is False:
        origins["skip_existing"] = "--no-skip-existing"
    apply_preset(args)
    try:
        storage_options = storage_options_of(args)
    except ValueError as e:
        log.error("%s", e)
        return 2
    opts = BuildOptions(
        data_root=Path(env["data_root"]) if env["data_root"] else None, model=env["model"], out=args.out,
        format=args.format, annotations=list(args.annotations), image_list=args.image_list,
        data_path=args.data_path, strict_annotations=args.strict_annotations, batch_size=env["batch_size"],
        device=env["device"], dtype=args.dtype, layers=args.layers, preprocess=args.preprocess,
        image_size=args.image_size, context=args.context, reference_frame=args.reference_frame,
        history=args.history, history_pad=args.history_pad, autocast=args.autocast,
        apply_exif=args.apply_exif, tokens=args.tokens, shard_size=args.shard_size, shard_prefix=args.shard_prefix,
        skip_existing=env["skip_existing"], rebuild_stale=args.rebuild_stale, hash_inputs=args.hash_inputs,
        allow_failures=args.allow_failures, num_workers=args.num_workers, writer_threads=args.writer_threads,
        zstd_level=args.zstd_level, codec=args.codec, compile=args.compile, num_parts=args.num_parts,
        part=args.part, max_pixels=args.max_pixels, fsync=args.fsync, progress=args.progress, origins=origins,
        storage_options=storage_options)
    return run_build(opts)


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
    from featstore.formats.layout import PARTS_DIR, PER_IMAGE_MANIFEST, PER_IMAGE_STATE_DIR, SHARD_MANIFEST, SHARDS_DIR
    from featstore.merge import merge_per_image_store, merge_shard_store

    log = logging.getLogger("featstore")
    if isinstance(args.store, str):  # a URL: a remote shard store
        return _merge_remote(args.store, args)
    store: Path = args.store
    if not any((store / p).exists() for p in (SHARDS_DIR, PARTS_DIR, SHARD_MANIFEST, PER_IMAGE_STATE_DIR)):
        log.error("%s is not a featstore store: expected %s/, %s/ or %s there (the --out of `featstore build`, "
                  "or the per-image root)", store, SHARDS_DIR, PARTS_DIR, SHARD_MANIFEST)
        return 2
    try:
        if (store / PER_IMAGE_STATE_DIR).is_dir():
            m = merge_per_image_store(store, store / PER_IMAGE_MANIFEST)
        else:
            m = merge_shard_store(store)
    except StoreError as e:
        log.error("%s", e)
        return 2
    log.info("merged: %d records of %d images (complete: %s)", m["processed_images"], m["total_images"], m["complete"])
    return 0


def _merge_remote(url: str, args: argparse.Namespace) -> int:
    from featstore.errors import StoreError
    from featstore.formats.storage import parse_location
    from featstore.formats.layout import PARTS_DIR
    from featstore.formats.shardstore import list_store_shards
    from featstore.merge import merge_shard_store

    log = logging.getLogger("featstore")
    try:
        store = parse_location(url, storage_options_of(args))
        if not (list_store_shards(store) or store.list(PARTS_DIR)):
            log.error("%s is not a featstore store: expected shards/ or parts/ there (the --out of `featstore "
                      "build`)", store.display)
            return 2
        m = merge_shard_store(store)
    except (StoreError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("merged: %d records of %d images (complete: %s)", m["processed_images"], m["total_images"], m["complete"])
    return 0


def _add_optional(sub: argparse._SubParsersAction, module: str, name: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return
    adder = getattr(mod, f"add_{name}_parser", None)
    if adder is not None:
        adder(sub)


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
    _add_optional(sub, "featstore.verify", "verify")
    _add_optional(sub, "featstore.export", "export")
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
    except KeyboardInterrupt:
        logging.getLogger("featstore").error("interrupted; re-run the same command to resume")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
