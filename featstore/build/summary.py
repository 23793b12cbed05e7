"""The end of a build: this rank's part summary (merged by rank 0 into the manifest) and the report rank 0 logs,
with the exit status."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from featstore.formats.layout import INDEX_NAME, SHARDS_DIR

if TYPE_CHECKING:
    from featstore.build.orchestrator import Build

log = logging.getLogger("featstore")


def part_summary(b: "Build", started: float, finished: float) -> dict[str, Any]:
    """This rank's part summary: its settings, counts, failures, sources and times."""
    s = b.stats
    return dict(b.output.settings_doc(b.settings(), b.data_root), gid=b.rank.gid, world_size=b.rank.gworld,
                layout=b.opts.format, total_images=s.total_images, done_images=b.done_before + s.processed,
                counts={"processed": s.processed, "skipped": s.skipped, "failed": s.failed, "missing": s.missing,
                        "stale_rebuilt": s.stale_rebuilt, "malformed_annotation_lines": s.malformed},
                sources=b.discovery_record, missing_ledger=b.missing_ledger, feature_shapes=dict(s.shapes),
                failures=s.failures, missing_examples=b.missing_examples, bytes_written=s.bytes_written,
                times={"started": started, "finished": finished})


def report(b: "Build", started: float, manifest: dict[str, Any] | None) -> int:
    """Log what the build did (rank 0) and return the exit status: 1 when more records failed than allowed."""
    s, opts, unit = b.stats, b.opts, b.unit
    if b.rank.gid == 0:
        _log_summary(b, max(time.time() - started, 1e-9))
        if manifest is not None and manifest.get("failures_ledger") and s.failed:
            log.warning("%d %ss failed; see %s", s.failed, unit, b.output.store.describe(manifest["failures_ledger"]))
    if s.failed > opts.allow_failures:
        log.error("%d %ss failed (allowed: %d); the exit status is 1. Fix or remove them, or pass "
                  "--allow-failures N", s.failed, unit, opts.allow_failures)
        return 1
    return 0


def _log_summary(b: "Build", secs: float) -> None:
    s, opts, out = b.stats, b.opts, b.output
    log.log(25, "Processed %d %ss", s.processed, b.unit)
    where = (f"{out.store.describe(SHARDS_DIR)}/*.tar (index {out.store.describe(INDEX_NAME)})"
             if opts.format == "shards"
             else "<image_path>.vggt_cache.pt" + (f" under {out.cache_root}" if out.cache_root else ""))
    log.info("Cache files stored as: %s", where)
    log.info("Summary: processed %d, skipped %d, failed %d, missing %d, stale rebuilt %d | %.1f s, %.2f %ss/s, "
             "%s written%s", s.processed, s.skipped, s.failed, s.missing, s.stale_rebuilt, secs,
             s.processed / secs, b.unit, human_bytes(s.bytes_written),
             f" | batch size used {s.batch_size_used}" if 0 < s.batch_size_used < opts.batch_size else "")
    if s.stage_seconds:
        log.info("Pipeline seconds (main thread waiting for decode / model launch / waiting for the writer; "
                 "writer thread): %s", ", ".join(f"{k} {v:.1f}" for k, v in sorted(s.stage_seconds.items())))


def human_bytes(n: float) -> str:
    """A byte count as ``1.5 MB``."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
