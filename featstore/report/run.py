"""The entry of ``featstore report``: open the store, build every section, write one self-contained HTML file."""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from featstore.errors import StoreError
from featstore.report.inputs import Inputs, Options, scan_records, short_error
from featstore.report.page import Section, note, render
from featstore.report.select import MAX_STATS_RECORDS, stats_records

log = logging.getLogger("featstore")
DEFAULT_OUT = "report.html"


@dataclass
class ReportResult:
    """Where the page was written and what it could not show (one line each)."""

    path: Path
    warnings: list[str] = field(default_factory=list)


def _has_manifest(location: str | os.PathLike[str]) -> bool:
    from featstore.formats.manifest import find_manifest
    from featstore.storage import is_remote, local_path_of

    if is_remote(location):
        return True
    try:
        find_manifest(local_path_of(location))
        return True
    except StoreError:
        return False


def open_inputs(location: str | os.PathLike[str], options: Options) -> tuple[Inputs, list[str]]:
    """Open the store (StoreError when there is none at ``location``) and list its keys (a failure to list is a
    warning on the page: the sections then show what they can)."""
    from featstore.read import open_store

    store = open_store(location, data_root=options.data_root, storage_options=options.storage_options)
    warnings = []
    try:
        keys = list(store.keys())
    except Exception as e:  # noqa: BLE001 - a store whose index cannot be read still has a manifest to show
        keys = []
        warnings.append(f"could not list the store's records: {short_error(e)}")
    return Inputs(str(location), store, store.manifest, _has_manifest(location), keys, options), warnings


def _guarded(sid: str, title: str, build: Callable[[], Section], warnings: list[str]) -> Section:
    """``build()``, or a section saying why it could not be built."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 - one section's failure leaves the others standing
        log.debug("section %s failed", sid, exc_info=True)
        warnings.append(f"{title}: could not be shown ({short_error(e)})")
        return Section(sid, title).add(note(f"could not be shown: {short_error(e)}", "bad"))


def build_sections(inputs: Inputs, warnings: list[str]) -> list[Section]:
    """Every section, in page order."""
    from featstore.report.sections import codec_error, distributions, feature_maps, provenance, throughput
    from featstore.report.verified import verify_section

    keys, sampled = stats_records(inputs.keys, inputs.options.seed, inputs.options.max_stats_records)
    scan = scan_records(inputs, keys, sampled)
    if scan.errors:
        warnings.append(f"{len(scan.errors)} of {len(keys)} records read could not be decoded (first: "
                        f"{next(iter(scan.errors.items()))[0]}: {next(iter(scan.errors.values()))})")
    return [_guarded("feature-maps", "Feature maps", lambda: feature_maps(inputs), warnings),
            _guarded("distributions", "Distributions", lambda: distributions(inputs, scan), warnings),
            _guarded("codec-error", "Codec error", lambda: codec_error(inputs, scan), warnings),
            _guarded("provenance", "Provenance", lambda: provenance(inputs), warnings),
            _guarded("throughput", "Build throughput", lambda: throughput(inputs), warnings),
            _guarded("verify", "Verify", lambda: verify_section(inputs), warnings)]


def report(store: str | os.PathLike[str], out: str | os.PathLike[str] = DEFAULT_OUT, samples: int = 8, seed: int = 0,
           verify: bool = False, recompute: int = 0, *, model: str | None = None, device: str = "cpu",
           data_root: str | None = None, storage_options: dict[str, Any] | None = None,
           max_stats_records: int = MAX_STATS_RECORDS) -> ReportResult:
    """Write the HTML report of ``store`` (a shard store folder or URL, or per-image caches) to ``out``.

    ``samples`` records chosen with ``seed`` are shown as feature maps; the distributions read at most
    ``max_stats_records`` records; ``verify`` runs ``featstore verify`` (``recompute`` records recomputed with
    ``model`` on ``device``). Raises StoreError when there is no store at ``store``.
    """
    from featstore import __version__
    from featstore.runtime.fsutil import atomic_write_bytes
    from featstore.storage import redact

    if samples < 1 or recompute < 0 or max_stats_records < 1:
        raise ValueError(f"samples ({samples}) and max_stats_records ({max_stats_records}) must be at least 1, "
                         f"recompute ({recompute}) at least 0")
    options = Options(samples, seed, verify, recompute, model, device, data_root, storage_options, max_stats_records)
    inputs, warnings = open_inputs(store, options)
    sections = build_sections(inputs, warnings)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    subtitle = f"{len(inputs.keys)} records ({inputs.layout}) · written {when} by featstore {__version__}"
    page = render(f"featstore report: {redact(inputs.location)}", subtitle, sections, warnings)
    path = Path(out)
    atomic_write_bytes(path, page.encode("utf-8"), fsync=False)
    return ReportResult(path, warnings)
