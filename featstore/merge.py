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
from pathlib import Path
from typing import Any, Iterable

from featstore.errors import StoreError
from featstore.formats.aliases import write_alias_index
from featstore.formats.index import Index, write_index
from featstore.formats.manifest import (REQUIRED, new_manifest, read_manifest, read_store_manifest, shape_key,
                                        write_manifest)
from featstore.formats.shards import ShardEntry, ShardInfo, parse_shard_name, scan_stored_shard, sha256_file
from featstore.formats.storage import (Storage, local_copy, local_file_to_publish, parse_location, publish_json,
                                       read_json, sha256_of)
from featstore.faults import crash_point
from featstore.fsutil import is_temp_name
from featstore.formats.layout import FAILURES_LEDGER, INDEX_NAME, PARTS_DIR, PER_IMAGE_FAILURES_LEDGER, PER_IMAGE_MANIFEST, PER_IMAGE_STATE_DIR, SHARDS_DIR, SHARD_MANIFEST

log = logging.getLogger("featstore")
PER_IMAGE_FAILURES = PER_IMAGE_FAILURES_LEDGER


def part_stem(gid: int) -> str:
    """File stem of a rank's part files."""
    return f"rank-{gid:05d}"


def write_part(parts_dir: Path | Storage, gid: int, summary: dict[str, Any],
               closed: Iterable[tuple[ShardInfo, list[ShardEntry]]] = ()) -> None:
    """Record what one rank did: its closed shards' index entries (shard stores) and its summary.

    ``parts_dir`` may be a remote prefix: the part index is uploaded first, the summary (which marks the
    part as finished) last.
    """
    parts = parse_location(parts_dir)
    closed = list(closed)
    summary = dict(summary, shards=[s.__dict__ for s, _ in closed])
    if closed or summary.get("layout") == "shards":
        names = [s.name for s, _ in closed]
        with local_file_to_publish(parts, f"{part_stem(gid)}.fsi") as path:
            write_index(path, names, ((i, e) for i, (_, es) in enumerate(closed) for e in es))
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


def list_store_shards(store: Path | Storage) -> dict[str, int]:
    """The complete shards of a store (temporary files excluded): name -> size in bytes."""
    st = parse_location(store)
    return {n.rsplit("/", 1)[-1]: size for n, size in st.list(SHARDS_DIR).items()
            if parse_shard_name(n.rsplit("/", 1)[-1])}


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


def shard_order(name: str) -> tuple[int, int]:
    # Later shards of a rank supersede earlier ones; across ranks a key has one owner per world size.
    p = parse_shard_name(name)
    return (p[2], p[1]) if p else (0, 0)


COUNTED = ("processed", "skipped", "failed", "missing", "stale_rebuilt", "malformed_annotation_lines")


def _merge_summaries(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' counts, feature shapes and failures added up."""
    counts: Counter = Counter()
    shapes: Counter = Counter()
    failures: list[dict[str, Any]] = []
    for p in parts:
        counts.update(p.get("counts", {}))
        shapes.update(p.get("feature_shapes", {}))
        failures += p.get("failures", [])
    return {"counts": dict(counts), "shapes": dict(shapes), "failures": failures}


def _write_ledger(store: Storage, name: str, failures: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(f, ensure_ascii=False) + "\n" for f in failures)
    store.publish_bytes(name, text.encode("utf-8"))


def _old_manifest(store: Storage) -> dict[str, Any] | None:
    return read_store_manifest(store) if store.exists(SHARD_MANIFEST) else None


def merge_shard_store(out_dir: Path | Storage) -> dict[str, Any]:
    """Rebuild ``index.fsi`` and ``manifest.json`` of a shard store (local or remote) from its shards and
    part files. Index and manifest are replaced last, after every shard they name exists."""
    store = parse_location(out_dir)
    parts = read_parts(store.sub(PARTS_DIR))
    old = _old_manifest(store)
    base = parts[0] if parts else (old or {})
    shards, known = collect_entries(store)
    shards.sort(key=shard_order)
    # Drop shards whose every record is superseded by a later shard (a rebuild): their data lives on elsewhere.
    latest: dict[str, str] = {}
    for name in shards:
        for e in known[name]:
            latest[e.key] = name
    live = [s for s in shards if any(latest[e.key] == s for e in known[s]) or not known[s]]
    crash_point("merge-before-index")
    with local_file_to_publish(store, INDEX_NAME) as index_path:
        n = write_index(index_path, live, ((i, e) for i, s in enumerate(live) for e in known[s]))
        index_meta = {"name": INDEX_NAME, "records": n, "bytes": index_path.stat().st_size,
                      "sha256": sha256_file(index_path)}
        feat_shapes = _feature_shapes(Index(index_path))
    if ((base.get("context") or {}).get("mode")) == "sample":
        _write_aliases(store, live, known)
    shard_meta = _shard_records(store, live, known, old, parts, latest)
    merged = _merge_summaries(parts)
    m = _base_manifest("shards", base, old, parts)
    counts = dict(m["counts"], **{k: merged["counts"].get(k, 0) for k in COUNTED})
    counts["records"] = n
    if parts:
        _write_ledger(store, FAILURES_LEDGER, merged["failures"])
    total = max([p.get("total_images", 0) for p in parts] or [m.get("total_images", 0)])
    m.update(total_images=total, processed_images=n, counts=counts, feature_shapes=feat_shapes,
             shards=shard_meta, failures_ledger=FAILURES_LEDGER if store.exists(FAILURES_LEDGER) else None,
             complete=bool(total) and n >= total - counts.get("failed", 0) - counts.get("missing", 0),
             index=index_meta)
    crash_point("merge-before-manifest")
    publish_json(store, SHARD_MANIFEST, _checked(m))
    crash_point("merge-before-cleanup")
    for s in shards:
        if s not in live:
            log.info("removing fully superseded shard %s", s)
            store.delete(f"{SHARDS_DIR}/{s}")
    _remove_parts(store.sub(PARTS_DIR))
    return m


def _checked(m: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise ValueError(f"manifest lacks required fields {missing}")
    return m


def _feature_shapes(ix: Index) -> dict[str, int]:
    shapes: Counter = Counter()
    for row in range(len(ix)):
        spec = ix.specs[int(ix.cols["spec"][row])]
        shapes[shape_key(spec[0][2])] += 1
    return dict(shapes)


def _write_aliases(store: Storage, live: list[str], known: dict[str, list[ShardEntry]]) -> None:
    local = store.local_path()
    if local is None:
        log.warning("%s: the alias index (frame-list lookups of id-keyed samples) is not written for remote "
                    "stores yet; look samples up by their keys", store.display)
        return
    write_alias_index(local, live, known)


def _shard_records(store: Storage, live: list[str], known: dict[str, list[ShardEntry]], old: dict[str, Any] | None,
                   parts: list[dict[str, Any]], latest: dict[str, str]) -> list[dict[str, Any]]:
    """The manifest's shard list (``records``: the shard's records the index points to, superseded copies not
    counted); sha256 reused from earlier manifests and part files, computed otherwise."""
    cached: dict[str, dict[str, Any]] = {}
    for s in (old or {}).get("shards", []):
        cached[s["name"]] = s
    for p in parts:
        for s in p.get("shards", []):
            cached[s["name"]] = s
    sizes = list_store_shards(store)
    out = []
    for name in live:
        size = sizes[name]
        c = cached.get(name)
        sha = c["sha256"] if c and c.get("bytes") == size else sha256_of(store, f"{SHARDS_DIR}/{name}")
        records = sum(1 for e in known[name] if latest[e.key] == name)
        out.append({"name": name, "records": records, "bytes": size, "sha256": sha})
    return out


def _base_manifest(layout: str, base: dict[str, Any], old: dict[str, Any] | None,
                   parts: list[dict[str, Any]]) -> dict[str, Any]:
    fields = ("model", "layers", "tensors", "preprocess", "context", "dtype", "codec", "compute", "tokens",
              "source_fingerprint",
              "cache_root", "sources", "missing_ledger")
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
    merged = _merge_summaries(parts)
    m = _base_manifest("per-image", parts[0], old, parts)
    counts = dict(m["counts"], **{k: merged["counts"].get(k, 0) for k in COUNTED})
    done = sum(p.get("done_images", 0) for p in parts)
    counts["records"] = done
    _write_ledger(parse_location(root), PER_IMAGE_FAILURES, merged["failures"])
    shapes = Counter((old or {}).get("feature_shapes", {}))
    shapes.update(merged["shapes"])
    total = max(p.get("total_images", 0) for p in parts)
    m.update(total_images=total, processed_images=done, counts=counts, feature_shapes=dict(shapes),
             failures_ledger=PER_IMAGE_FAILURES,
             complete=bool(total) and done >= total - counts.get("failed", 0) - counts.get("missing", 0))
    write_manifest(manifest_path, m)
    _remove_parts(parse_location(parts_dir))
    try:
        (root / PER_IMAGE_STATE_DIR).rmdir()
    except OSError:
        pass
    return m


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
