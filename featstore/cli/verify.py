"""``featstore verify``'s parser, its usage checks and the JSON report writer."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from featstore.cli.args import add_storage_options_argument, storage_options_of
from featstore.cli.help import HelpFormatter, command_module

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
