"""The store against its sources: the images (or samples) the build's recorded sources name today, and the
findings that comparison gives: missing features, undecodable images, orphan features."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from featstore.errors import AnnotationError
from featstore.verify.report import Finding, Report

PROBE_MISSING = 20  # missing images decoded to tell "not built yet" from "cannot be decoded"


def source_listing(m: dict[str, Any], data_root: str | None) -> tuple[Any, str | None]:
    """The images the store should hold: its recorded sources repeated under the data root (``--data-root``, else
    the manifest's), or a scan of an explicit ``--data-root`` for stores that recorded none; (None, why) otherwise."""
    from featstore.discover import discover_images, discover_recorded

    root = data_root or m.get("data_root")
    if not root or not os.path.isdir(root):
        return None, f"data root {root} not found; pass --data-root"
    try:
        if (m.get("context") or {}).get("mode") in ("sample", "joint"):
            return recorded_samples(root, m), None
        if m.get("sources"):
            return discover_recorded(root, m["sources"]), None
        if data_root:
            return discover_images(root), None
    except AnnotationError as e:
        return None, str(e)
    return None, "the manifest records no image sources; pass --data-root to compare with a scan of it"


def recorded_samples(root: str, m: dict[str, Any]) -> Any:
    """The records a sample store should hold (its samples, deduplicated as the build does): its recorded
    annotation files or episode folders, again."""
    src, ctx = m.get("sources") or {}, m.get("context") or {}
    if src.get("method") == "episodes":
        hist = src.get("history") or ctx.get("history") or {}
        return _records(root, reference_frame=ctx.get("reference_frame", "first"),
                        history=int(hist.get("frames", 8)), history_pad=bool(hist.get("pad")))
    files = [a["file"] if os.path.isabs(a["file"]) else os.path.join(root, a["file"]) for a in src.get("annotations") or []]
    for f in files:
        if not os.path.isfile(f):
            raise AnnotationError(f"annotation file {f} recorded in the manifest no longer exists")
    if not files:
        raise AnnotationError("the manifest records no sample sources")
    return _records(root, annotations=files, data_path=src.get("data_path"),
                    reference_frame=ctx.get("reference_frame", "first"))


def _records(root: str, **discover: Any) -> Any:
    """The discovery of a sample store's sources with its items the records the build makes of them."""
    from featstore.build.discovery import discover_records

    found, records = discover_records(root, **discover)
    found.items = records
    return found


def failure_reasons(ledger: Path | None) -> dict[str, str]:
    """key -> error from a build's failures ledger (images that could not be decoded)."""
    reasons: dict[str, str] = {}
    if ledger is None or not ledger.is_file():
        return reasons
    for line in ledger.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            reasons[str(row["key"])] = str(row.get("error") or "cannot be decoded")
        except (ValueError, KeyError, TypeError):
            continue
    return reasons


def decode_problem(path: Path, mode: str) -> str | None:
    """Why an image cannot be decoded and preprocessed, or None when it can."""
    from featstore.errors import ImageError
    from featstore.model.preprocess import preprocess_image

    try:
        preprocess_image(path, mode)
    except ImageError as e:
        return str(e)
    return None


def compare_listing(report: Report, found: Any, why_not: str | None, stored: set[str], m: dict[str, Any],
                    ledger: Path | None, rebuild: str) -> None:
    """Add the listed keys without a record (missing or undecodable) and the records nothing lists (orphans)."""
    if found is None:
        report.skip("missing", why_not or "no source listing")
        report.notes.append(f"missing images not checked: {why_not}")
        return
    listing = {k for it in found.items for k in listed_keys(it, stored)}
    paths = {it.key: it.path for it in found.items if hasattr(it, "path")}  # sample stores: no single image
    report.add(*unlisted_findings(sorted(listing - stored), paths, failure_reasons(ledger), m, rebuild))
    already = report.keys_of("orphan")
    report.add(*(Finding("orphan", key, "feature whose image is not in the source listing",
                         "rebuild the store from the current image list, or restore the image")
                 for key in sorted(stored - listing - already)))
    if found.missing:
        where = f" (each listed in {m['missing_ledger']})" if m.get("missing_ledger") else ""
        report.info[f"annotated images that do not exist{where}"] = len(found.missing)
    report.counts.update(listed_images=len(listing))


def listed_keys(item: Any, stored: set[str]) -> tuple[str, ...]:
    """The keys a listed record is stored under: its own, or, for a deduplicated record of a store built before
    deduplication (one record per annotation id), each of its ids when every one of them is stored."""
    ids = tuple(str(i) for i in getattr(item, "ids", ()) or ())
    if item.key not in stored and len(ids) > 1 and all(i in stored for i in ids):
        return ids
    return (item.key,)


def unlisted_findings(keys: list[str], paths: dict[str, Path], failed: dict[str, str], m: dict[str, Any],
                      rebuild: str) -> list[Finding]:
    """A finding per listed key without a record: undecodable when the ledger or a decode says so, else missing."""
    mode = (m.get("preprocess") or {}).get("mode") or "crop"
    fix_image = (f"replace the image with a readable one (or drop it from the annotations), then re-run "
                 f"`{rebuild}`")
    out = []
    for n, key in enumerate(keys):
        reason = failed.get(key) or (decode_problem(paths[key], mode) if n < PROBE_MISSING and key in paths else None)
        image = key in paths  # a sample store's keys have no single image
        if reason:
            what = "image" if image else "sample (a frame)"
            out.append(Finding("undecodable", key, f"{what} cannot be decoded, so it has no feature: {reason}",
                               fix_image))
        else:
            out.append(Finding("missing", key, f"{'image' if image else 'sample'} has no stored feature",
                               f"re-run `{rebuild}` (resumes)"))
    return out
