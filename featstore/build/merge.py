"""Joining a store together: per-rank part files -> one index and one manifest.

Every build process (torchrun rank or ``--part`` of a job array) leaves two part files when it finishes:
``parts/rank-<id>.fsi`` (the index entries of the shards it closed, in the index format) and
``parts/rank-<id>.json`` (its counts, failures and settings). Rank 0 merges them after all ranks finish;
``featstore merge`` does the same for job arrays. Merging is idempotent and crash-safe: the shards are
the ground truth (a shard no part file describes is scanned), and index and manifest are replaced
atomically before the part files are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from featstore.errors import StoreError
from featstore.formats.aliases import SAMPLE_CONTEXTS
from featstore.formats.index import Index, write_index
from featstore.formats.locate import locate_store
from featstore.formats.manifest import COUNT_FIELDS, BuildSettings, Manifest, read_manifest, write_manifest
from featstore.formats.shardstore import finalize_shard_store, list_store_shards
from featstore.formats.shards import ClosedShard, ShardEntry, scan_stored_shard
from featstore.storage import (Storage, local_copy, local_file_to_publish, parse_location, publish_json,
                                       read_json)
from featstore.runtime.faults import crash_point
from featstore.runtime.fsutil import is_temp_name, jsonl_bytes
from featstore.formats.layout import FAILURES_LEDGER, INDEX_NAME, PARTS_DIR, PER_IMAGE_FAILURES_LEDGER, PER_IMAGE_MANIFEST, PER_IMAGE_STATE_DIR, SHARDS_DIR, SHARD_MANIFEST

log = logging.getLogger("featstore")


def part_stem(gid: int) -> str:
    """File stem of a rank's part files."""
    return f"rank-{gid:05d}"


def write_part(parts_dir: Path | Storage, gid: int, summary: dict[str, Any], closed: Iterable[ClosedShard] = ()) -> None:
    """Record what one rank did: its closed shards' index entries (shard stores) and its summary.

    ``parts_dir`` may be a remote prefix: the part index is uploaded first, the summary (which marks the
    part as finished) last.
    """
    parts = parse_location(parts_dir)
    closed = list(closed)
    summary = dict(summary, shards=[asdict(s.info) for s in closed])
    if closed or summary.get("layout") == "shards":
        names = [s.info.name for s in closed]
        with local_file_to_publish(parts, f"{part_stem(gid)}.fsi") as path:
            write_index(path, names, ((i, e) for i, s in enumerate(closed) for e in s.entries))
    crash_point("part-index-written")
    publish_json(parts, f"{part_stem(gid)}.json", summary)


def _part_names(parts: Storage, ext: str) -> list[str]:
    return sorted(n for n in parts.list() if n.startswith("rank-") and n.endswith(ext) and not is_temp_name(n))


def read_parts(parts_dir: Path | Storage) -> list[dict[str, Any]]:
    """All part summaries in ``parts_dir`` (a folder or remote prefix), by rank id."""
    parts = parse_location(parts_dir)
    out = []
    for name in _part_names(parts, ".json"):
        try:
            out.append(read_json(parts, name))
        except (OSError, ValueError) as e:
            raise StoreError(f"part summary {parts.describe(name)} is unreadable ({e}); delete it and re-run the "
                             f"build") from None
    return out


def _entries_of_index(store: Storage, name: str) -> dict[str, list[ShardEntry]]:
    """Entries per shard from one index file of the store (empty, with a warning, when unreadable)."""
    per: dict[str, list[ShardEntry]] = {}
    try:
        with local_copy(store, name) as path:
            for e in Index(path).entries():
                per.setdefault(e.shard, []).append(ShardEntry(e.key, e.offset, e.length, e.crc32, e.tensors,
                                                              e.source))
    except FileNotFoundError:
        return {}
    except StoreError as e:
        log.warning("ignoring unreadable index %s (%s); its shards will be rescanned", store.describe(name), e)
        return {}
    return per


def _known_entries(store: Storage, shards: list[str]) -> dict[str, list[ShardEntry]]:
    """Entries per shard name from the current index and the part indexes (only for shards that exist)."""
    known: dict[str, list[ShardEntry]] = {}
    sources = [INDEX_NAME] + [f"{PARTS_DIR}/{n}" for n in _part_names(store.sub(PARTS_DIR), ".fsi")]
    wanted = set(shards)
    for src in sources:
        if store.is_local and not store.exists(src):
            continue
        for name, es in _entries_of_index(store, src).items():
            if name in wanted:
                known[name] = sorted(es, key=lambda x: x.offset)
    return known


def collect_entries(out_dir: Path | Storage) -> tuple[list[str], dict[str, list[ShardEntry]]]:
    """Every complete shard and its entries (from indexes where known, else by scanning the shard)."""
    store = parse_location(out_dir)
    shards = sorted(list_store_shards(store))
    known = _known_entries(store, shards)
    for name in shards:
        if name not in known:
            log.info("scanning shard %s (not yet indexed)", name)
            known[name] = scan_stored_shard(store, name)
    return shards, known


def _merge_summaries(parts: list[dict[str, Any]]) -> tuple[dict[str, int], Counter, list[dict[str, Any]]]:
    """The ranks' counts, feature shapes and failures added up."""
    counts: Counter = Counter()
    shapes: Counter = Counter()
    failures: list[dict[str, Any]] = []
    for p in parts:
        counts.update(p.get("counts", {}))
        shapes.update(p.get("feature_shapes", {}))
        failures += p.get("failures", [])
    return {k: counts.get(k, 0) for k in COUNT_FIELDS if k != "records"}, shapes, failures


def _write_ledger(store: Storage, name: str, failures: list[dict[str, Any]]) -> None:
    store.publish_bytes(name, jsonl_bytes(failures))


def check_part_settings(parts: list[dict[str, Any]]) -> None:
    """StoreError naming the first part built with other settings than the first part (and each setting that
    differs, by formats.manifest.BuildSettings' one rule): one store holds records of one set of settings."""
    if not parts:
        return
    first = BuildSettings.of(parts[0])
    for p in parts[1:]:
        diffs = first.differences(BuildSettings.of(p))
        if diffs:
            said = "; ".join(f"{d.flag}: {_short(d.stored)} in {part_stem(parts[0]['gid'])}, {_short(d.requested)} "
                             f"in {part_stem(p['gid'])} ({d.setting})" for d in diffs)
            raise StoreError(f"refusing to merge parts built with different settings ({said}): one store holds "
                             f"records of one set of settings; rebuild the part that differs with the others' flags "
                             f"(--no-skip-existing), then merge again")


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def merge_shard_store(out_dir: Path | Storage) -> dict[str, Any]:
    """Rebuild ``index.fsi`` and ``manifest.json`` of a shard store (local or remote) from its shards and
    part files. Index and manifest are replaced last, after every shard they name exists."""
    store = parse_location(out_dir)
    parts = read_parts(store.sub(PARTS_DIR))
    check_part_settings(parts)
    old = locate_store(store).manifest if store.exists(SHARD_MANIFEST) else None
    _, known = collect_entries(store)
    m, _, failures = _merged_manifest("shards", parts, old)
    crash_point("merge-before-index")
    earlier = [*(old or {}).get("shards", []), *(s for p in parts for s in p.get("shards", []))]
    final = finalize_shard_store(store, known, sample_context=m.context.get("mode") in SAMPLE_CONTEXTS, checksums=earlier)
    if parts:
        _write_ledger(store, FAILURES_LEDGER, failures)
    m.processed_images, m.feature_shapes = final.records, final.feature_shapes
    m.counts["records"], m.shards, m.index = final.records, final.shards, final.index
    m.failures_ledger = FAILURES_LEDGER if store.exists(FAILURES_LEDGER) else None
    m.complete = m.is_complete()
    crash_point("merge-before-manifest")
    publish_json(store, SHARD_MANIFEST, m.to_json())
    crash_point("merge-before-cleanup")
    for s in final.superseded:
        log.info("removing fully superseded shard %s", s)
        store.delete(f"{SHARDS_DIR}/{s}")
    _remove_parts(store.sub(PARTS_DIR))
    return m.to_json()


def _merged_manifest(layout: str, parts: list[dict[str, Any]], old: dict[str, Any] | None
                     ) -> tuple[Manifest, Counter, list[dict[str, Any]]]:
    """The manifest's settings, provenance, counts and times from the parts (whose settings agree), else from
    the current manifest (a merge again); with the parts' feature shapes and failures added up."""
    src = parts[0] if parts else (old or {})
    m = Manifest.new(layout=layout, data_root=str(src.get("data_root", "")), model_path="")
    m.use_settings(BuildSettings.of(src))
    m.cache_root, m.sources, m.missing_ledger = (src.get(k) for k in ("cache_root", "sources", "missing_ledger"))
    counts, shapes, failures = _merge_summaries(parts)
    if parts:
        started = min(p["times"]["started"] for p in parts)
        finished = max(p["times"]["finished"] for p in parts)
        m.times = {"started": started, "finished": finished, "seconds": round(finished - started, 3)}
        m.world_size = parts[0].get("world_size", len(parts))
        m.parts = sorted(p["gid"] for p in parts)
        m.total_images = max(p.get("total_images", 0) for p in parts)
        m.counts.update(counts)
    elif old:
        prev = Manifest.from_json(old)
        m.total_images, m.counts, m.times = prev.total_images, prev.counts, prev.times
        m.world_size, m.parts = prev.world_size, prev.parts
    return m, shapes, failures


def _remove_parts(parts: Storage) -> None:
    for name in parts.list():
        if name.startswith("rank-") or is_temp_name(name):
            parts.delete(name)
    local = parts.local_path()
    if local is not None:
        with contextlib.suppress(OSError):
            local.rmdir()


def merge_per_image_store(root: Path, manifest_path: Path) -> dict[str, Any]:
    """Write the per-image manifest and failures ledger from the part summaries under ``root``."""
    parts_dir = root / PER_IMAGE_STATE_DIR / PARTS_DIR
    parts = read_parts(parts_dir)
    old = read_manifest(manifest_path) if manifest_path.is_file() else None
    if not parts:
        if old is None:
            raise StoreError(f"nothing to merge under {root}: no part files and no manifest")
        return old
    check_part_settings(parts)
    m, shapes, failures = _merged_manifest("per-image", parts, old)
    _write_ledger(parse_location(root), PER_IMAGE_FAILURES_LEDGER, failures)
    m.counts["records"] = m.processed_images = sum(p.get("done_images", 0) for p in parts)
    m.feature_shapes = dict(Counter((old or {}).get("feature_shapes", {})) + shapes)
    m.failures_ledger = PER_IMAGE_FAILURES_LEDGER
    m.complete = m.is_complete()
    write_manifest(manifest_path, m)
    _remove_parts(parse_location(parts_dir))
    try:
        (root / PER_IMAGE_STATE_DIR).rmdir()
    except OSError:
        pass
    return m.to_json()


def wait_for_parts(parts_dir: Path | Storage, expected: int, timeout_s: float = 7 * 24 * 3600) -> None:
    """Block until ``expected`` part summaries exist (used when no process group is available)."""
    parts = parse_location(parts_dir)
    deadline = time.time() + timeout_s
    while len(_part_names(parts, ".json")) < expected:
        if time.time() > deadline:
            raise StoreError(f"timed out waiting for {expected} part files in {parts.display}")
        time.sleep(1.0)


def per_image_manifest_path(data_root: Path, cache_root: Path | None) -> Path:
    """Where a per-image store's manifest lives: the cache root when mirrored, else the data root."""
    return (cache_root or data_root) / PER_IMAGE_MANIFEST
