"""How the command line talks: ``--help`` with defaults as users type them, one ``[ERROR]`` line for a bad
command line, ``[LEVEL] message`` logging, and the lazy import of the module that runs a command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from featstore.errors import FeatstoreError

SUCCESS = 25


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
