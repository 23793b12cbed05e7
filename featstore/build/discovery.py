"""What a build makes records of: images (``--context image``) or training samples, found through
featstore.discover, and what rank 0 says about where they came from and what is missing or malformed."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featstore.build.options import BuildOptions
from featstore.build.pipeline import WorkItem
from featstore.build.transform import NEEDS_TRANSFORM
from featstore.discover.samples import RecordItem

log = logging.getLogger("featstore")
SHOW_SOURCES = 20  # source files listed one by one
SHOW_MISSING = 20  # missing keys kept as examples in the part summary


@dataclass
class Found:
    """A discovery's items (each a ``samples.RecordItem``), the manifest's ``sources`` and missing examples."""

    discovery: Any  # featstore.discover.Discovery (of images or samples)
    items: list[RecordItem]
    record: dict[str, Any]
    missing_examples: list[str]

    @property
    def missing(self) -> int:
        return len(self.discovery.missing)

    @property
    def malformed(self) -> int:
        return len(self.discovery.malformed)


def discover_items(opts: BuildOptions, data_root: Path, exclude: list[Path], ledger: str, talk: bool) -> Found:
    """The images or samples to build (``talk``: log the sources and problems; ``ledger``: where the missing
    images are listed, for messages)."""
    from featstore.discover import discover_images

    if opts.context in ("sample", "joint"):
        return _discover_records(opts, data_root, exclude, ledger, talk)
    found = discover_images(data_root, annotations=tuple(opts.annotations), image_list=opts.image_list,
                            data_path=opts.data_path, find_annotations=True, exclude=exclude,
                            strict=opts.strict_annotations)
    if talk:
        _log_discovery(found, data_root, ledger)
    if not found.items:
        log.warning("No images found! Looked in: %s", ", ".join(map(str, found.looked_in or [data_root])))
    return Found(found, [WorkItem(i.key, str(i.path)) for i in found.items], found.manifest_entry,
                 found.missing_keys[:SHOW_MISSING])


def discover_records(data_root: Path | str, **discover: Any) -> tuple[Any, list[Any]]:
    """The training samples (``discover_samples(data_root, **discover)``, records a frame transform reads as
    their own samples) and the records they make: the build's, and verify's listing of what a store should hold."""
    from featstore.discover import discover_samples
    from featstore.discover.dedup import dedup_samples

    found = discover_samples(data_root, transform_depends_on=NEEDS_TRANSFORM, **discover)
    return found, dedup_samples(found.items, transform_depends_on=NEEDS_TRANSFORM)


def _discover_records(opts: BuildOptions, data_root: Path, exclude: list[Path], ledger: str, talk: bool) -> Found:
    """The records of a sample build: the training samples, those with the same frames, reference frame and
    frame-transform input grouped into one record (discover.dedup), every id of a group mapping to it."""
    from featstore.discover.dedup import dedup_counts

    found, plans = discover_records(data_root, annotations=tuple(opts.annotations), data_path=opts.data_path,
                                    exclude=exclude, strict=opts.strict_annotations,
                                    reference_frame=opts.reference_frame, history=opts.history,
                                    history_pad=opts.history_pad, keep_annotations=bool(opts.frame_transform))
    if talk:
        _log_sample_discovery(found, ledger)
        samples, records = dedup_counts(plans)
        if plans:
            log.info("%d records for %d samples (samples with the same frames share one record)", records, samples)
    if not found.items:
        log.warning("No samples found! %s", json.dumps(found.manifest_entry))
    return Found(found, list(plans), found.manifest_entry, found.missing_keys[:SHOW_MISSING])


def _log_discovery(found: Any, data_root: Path, ledger: str) -> None:
    """Say which sources were used, how many images each named, and what was missing or malformed."""
    def rel(p: str) -> str:
        return os.path.relpath(p, data_root) if p.startswith(str(data_root) + os.sep) else p

    if found.scanned:
        log.info("no annotation files (*.jsonl, annotations.json) under %s: scanning it for images", data_root)
    elif found.source_stats:
        how = "found under the data root" if found.auto else "given"
        log.info("using %d source file(s) %s:", len(found.source_stats), how)
        for s in found.source_stats[:SHOW_SOURCES]:
            extra = f", {s.missing} missing" if s.missing else ""
            extra += f", {s.malformed_lines} malformed line(s) skipped" if s.malformed_lines else ""
            log.info("  %s: %d records, %d images%s", rel(s.file), s.records, s.images, extra)
        if len(found.source_stats) > SHOW_SOURCES:
            log.info("  ... and %d more (all listed in the manifest's sources)", len(found.source_stats) - SHOW_SOURCES)
    _log_malformed(found.malformed)
    if found.missing:
        first = found.missing[0]
        log.warning("%d images named by the sources do not exist (first: %s, named at %s:%d); each is listed with "
                    "the file and line naming it in %s", len(found.missing), first.path, rel(first.file),
                    first.line, ledger)


def _log_sample_discovery(found: Any, ledger: str) -> None:
    """Say where the samples came from and which could not be built for want of a frame."""
    rec = found.manifest_entry
    if rec.get("method") == "episodes":
        log.info("%d samples from %d episode folders (%d frames; JanusVLN history rule, %d frames%s)", rec["samples"],
                 rec["episodes"], rec["frames"], rec["history"]["frames"], ", front-padded" if rec["history"]["pad"] else "")
    else:
        log.info("using %d annotation file(s):", len(rec["annotations"]))
        for a in rec["annotations"][:SHOW_SOURCES]:
            log.info("  %s: %d records, %d samples%s", a["file"], a["records"], a["samples"],
                     f", {a['missing']} with a missing frame" if a["missing"] else "")
    _log_malformed(found.malformed)
    if found.missing:
        first = found.missing[0]
        log.warning("%d samples name a frame that does not exist (first: %s, named at %s:%d); each is listed with "
                    "its frame in %s", len(found.missing), first.path, first.file, first.line, ledger)


def _log_malformed(malformed: list[Any]) -> None:
    for bad in malformed[:5]:
        log.warning("%s; line skipped (--strict-annotations makes this an error)", bad)
    if len(malformed) > 5:
        log.warning("%d malformed annotation lines skipped in all", len(malformed))
