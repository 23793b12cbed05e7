"""``featstore plan``'s parser (the build's options plus the plan's own) and its report; ``featstore build
--dry-run`` is the same command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from featstore.cli.build import add_build_arguments, build_options_of
from featstore.cli.help import HelpFormatter, command_module
from featstore.errors import FeatstoreError

log = logging.getLogger("featstore")
PLAN_FLAGS = ("assume_size", "gpu", "rate", "json")


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore plan``: every build option, and the plan's."""
    p = sub.add_parser(
        "plan", help="what a build with these options will compute and store, without running it",
        formatter_class=HelpFormatter,
        description="Discover the samples as `featstore build` would (image headers only, or none with "
                    "--assume-size), deduplicate them, and print the records, frames decoded, frame passes with "
                    "and without prefix sharing, the projected bytes per codec (measured compression ratios), "
                    "the projected GPU hours (measured rates) and the free space at --out, without loading the "
                    "model or writing anything. Exit 1 when the projected store does not fit. Takes every "
                    "option of `featstore build` (same as `featstore build --dry-run`).")
    add_build_arguments(p)
    add_plan_arguments(p, dry_run=False)
    p.set_defaults(func=run_plan_command, dry_run=True)


def add_plan_arguments(p: argparse.ArgumentParser, *, dry_run: bool) -> None:
    """The plan's own options (on ``featstore build`` too, with ``--dry-run``)."""
    from featstore.build.plan_data import DEFAULT_GPU, GPU_RATES

    g = p.add_argument_group("plan" + (" (with --dry-run)" if dry_run else ""))
    if dry_run:
        g.add_argument("--dry-run", action="store_true",
                       help="print the plan of this build (`featstore plan`) instead of running it")
    g.add_argument("--assume-size", metavar="WxH",
                   help="take every frame to be WxH pixels (e.g. 640x480) and trust the annotation files: no image "
                        "is opened or looked up (default: read each image's header)")
    g.add_argument("--gpu", choices=tuple(GPU_RATES), default=DEFAULT_GPU,
                   help="project GPU hours at this GPU's measured build rate (see docs/building.md)")
    g.add_argument("--rate", type=float, metavar="FRAMES_PER_S",
                   help="project GPU hours at this many model frame passes per second instead")
    g.add_argument("--json", metavar="PATH|-", help="also write the plan as JSON to PATH (- : stdout, the text "
                                                     "report then goes to stderr)")


def refuse_plan_flags(args: argparse.Namespace) -> bool:
    """Log an [ERROR] and return True when a plan flag is given to a build without --dry-run."""
    from featstore.build.plan_data import DEFAULT_GPU

    defaults = {"gpu": DEFAULT_GPU}
    given = [f"--{n.replace('_', '-')}" for n in PLAN_FLAGS if getattr(args, n, None) not in (None, defaults.get(n))]
    if given:
        log.error("%s only apply to a plan: add --dry-run (or run `featstore plan`)", ", ".join(given))
    return bool(given)


def run_plan_command(args: argparse.Namespace) -> int:
    """Plan the build the command line asks for; print it (and its JSON); 0, 1 when it does not fit, 2 on a bad
    option or input."""
    plan_mod = command_module("featstore.build.plan")
    try:
        opts = build_options_of(args)
        size = plan_mod.parse_assume_size(args.assume_size) if args.assume_size else None
        command_module("featstore.build.options").check_build_options(opts)
        plan = plan_mod.plan_build(opts, plan_mod.PlanSettings(size, args.gpu, args.rate))
    except (ValueError, FeatstoreError) as e:
        log.error("%s", " ".join(str(e).split()))
        return 2
    doc = plan.to_json()
    text = sys.stderr if args.json == "-" else sys.stdout
    text.write(render(doc))
    if args.json == "-":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    elif args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    if plan.fits is False:
        other = min(doc["bytes"], key=doc["bytes"].get)
        log.error("the projected store (%s with %s) does not fit in the %s free at %s: free space, choose "
                  "another --out%s", _human(plan.projected_bytes), doc["settings"]["codec"],
                  _human(plan.free_bytes or 0), plan.out,
                  f", or use --codec {other} ({_human(doc['bytes'][other])})" if other != doc["settings"]["codec"]
                  else "")
        return 1
    return 0


def _human(n: float) -> str:
    from featstore.build.summary import human_bytes

    return human_bytes(n)


def _duration(hours: float | None) -> str:
    if hours is None:
        return "unknown"
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:.1f} min" if hours >= 1 / 60 else f"{hours * 3600:.1f} s"


def render(doc: dict[str, Any]) -> str:
    """The plan as text, one fact a line."""
    s, g = doc["settings"], doc["gpu"]
    sharing = doc["frame_passes_without_sharing"] / doc["frame_passes"] if doc["frame_passes"] else 1.0
    lines = [
        f"featstore plan ({s['context']} context, {s['format']}, {s['dtype']}, model {s['model']})",
        f"  samples                {doc['samples']:,}" + (f" ({doc['missing']:,} more miss a frame)"
                                                         if doc["missing"] else ""),
        f"  records                {doc['records']:,} after deduplication" + (
            f" ({doc['failed']:,} cannot be built: unreadable frame or frames of different sizes)"
            if doc["failed"] else ""),
        f"  frames decoded         {doc['frames_decoded']:,} distinct frames",
        f"  frame passes           {doc['frame_passes']:,} ({doc['frame_passes_without_sharing']:,} without "
        f"prefix sharing: {sharing:.2f}x)",
        "  record shapes          " + ", ".join(f"{k} x{v:,}" for k, v in doc["shapes"].items()),
        "  projected bytes        " + ", ".join(f"{c} {_human(b)}" for c, b in doc["bytes"].items())
        + f" (chosen: {s['codec']})",
        f"  GPU time               {_duration(g['hours'])} at {g['frame_passes_per_s']:.1f} frame passes/s"
        + (f" on {g['name']}" if g["name"] else " (--rate)"),
        f"  free at output         {_human(doc['free_bytes']) if doc['free_bytes'] is not None else 'unknown'}"
        f" ({doc['out']})",
    ]
    return "\n".join(lines) + "\n"
