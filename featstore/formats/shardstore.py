"""Finishing a shard store: from its shards and their index entries to ``index.fsi`` (and ``aliases.fsi``)
and the ``shards`` and ``index`` blocks of its manifest. Merge (of a build's parts) and export both end here.

Shards sort by (number, rank): a later shard of a rank supersedes the records of earlier ones with the same
key (a rebuild or a stale record), so the index points at each key's latest copy; a shard all of whose
records are superseded is no longer part of the store.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from featstore.formats.aliases import alias_entries, write_alias_index
from featstore.formats.index import Index, write_index
from featstore.formats.layout import ALIAS_INDEX, INDEX_NAME, SHARDS_DIR
from featstore.formats.manifest import shape_key
from featstore.formats.shards import ShardEntry, complete_shards, parse_shard_name, read_record_meta_at
from featstore.runtime.fsutil import file_sha256
from featstore.storage import Storage, local_file_to_publish, parse_location, sha256_of

log = logging.getLogger("featstore")


@dataclass
class FinishedShards:
    """What :func:`finalize_shard_store` wrote, as the manifest describes it."""

    shards: list[dict[str, Any]]  # the manifest's "shards": [{"name", "records", "bytes", "sha256"}]
    index: dict[str, Any]  # the manifest's "index": {"name", "records", "bytes", "sha256"}
    records: int  # records the index points to
    feature_shapes: dict[str, int]  # "[1, P, C]" -> records
    dtypes: set[str] = field(default_factory=set)  # dtypes of the records' features
    superseded: list[str] = field(default_factory=list)  # shards none of whose records the index points to


def shard_order(name: str) -> tuple[int, int]:
    """Sort key of a shard file name: (number, rank); later shards of a rank supersede earlier ones, and
    across ranks a key has one owner per world size."""
    p = parse_shard_name(name)
    return (p[2], p[1]) if p else (0, 0)


def list_store_shards(store: Any) -> dict[str, int]:
    """The complete shards of a store (a folder, URL or Storage; temporary files excluded): name -> bytes."""
    st = parse_location(store)
    return complete_shards(st.list(SHARDS_DIR))


def finalize_shard_store(store: Storage, known: Mapping[str, list[ShardEntry]], *, sample_context: bool,
                         checksums: Iterable[Mapping[str, Any]] = ()) -> FinishedShards:
    """Write the index of the shards in ``known`` (shard -> its entries by offset; each key's latest copy
    wins) and, for a sample store, the alias index; return the manifest's description of them.

    ``checksums``: earlier descriptions ``{"name", "bytes", "sha256"}`` of shards (a manifest's, a part's, a
    writer's) whose sha256 is reused when the size still matches; other shards are hashed. Superseded shards
    are listed, not deleted: the caller removes them once the new manifest is published.
    """
    ordered = sorted(known, key=shard_order)
    latest = {e.key: name for name in ordered for e in known[name]}
    live = [s for s in ordered if not known[s] or any(latest[e.key] == s for e in known[s])]
    with local_file_to_publish(store, INDEX_NAME) as path:
        n = write_index(path, live, ((i, e) for i, s in enumerate(live) for e in known[s]))
        index = {"name": INDEX_NAME, "records": n, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        specs = _spec_counts(Index(path))  # read back now: an unreadable index fails here, not in training
    if sample_context:
        _write_aliases(store, live, known)
    shapes: Counter = Counter()
    for (_, dtype, shape), count in specs.items():
        shapes[shape_key(shape)] += count
    return FinishedShards(_shard_blocks(store, live, known, latest, checksums), index, n, dict(shapes),
                          {dtype for _, dtype, _ in specs}, [s for s in ordered if s not in live])


def _spec_counts(ix: Index) -> Counter:
    """Records per (name, dtype, shape) of their first tensor (the features)."""
    out: Counter = Counter()
    if len(ix):
        for spec, count in enumerate(np.bincount(ix.cols["spec"], minlength=len(ix.specs)).tolist()):
            if count:
                out[ix.specs[spec][0]] += count
    return out


def _shard_blocks(store: Storage, live: list[str], known: Mapping[str, list[ShardEntry]], latest: dict[str, str],
                  checksums: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's shard list (``records``: the shard's records the index points to)."""
    cached = {c["name"]: c for c in checksums if c.get("sha256")}
    sizes = list_store_shards(store)
    out = []
    for name in live:
        c = cached.get(name)
        sha = c["sha256"] if c and c.get("bytes") == sizes[name] else sha256_of(store, f"{SHARDS_DIR}/{name}")
        records = sum(1 for e in known[name] if latest[e.key] == name)
        out.append({"name": name, "records": records, "bytes": sizes[name], "sha256": sha})
    return out


def _write_aliases(store: Storage, live: list[str], known: Mapping[str, list[ShardEntry]]) -> None:
    """The alias index of a sample store; a remote one's records are read by their headers (ranged reads)
    and the index uploaded."""
    local = store.local_path()
    if local is not None:
        write_alias_index(local, live, dict(known))
        return
    aliases = alias_entries(live, dict(known), lambda shard, offset: read_record_meta_at(store, shard, offset))
    if not aliases:
        store.delete(ALIAS_INDEX)
        return
    with local_file_to_publish(store, ALIAS_INDEX) as path:
        write_index(path, live, aliases)
