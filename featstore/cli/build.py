"""``featstore build``'s parser: its option groups, the presets, and the :class:`BuildOptions` a command line
asks for (every option users' scripts set through the environment takes its default from there, see
:mod:`featstore.build.env_defaults`; a flag always wins)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from featstore.build.env_defaults import resolve_build_env
from featstore.build.options import BuildOptions, build_default
from featstore.cli.args import (CODEC_CHOICES, add_storage_options_argument, format_layers, format_size, out_location,
                                parse_layers, parse_size, storage_options_of)
from featstore.cli.help import HelpFormatter, command_module
from featstore.errors import FeatstoreError

def _skip_existing_flags(p: argparse._ActionsContainer) -> None:
    on = "on" if build_default("skip_existing") else "off"
    p.add_argument("--skip-existing", dest="skip_existing", action="store_const", const=True, default=None,
                   help=f"skip images whose features are already stored (default: {on}, or $SKIP_EXISTING)")
    p.add_argument("--no-skip-existing", dest="skip_existing", action="store_const", const=False,
                   help="rebuild every image")


#: Option values a preset stands for; options the user passes explicitly win over them.
PRESETS = {"janusvln": {"context": "sample", "image_size": 644, "preprocess": "crop", "layers": (-2,),
                        "reference_frame": "first", "precision": "deepspeed-bf16"},
           "vgllm": {"context": "joint", "image_size": 518, "preprocess": "crop", "layers": (-2,),
                     "reference_frame": "first", "precision": "deepspeed-bf16"}}


#: The options a preset may set: left unset (None) by the parser, filled by :func:`apply_preset`.
PRESET_FIELDS = ("context", "image_size", "preprocess", "layers", "reference_frame", "autocast", "precision")
#: What each recipe (featstore.model.precision) reproduces, for --help (names pinned equal by a test).
PRECISION_HELP = {"fp32": "float32 weights and input (official VGGT; the CPU default)",
                  "bf16": "weights, buffers and input in bf16, no autocast (pure-bf16 trainers; the default on GPUs "
                          "with bf16)",
                  "amp": "float32 weights under torch.autocast bf16 (plain PyTorch AMP; --autocast)",
                  "deepspeed-bf16": "every parameter and floating buffer in bf16 as DeepSpeed's bf16 engine casts "
                                    "them, forward under autocast bf16 (JanusVLN's and VG-LLM's training scripts)",
                  "fp8": "NOT training-exact, opt-in speed: bf16 with the block linears as FP8 matmuls (torchao on "
                         "GPUs with FP8 tensor cores, emulated on CPU); never a default or preset"}


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
    if args.autocast is not None and args.precision is None:
        preset = {k: v for k, v in preset.items() if k != "precision"}  # --autocast/--no-autocast win
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
    add_build_arguments(p)
    from featstore.cli.plan import add_plan_arguments

    add_plan_arguments(p, dry_run=True)
    p.set_defaults(func=_cmd_build)


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of ``featstore build`` (``featstore plan`` takes the same)."""
    _build_inputs_args(p)
    _build_output_args(p)
    _build_model_args(p)
    _build_samples_args(p)
    _build_resume_args(p)
    _build_scale_out_args(p)


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
    g.add_argument("--out", type=out_location, help="output folder, or for shards an fsspec URL such as "
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
    g.add_argument("--compile", nargs="?", const="on", choices=("auto", "on", "off"), default=build_default("compile"),
                   help="torch.compile the model's transformer blocks (one compiled block reused by all, warmed up "
                        "at the first batch's shape, compile caches kept under ~/.cache/featstore/inductor or "
                        "$TORCHINDUCTOR_CACHE_DIR; the compile seconds are logged); auto: on for CUDA devices, off "
                        f"on CPU; --compile alone means on (default: {build_default('compile')})")
    g.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                   help="run the model eagerly (same as --compile off)")
    g.add_argument("--num-workers", type=int, default=build_default("num_workers"),
                   help="DataLoader processes decoding images (0: decode in the main process); one decodes roughly "
                        "30 640x480 JPEGs/s, so a GPU at 150 images/s needs about 6 (default, machine-dependent: "
                        "the number of CPUs, at most 8)")
    g.add_argument("--writer-threads", type=int, default=build_default("writer_threads"),
                   help="threads compressing and writing records")


def _build_samples_args(p: argparse.ArgumentParser) -> None:
    """Training samples: records with the context training gives them (--context sample or joint), precision and the presets."""
    g = p.add_argument_group("training samples (records with the context training gives them)")
    g.add_argument("--context", choices=("image", "sample", "joint"), default=None,
                   help="image: one record per image, no context; sample: one record per training sample, its "
                        "frames streamed through VGGT with a KV cache as JanusVLN's training does, the last fed "
                        "frame's tokens kept; joint: one record per sample, its frames through VGGT together "
                        "(bidirectional attention, as VG-LLM's training does), every frame's tokens kept "
                        "[S, h*w, C]; samples come from annotation records (images, history_images + "
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
    g.add_argument("--precision", choices=tuple(PRECISION_HELP), default=None,
                   help="how training runs the frozen VGGT, reproduced bit for bit on the same device type (all but fp8): "
                        + "; ".join(f"{k}: {v}" for k, v in PRECISION_HELP.items())
                        + " (default, machine-dependent: fp32 on CPU, bf16 on GPUs with bf16)")
    g.add_argument("--autocast", dest="autocast", action="store_true", default=None,
                   help="the old spelling of --precision amp")
    g.add_argument("--no-autocast", dest="autocast", action="store_false",
                   help="with a preset: keep its settings but not its precision (the machine's default)")
    g.add_argument("--frame-transform", metavar="MODULE:FUNCTION", default=None,
                   help="--context joint: a function f(frames, record) receiving a sample's frames as PIL images "
                        "with its annotation record and returning the images VGGT should see (the trainer's own "
                        "hook, e.g. VG-LLM's SPAR markers); the manifest records its name and source sha256")
    g.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help=f"janusvln = {preset_flags('janusvln')}; vgllm = {preset_flags('vgllm')} (a record with "
                        f"spar_info needs --frame-transform); flags given explicitly win")


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
    if args.dry_run:
        from featstore.cli.plan import run_plan_command

        return run_plan_command(args)
    from featstore.cli.plan import refuse_plan_flags

    if refuse_plan_flags(args):
        return 2
    try:
        opts = build_options_of(args)
    except (ValueError, FeatstoreError) as e:
        logging.getLogger("featstore").error("%s", e)
        return 2
    return command_module("featstore.build.orchestrator").run_build(opts)
