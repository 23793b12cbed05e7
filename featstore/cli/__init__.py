"""The command line: every subcommand's parser and its checks; nothing else in featstore imports it."""

from featstore.cli.main import main

__all__ = ["main"]
