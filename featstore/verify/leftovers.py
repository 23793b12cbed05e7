"""Stray files: temporary files of crashed writers and what an unfinished build leaves (part files, its state
folder, the build lock and every rank's lock)."""

from __future__ import annotations

from typing import Iterable

from featstore.formats.layout import is_lock_name
from featstore.runtime.fsutil import is_temp_name
from featstore.verify.report import Finding


def temp_file_findings(paths: Iterable[str]) -> list[Finding]:
    """A finding for each path whose file name is a writer's temporary name."""
    return [Finding("stray", p, "temporary file left by an interrupted writer",
                    f"if no featstore build is running, delete {p}")
            for p in paths if is_temp_name(p.rsplit("/", 1)[-1])]


def lock_names(names: Iterable[str]) -> list[str]:
    """The build's and the ranks' lock files among the file names of a store folder."""
    return sorted(n for n in names if is_lock_name(n))


def unfinished_build_findings(where: Iterable[str], rebuild: str) -> list[Finding]:
    """A finding for each trace of a running or interrupted build (part files, state folder, locks)."""
    return [Finding("stray", w, "a build is running or was interrupted",
                    f"wait for the build, or re-run `{rebuild}` to finish it") for w in where]
