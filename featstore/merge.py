"""Joining a store together: per-rank part files -> one index and one manifest.

Every build process (torchrun rank or ``--part`` of a job array) leaves two part files when it finishes:
``parts/rank-<id>.fsi`` (the index entries of the shards it closed, in the index format) and
``parts/rank-<id>.json`` (its counts, failures and settings). Rank 0 merges them after all ranks finish;
``featstore merge`` does the same for job arrays. Merging is idempotent and crash-safe: the shards are
the ground truth (a shard no part file describes is scanned), and index and manifest are replaced
atomically before the part files are removed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from featstore.errors import StoreError
from featstore.formats.index import INDEX_NAME, Index, write_index
from featstore.formats.manifest import (FAILURES_LEDGER, PER_IMAGE_MANIFEST, SHARD_MANIFEST, new_manifest,
                                        read_manifest, shape_key, write_manifest)
from featstore.formats.shards import SHARDS_DIR, ShardEntry, ShardInfo, list_shards, scan_shard, sha256_file
from featstore.faults import crash_point
from featstore.fsutil import atomic_write_bytes, atomic_write_json, is_temp_name

log = logging.getLogger("featstore")
PARTS_DIR = "parts"
PER_IMAGE_STATE_DIR = ".featstore"
PER_IMAGE_FAILURES = "vggt_cache_failures.jsonl"


def part_stem(gid: int) -> str:
    """File stem of a rank's part files."""
    return f"rank-{gid:05d}"


def write_part(parts_dir: Path, gid: int, summary: dict[str, Any],
               closed: Iterable[tuple[ShardInfo, list[ShardEntry]]] = ()) -> None:
    """Record what one rank did: its closed shards' index entries (shard stores) and its summary."""
    closed = list(closed)
    summary = dict(summary, shards=[s.__dict__ for s, _ in closed])
    if closed or (parts_dir / SHARDS_DIR).exists() or summary.get("layout") == "shards":
        names = [s.name for s, _ in closed]
        write_index(parts_dir / f"{part_stem(gid)}.fsi", names,
                    ((i, e) for i, (_, es) in enumerate(closed) for e in es))
    crash_point("part-index-written")
    atomic_write_json(parts_dir / f"{part_stem(gid)}.json", summary)


def read_parts(parts_dir: Path) -> list[dict[str, Any]]:
    """All part summaries in ``parts_dir``, by rank id."""
    out = []
    if parts_dir.is_dir():
        for p in sorted(parts_dir.glob("rank-*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError) as e:
                raise StoreError(f"part summary {p} is unreadable ({e}); delete it and re-run the build") from None
    return out


def _known_entries(out_dir: Path, shards: list[str]) -> dict[str, list[ShardEntry]]:
    """Entries per shard name from the current index and the part indexes (only for shards that exist)."""
    known: dict[str, list[ShardEntry]] = {}
    sources = [out_dir / INDEX_NAME] + sorted((out_dir / PARTS_DIR).glob("rank-*.fsi"))
    wanted = set(shards)
    for src in sources:
        if not src.is_file():
            continue
        try:
            ix = Index(src)
        except StoreError as e:
            log.warning("ignoring unreadable index %s (%s); its shards will be rescanned", src, e)
            continue
        per: dict[str, list[ShardEntry]] = {}
        for e in ix.entries():
            per.setdefault(e.shard, []).append(ShardEntry(e.key, e.offset, e.length, e.crc32, e.tensors, e.source))
        for name, es in per.items():
            if name in wanted:
                known[name] = sorted(es, key=lambda x: x.offset)
    return known


def collect_entries(out_dir: Path) -> tuple[list[str], dict[str, list[ShardEntry]]]:
    """Every complete shard and its entries (from indexes where known, else by scanning the shard)."""
    shards = list_shards(out_dir / SHARDS_DIR)
    known = _known_entries(out_dir, shards)
    for name in shards:
        if name not in known:
            log.info("scanning shard %s (not yet indexed)", name)
            known[name] = scan_shard(out_dir / SHARDS_DIR / name)
    return shards, known


def shard_order(name: str) -> tuple[int, int]:
    # Later shards of a rank supersede earlier ones; across ranks a key has one owner per world size.
    from featstore.formats.shards import parse_shard_name

    p = parse_shard_name(name)
    return (p[2], p[1]) if p else (0, 0)


def _merge_summaries(parts: list[dict[str, Any]], old: dict[str, Any] | None) -> dict[str, Any]:
    counts: Counter = Counter()
    shapes: Counter = Counter()
    failures: list[dict[str, Any]] = []
    missing: list[str] = []
    for p in parts:
        counts.update(p.get("counts", {}))
        shapes.update(p.get("feature_shapes", {}))
        failures += p.get("failures", [])
        missing = p.get("missing_examples", missing)
    return {"counts": dict(counts), "shapes": dict(shapes), "failures": failures, "missing": missing}


def _write_ledger(path: Path, failures: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    atomic_write_bytes(path, text.encode("utf-8"))


def merge_shard_store(out_dir: Path) -> dict[str, Any]:
    """Rebuild ``index.fsi`` and ``manifest.json`` of a shard store from its shards and part files."""
    out_dir = Path(out_dir)
    parts_dir = out_dir / PARTS_DIR
    parts = read_parts(parts_dir)
    old = read_manifest(out_dir / SHARD_MANIFEST) if (out_dir / SHARD_MANIFEST).is_file() else None
    base = parts[0] if parts else (old or {})
    shards, known = collect_entries(out_dir)
    shards.sort(key=shard_order)
    # Drop shards whose every record is superseded by a later shard (a rebuild): their data lives on elsewhere.
    latest: dict[str, str] = {}
    for name in shards:
        for e in known[name]:
            latest[e.key] = name
    live = [s for s in shards if any(latest[e.key] == s for e in known[s]) or not known[s]]
    crash_point("merge-before-index")
    n = write_index(out_dir / INDEX_NAME, live, ((i, e) for i, s in enumerate(live) for e in known[s]))
    shard_meta = _shard_records(out_dir, live, known, old, parts)
    merged = _merge_summaries(parts, old)
    ix = Index(out_dir / INDEX_NAME)
    feat_shapes = Counter()
    for row in range(len(ix)):
        spec = ix.specs[int(ix.cols["spec"][row])]
        feat_shapes[shape_key(spec[0][2])] += 1
    m = _base_manifest("shards", base, old, parts)
    counts = dict(m["counts"], **{k: merged["counts"].get(k, 0) for k in ("processed", "skipped", "failed",
                                                                            "missing", "stale_rebuilt")})
    counts["records"] = n
    ledger = out_dir / FAILURES_LEDGER
    if parts:
        _write_ledger(ledger, merged["failures"])
    total = max([p.get("total_images", 0) for p in parts] or [m.get("total_images", 0)])
    m.update(total_images=total, processed_images=n, counts=counts, feature_shapes=dict(feat_shapes),
             shards=shard_meta, failures_ledger=FAILURES_LEDGER if ledger.exists() else None,
             complete=bool(total) and n >= total - counts.get("failed", 0) - counts.get("missing", 0),
             index={"name": INDEX_NAME, "records": n, "bytes": (out_dir / INDEX_NAME).stat().st_size,
                    "sha256": sha256_file(out_dir / INDEX_NAME)})
    crash_point("merge-before-manifest")
    write_manifest(out_dir / SHARD_MANIFEST, m)
    crash_point("merge-before-cleanup")
    for s in shards:
        if s not in live:
            log.info("removing fully superseded shard %s", s)
            os.unlink(out_dir / SHARDS_DIR / s)
    _remove_parts(parts_dir)
    return m


def _shard_records(out_dir: Path, live: list[str], known: dict[str, list[ShardEntry]], old: dict[str, Any] | None,
                   parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's shard list; sha256 reused from earlier manifests and part files, computed otherwise."""
    cached: dict[str, dict[str, Any]] = {}
    for s in (old or {}).get("shards", []):
        cached[s["name"]] = s
    for p in parts:
        for s in p.get("shards", []):
            cached[s["name"]] = s
    out = []
    for name in live:
        size = (out_dir / SHARDS_DIR / name).stat().st_size
        c = cached.get(name)
        sha = c["sha256"] if c and c.get("bytes") == size else sha256_file(out_dir / SHARDS_DIR / name)
        out.append({"name": name, "records": len(known[name]), "bytes": size, "sha256": sha})
    return out


def _base_manifest(layout: str, base: dict[str, Any], old: dict[str, Any] | None,
                   parts: list[dict[str, Any]]) -> dict[str, Any]:
    fields = ("model", "layers", "tensors", "preprocess", "dtype", "tokens", "source_fingerprint", "cache_root", "context")
    src = base if parts else (old or {})
    m = new_manifest(layout=layout, data_root=str(src.get("data_root", "")),
                     model_path=str(src.get("vggt_model_path", src.get("model_path", ""))),
                     **{k: src[k] for k in fields if k in src})
    if old:
        m["times"] = old.get("times", m["times"])
    if parts:
        started = min(p["times"]["started"] for p in parts)
        finished = max(p["times"]["finished"] for p in parts)
        m["times"] = {"started": started, "finished": finished, "seconds": round(finished - started, 3)}
        m["world_size"] = parts[0].get("world_size", len(parts))
        m["parts"] = sorted(p["gid"] for p in parts)
    return m


def _remove_parts(parts_dir: Path) -> None:
    if parts_dir.is_dir():
        for p in parts_dir.iterdir():
            if p.name.startswith("rank-") or is_temp_name(p.name):
                p.unlink()
        try:
            parts_dir.rmdir()
        except OSError:
            pass


def merge_per_image_store(root: Path, manifest_path: Path) -> dict[str, Any]:
    """Write the per-image manifest and failures ledger from the part summaries under ``root``."""
    parts_dir = root / PER_IMAGE_STATE_DIR / PARTS_DIR
    parts = read_parts(parts_dir)
    old = read_manifest(manifest_path) if manifest_path.is_file() else None
    if not parts:
        if old is None:
            raise StoreError(f"nothing to merge under {root}: no part files and no manifest")
        return old
    merged = _merge_summaries(parts, old)
    m = _base_manifest("per-image", parts[0], old, parts)
    counts = dict(m["counts"], **{k: merged["counts"].get(k, 0) for k in ("processed", "skipped", "failed",
                                                                            "missing", "stale_rebuilt")})
    done = sum(p.get("done_images", 0) for p in parts)
    counts["records"] = done
    ledger = root / PER_IMAGE_FAILURES
    _write_ledger(ledger, merged["failures"])
    shapes = Counter((old or {}).get("feature_shapes", {}))
    shapes.update(merged["shapes"])
    total = max(p.get("total_images", 0) for p in parts)
    m.update(total_images=total, processed_images=done, counts=counts, feature_shapes=dict(shapes),
             failures_ledger=PER_IMAGE_FAILURES,
             complete=bool(total) and done >= total - counts.get("failed", 0) - counts.get("missing", 0))
    write_manifest(manifest_path, m)
    _remove_parts(parts_dir)
    try:
        (root / PER_IMAGE_STATE_DIR).rmdir()
    except OSError:
        pass
    return m


def wait_for_parts(parts_dir: Path, expected: int, timeout_s: float = 7 * 24 * 3600) -> None:
    """Block until ``expected`` part summaries exist (used when no process group is available)."""
    deadline = time.time() + timeout_s
    while len(list(parts_dir.glob("rank-*.json"))) < expected:
        if time.time() > deadline:
            raise StoreError(f"timed out waiting for {expected} part files in {parts_dir}")
        time.sleep(1.0)


def per_image_manifest_path(data_root: Path, cache_root: Path | None) -> Path:
    """Where a per-image store's manifest lives: the cache root when mirrored, else the data root."""
    return (cache_root or data_root) / PER_IMAGE_MANIFEST
