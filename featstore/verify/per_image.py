"""verify of per-image caches (``<image>.vggt_cache.pt``, featstore-written or legacy) under a cache root or
data root: leftovers of builds, every file (in worker processes), the manifest's count and the source listing."""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path
from typing import Any

from featstore.errors import FeatstoreError
from featstore.formats.keys import CacheLayout
from featstore.formats.layout import PER_IMAGE_MANIFEST, PER_IMAGE_STATE_DIR
from featstore.formats.perimage import read_pt
from featstore.verify.checks import Expectations, check_record
from featstore.verify.fixes import rebuild_command
from featstore.verify.leftovers import lock_names, temp_file_findings, unfinished_build_findings
from featstore.verify.listing import compare_listing, source_listing
from featstore.verify.pool import run_tasks
from featstore.verify.report import INFO_LEGACY_CACHES, CheckedBatch, Finding, Report


def per_image_data_root(root: Path, m: dict[str, Any], data_root: str | None) -> str:
    """Where the images are: ``--data-root``, else the manifest's when the caches are mirrored under a cache
    root, else the folder the caches lie in (beside the images)."""
    return data_root or (m.get("data_root") if m.get("cache_root") else None) or str(root)


def per_image_expectations(root: Path, m: dict[str, Any], data_root: str | None) -> Expectations:
    """What the caches under ``root`` are checked against, and the command that rebuilds them."""
    droot = per_image_data_root(root, m, data_root)
    return Expectations.from_manifest(m, droot, rebuild_command(dict(m, data_root=droot), None, True))


def verify_per_image(mpath: Path | None, root: Path, m: dict[str, Any], ex: Expectations, *, data_root: str | None,
                     sample: int | None, seed: int, workers: int, progress: bool) -> Report:
    """Check the per-image caches under ``root`` (the manifest's folder: the cache root or the data root)."""
    from featstore.formats.perimage import scan_per_image

    report = Report(str(root), "per-image")
    if ex.data_root is None:
        report.skip("stale", "data root not found")
        report.skip("orphan", "data root not found")
    if mpath is None:
        report.notes.append(f"no {PER_IMAGE_MANIFEST}: counts and provenance could not be compared with a manifest")
    report.add(*leftover_findings(root, ex.rebuild))
    keys = list(scan_per_image(root))
    todo = keys
    if sample is not None:
        todo = sorted(random.Random(seed).sample(keys, min(sample, len(keys))))
        report.notes.append(f"--sample {sample}: checked {len(todo)} of {len(keys)} cache files")
    chunk = max(1, -(-len(todo) // (max(1, workers) * 4)))
    tasks = [(str(root), todo[i:i + chunk], ex) for i in range(0, len(todo), chunk)]
    for batch in run_tasks(check_per_image_files, tasks, workers, progress, "verify caches"):
        report.absorb(batch)
    report.counts = {"manifest_records": m.get("processed_images"), "files_found": len(keys)}
    if mpath is not None and m.get("processed_images") is not None and m["processed_images"] != len(keys):
        report.add(Finding("count", str(mpath), f"processed_images is {m['processed_images']}, {len(keys)} cache "
                                                f"files exist", f"re-run `{ex.rebuild}` (resumes and rewrites the "
                                                                f"manifest)"))
    if sample is not None:
        report.skip("missing", "--sample checks records only")
    else:
        found, why_not = source_listing(m, data_root or m.get("data_root"))
        ledger = (mpath.parent / m["failures_ledger"]) if mpath is not None and m.get("failures_ledger") else None
        compare_listing(report, found, why_not, set(keys), m, ledger, ex.rebuild)
    return report


def leftover_findings(root: Path, rebuild: str) -> list[Finding]:
    """Temporary files anywhere under ``root``; the build state folder and locks of an unfinished build."""
    temps = [os.path.join(dirpath, name) for dirpath, _, files in os.walk(root) for name in files]
    traces = [str(root / PER_IMAGE_STATE_DIR)] if (root / PER_IMAGE_STATE_DIR).exists() else []
    traces += [str(root / n) for n in lock_names(os.listdir(root))]
    return temp_file_findings(temps) + unfinished_build_findings(traces, rebuild)


def check_per_image_files(root: str, keys: list[str], ex: Expectations) -> CheckedBatch:
    """Check a batch of per-image cache files (runs in a worker process)."""
    batch = CheckedBatch(records=len(keys))
    layout = CacheLayout(root)
    for key in keys:
        path = layout.path(key)
        fix = f"delete {path} and re-run `{ex.rebuild}`"
        try:
            rec = read_pt(path, key=key)
        except (FeatstoreError, OSError) as e:
            batch.findings.append(Finding("corrupt", key, str(e), fix))
            continue
        if rec.meta.get("legacy"):
            batch.info[INFO_LEGACY_CACHES] += 1
        elif rec.key != key:
            batch.findings.append(Finding("provenance", key, f"file holds the record of {rec.key!r}", fix))
        found, info = check_record(rec, ex, key)
        batch.findings += [f if f.kind == "stale" else dataclasses.replace(f, fix=fix) for f in found]
        batch.info.update(info)
    return batch
