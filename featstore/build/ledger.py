"""What one rank's build counts and lists: stored, skipped, failed and missing records (one failure path for
images and samples), the progress bar, and the ledger of annotated images that do not exist."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from featstore.build.output import Output
from featstore.formats.layout import MISSING_LEDGER
from featstore.formats.manifest import shape_key
from featstore.formats.record import Record
from featstore.runtime.fsutil import atomic_write_bytes, jsonl_bytes

log = logging.getLogger("featstore")
WARN_FAILURES = 5  # failures logged one by one; all are in the failures ledger


@dataclass
class RunStats:
    """Counts and timings of one process's run."""

    total_images: int = 0
    processed: int = 0
    skipped: int = 0
    failed: int = 0
    missing: int = 0
    malformed: int = 0
    stale_rebuilt: int = 0
    bytes_written: int = 0
    batch_size_used: int = 0
    failures: list[dict[str, str]] = field(default_factory=list)
    shapes: Counter = field(default_factory=Counter)
    stage_seconds: Counter = field(default_factory=Counter)


class Ledger:
    """The run's counts, its failures (the failures ledger's entries) and the progress bar."""

    def __init__(self, unit: str, show_progress: bool):
        self.unit, self.show_progress = unit, show_progress
        self.stats = RunStats()
        self.bar: tqdm | None = None

    def fail(self, key: str, path: str, error: str | None, frame: str | None = None) -> None:
        """Count and list a record that cannot be built: an image, or a sample (``frame``: the frame at fault)."""
        s = self.stats
        s.failed += 1
        entry = {"key": key, "path": path, "error": error or "unknown"}
        if frame is not None:
            entry = {"key": key, "frame": frame, "path": path, "error": entry["error"]}
        s.failures.append(entry)
        if s.failed <= WARN_FAILURES:
            if frame is None:
                log.warning("cannot use %s: %s", path, error)
            else:
                log.warning("cannot build sample %s: frame %s: %s", key, path or frame, error)
        if self.bar is not None:
            self.bar.update(1)

    def written(self, records: list[Record]) -> None:
        """Count records the writer stored."""
        self.stats.processed += len(records)
        for r in records:
            self.stats.shapes[shape_key(r.features.shape)] += 1
        if self.bar is not None:
            self.bar.update(len(records))

    def start_progress(self, total: int) -> None:
        """Start the progress bar (hidden unless ``show_progress``: rank 0 without --no-progress)."""
        self.bar = tqdm(total=total, unit=self.unit, desc="featstore build", dynamic_ncols=True,
                        disable=not self.show_progress, smoothing=0.05)

    def close_progress(self) -> None:
        """Close the progress bar, if one runs."""
        if self.bar is not None:
            self.bar.close()
        self.bar = None


def missing_entries(found: Any) -> list[dict[str, Any]]:
    """The missing-images ledger's lines of a discovery (images or samples: ``MissingFrame`` each)."""
    return [m.to_json() for m in found.missing]


def write_missing_ledger(output: Output, found: Any) -> str | None:
    """List each annotated image that does not exist, with the file and line naming it; returns the ledger's
    name when there is one (an earlier run's ledger is removed when nothing is missing now)."""
    missing = missing_entries(found)
    text = jsonl_bytes(missing)
    if output.remote:
        if missing:
            output.store.publish_bytes(MISSING_LEDGER, text)
            return MISSING_LEDGER
        output.store.delete(MISSING_LEDGER)
        return None
    path = output.missing_ledger_path()
    if missing:
        atomic_write_bytes(path, text, fsync=output.opts.fsync)
        return path.name
    if path.is_file():
        path.unlink()
    return None
