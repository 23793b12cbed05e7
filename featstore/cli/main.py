"""The ``featstore`` command line: the dispatcher of build, plan, verify, export, merge and report (each command's parser is
its own module in featstore.cli; the module that runs a command is imported when it runs, and a failed import
is one ``[ERROR]`` line naming it)."""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

from featstore import __version__
from featstore.cli.build import add_build_parser
from featstore.cli.export import add_export_parser
from featstore.cli.help import CommandUnavailable, HelpFormatter, Parser, setup_logging
from featstore.cli.merge import add_merge_parser
from featstore.cli.plan import add_plan_parser
from featstore.cli.report import add_report_parser
from featstore.cli.verify import add_verify_parser

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
    add_plan_parser(sub)
    add_verify_parser(sub)
    add_export_parser(sub)
    add_merge_parser(sub)
    add_report_parser(sub)
    return parser


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
