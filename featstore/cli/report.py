"""``featstore report``: its parser and the command (matplotlib is optional: without it, one ``[ERROR]`` line
says how to install it)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from featstore.cli.args import add_storage_options_argument, storage_options_of
from featstore.cli.help import HelpFormatter, command_module

INSTALL_HINT = "pip install 'featstore[report]' (or pip install matplotlib)"


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore report``."""
    p = sub.add_parser(
        "report", help="write one HTML page to look at a store: feature maps, distributions, errors, throughput",
        formatter_class=HelpFormatter,
        description="Write a self-contained HTML report of a store (images embedded; opens from a file:// URL "
                    "without network access): seeded records' frames beside PCA colour maps of their patch tokens, "
                    "histograms of token norms and per-channel moments, the stored codec error of lossy stores, the "
                    "manifest's provenance, the build's throughput and, with --verify, verify's findings. Needs "
                    f"matplotlib: {INSTALL_HINT}. Exit 0: report written; 2: it could not be. See docs/report.md.")
    p.add_argument("store", help="shard store folder or URL (s3://bucket/prefix, any fsspec URL), or a per-image "
                                 "cache/data root")
    p.add_argument("-o", "--out", default="report.html",
                   help="the HTML file to write (default: report.html in the current directory)")
    p.add_argument("--samples", type=int, default=8, metavar="N", help="records shown as feature maps")
    p.add_argument("--seed", type=int, default=0, help="seed choosing the records shown and the statistics' sample")
    p.add_argument("--verify", action="store_true", help="run featstore verify and show its findings")
    p.add_argument("--recompute", type=int, default=0, metavar="N",
                   help="with --verify: recompute N seeded records with the model and plot the differences")
    p.add_argument("--model", help="checkpoint for --recompute (default: the model the manifest records, when it "
                                   "is a built-in name or an existing path)")
    p.add_argument("--device", default="cpu", help="torch device --recompute runs the model on: cpu, cuda or cuda:N")
    p.add_argument("--data-root", help="where the images are now (default: the manifest's data root)")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_report)


def _usage_problem(args: argparse.Namespace) -> str | None:
    """Why the command line cannot run, or None."""
    if args.samples < 1:
        return f"--samples {args.samples}: expected an integer of at least 1"
    if args.recompute < 0:
        return f"--recompute {args.recompute}: expected an integer of at least 0"
    if args.recompute and not args.verify:
        return "--recompute runs as part of verify: add --verify"
    if Path(args.out).is_dir():
        return f"--out {args.out} is a folder: give the HTML file to write, e.g. {Path(args.out) / 'report.html'}"
    if args.data_root is not None and not Path(args.data_root).is_dir():
        return f"--data-root {args.data_root} is not a directory; pass the folder that holds the images now"
    return None


def _cmd_report(args: argparse.Namespace) -> int:
    from featstore.errors import FeatstoreError
    from featstore.storage import redact

    log = logging.getLogger("featstore")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.error("featstore report needs matplotlib, an optional dependency that is not installed: %s", INSTALL_HINT)
        return 2
    problem = _usage_problem(args)
    if problem:
        log.error("%s", problem)
        return 2
    report = command_module("featstore.report").report
    try:
        res = report(args.store, args.out, samples=args.samples, seed=args.seed, verify=args.verify,
                     recompute=args.recompute, model=args.model, device=args.device, data_root=args.data_root,
                     storage_options=storage_options_of(args))
    except (FeatstoreError, OSError, ValueError) as e:
        log.error("cannot write the report of %s: %s", redact(str(args.store)), redact(" ".join(str(e).split())))
        return 2
    for w in res.warnings:
        log.warning("%s", w)
    log.info("report written to %s (open it in a browser: %s)", res.path, res.path.resolve().as_uri())
    return 0
