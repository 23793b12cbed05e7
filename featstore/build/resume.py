"""Resume planning: which items are this rank's, which of them are stored already, which are stale, and whether
the store's recorded settings let this run add to it.

A build never trusts a half-written file: a killed writer's unfinished shard is cut after its last complete
record (:func:`salvage_unfinished_shards`), a killed run's temporary cache files of this rank's keys are
removed, and what remains in complete shards or cache files counts as done. Everything here only reads,
except those two clean-ups of this rank's own leftovers (its lock is held).
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from featstore.errors import FeatstoreError, OptionError, StoreError
from featstore.formats.layout import BUILD_CONFIG, SHARD_MANIFEST, SHARDS_DIR, STORE_DIR
from featstore.formats.keys import CacheLayout
from featstore.formats.manifest import BuildSettings, parse_manifest, read_manifest
from featstore.formats.perimage import read_pt
from featstore.formats.shards import read_record_meta, read_record_meta_at, salvage_shard
from featstore.storage import LocalStorage, Storage, is_remote, parse_location, redact, staging_dir
from featstore.runtime.fsutil import is_temp_name, remove_temp_files
from featstore.formats.shardstore import list_store_shards, shard_order
from featstore.build.merge import collect_entries, per_image_manifest_path
from featstore.discover.samples import RecordItem, SampleItem
from featstore.formats.staleness import frames_changed, is_checkable, source_changed

log = logging.getLogger("featstore")


@dataclass(frozen=True)
class BuildTarget:
    """Where one rank's build writes: the layout, the store, and the local folder written."""

    layout: str  # "shards" or "per-image"
    store: Storage  # the shard store (a local folder or a URL), or the per-image output root
    out: Path  # the local folder written: the shard store, a remote store's staging folder, or the cache root
    data_root: Path
    cache_root: Path | None  # per-image caches mirrored under it; None: beside the images (or a shard store)
    remote: bool

    def per_image_manifest(self) -> Path:
        """Where a per-image store's manifest lies: the cache root, or the data root."""
        return per_image_manifest_path(self.data_root, self.cache_root)


def build_target(layout: str, out: Path | str | None, data_root: Path, gid: int,
                 storage_options: dict[str, Any] | None = None) -> BuildTarget:
    """Resolve ``--format`` and ``--out`` into rank ``gid``'s target. A remote store's shards are written in a
    local staging folder of this rank and uploaded once complete."""
    remote = out is not None and is_remote(out)
    if remote and layout != "shards":
        raise OptionError(f"--out {redact(str(out))}: per-image caches are local files; a URL output needs "
                          f"--format shards")
    if layout == "shards":
        store: Storage = (parse_location(str(out), storage_options) if remote else
                          LocalStorage(Path(out).resolve() if out else data_root / STORE_DIR))
        local = staging_dir(store, gid) if remote else store.local_path()
        assert local is not None
        return BuildTarget(layout, store, local, data_root, None, remote)
    cache_root = Path(out).resolve() if out else None
    return BuildTarget(layout, LocalStorage(cache_root or data_root), cache_root or data_root, data_root, cache_root,
                       False)


# --- this rank's share ---------------------------------------------------------------------------------------
def owner_of(key: str, world: int) -> int:
    """The rank that builds ``key``: deterministic, disjoint, balanced, stable as the data set grows."""
    return zlib.crc32(key.encode("utf-8", "surrogateescape")) % world


def rank_share(items: Sequence[RecordItem], gid: int, world: int) -> list[RecordItem]:
    """The items rank ``gid`` of ``world`` builds: those whose :attr:`owner_frame` (an image's key; a sample's
    first streamed frame, so the samples sharing a prefix tree are built, and share work, on one rank) it owns."""
    return [it for it in items if owner_of(it.owner_frame, world) == gid]


# --- settings ------------------------------------------------------------------------------------------------
def previous_settings(t: BuildTarget) -> BuildSettings | None:
    """The settings the store's records were built with (``build.json``, else the manifest); None for a store
    without records, whose settings bind nothing (a rerun with other settings into it just builds)."""
    if t.layout == "shards":
        if not list_store_shards(t.store):
            return None
        for name in (BUILD_CONFIG, SHARD_MANIFEST):
            try:
                return BuildSettings.of(parse_manifest(t.store.read_bytes(name), t.store.describe(name)))
            except (OSError, StoreError):
                continue
        return None
    path = t.per_image_manifest()
    try:
        m = read_manifest(path) if path.is_file() else None
    except StoreError:
        return None
    return BuildSettings.of(m) if m and m.get("processed_images") else None


def check_compatible(recorded: BuildSettings | None, requested: BuildSettings, where: str) -> None:
    """Refuse (StoreError) to add records built with other settings to a store: mixing them corrupts training.
    The rule of what binds is formats.manifest.SETTING_RULES."""
    diffs = recorded.differences(requested) if recorded else []
    if diffs:
        raise StoreError(f"the store at {where} was built with other settings ({'; '.join(d.describe() for d in diffs)})."
                         f" Mixing them would corrupt training: use another --out, pass the store's values, or "
                         f"--no-skip-existing to rebuild every record with the new settings")


def reusable_settings(recorded: BuildSettings | None, requested: BuildSettings) -> BuildSettings | None:
    """The recorded settings a run with nothing left to build carries over without loading the model, or None.

    ``requested`` holds what is known before the model loads (no fingerprint yet). Only a store that recorded
    the checkpoint path, layers, model config, dtype and preprocessing and matches them qualifies; anything else
    loads the model and is compared by fingerprint.
    """
    if not recorded or not recorded.layers or not (recorded.model or {}).get("config"):
        return None
    if recorded.dtype is None or not recorded.preprocess.get("mode"):
        return None
    if recorded.vggt_model_path != requested.vggt_model_path or recorded.differences(requested):
        return None
    return recorded


# --- what is done ----------------------------------------------------------------------------------------------
def salvage_unfinished_shards(t: BuildTarget, gid: int, fsync: bool = True) -> None:
    """Keep the complete records of rank ``gid``'s shard that a crash left unfinished (before planning, so they
    count as done): a crash loses only the records still on their way to the disk."""
    shard_dir = t.out / SHARDS_DIR
    if t.layout != "shards" or t.remote or not shard_dir.is_dir():
        return  # a remote build stages shards locally and uploads them complete: nothing half-written there
    mine = f"-{gid:05d}-"
    for e in os.scandir(shard_dir):
        if is_temp_name(e.name) and mine in e.name:
            kept = salvage_shard(Path(e.path), fsync=fsync)
            log.info("unfinished shard %s left by an interrupted build: %s", e.name,
                     f"kept its {kept[1]} complete records as {kept[0]}" if kept else "nothing to keep, removed")


def per_image_caches(t: BuildTarget, keys: list[str]) -> dict[str, Path]:
    """Where each key's cache file goes, by the writers' strict rule (StoreError for a key whose cache would
    land outside its root, before anything is written); removes the temporary cache files of these keys (a
    killed run's: this rank's lock is held)."""
    layout = CacheLayout(t.data_root, t.cache_root)
    paths = {k: layout.destination(k) for k in keys}
    by_dir: dict[Path, set[str]] = {}
    for p in paths.values():
        by_dir.setdefault(p.parent, set()).add(p.name)
    for folder, names in by_dir.items():
        for p in remove_temp_files(folder, finals=names, any_writer=True):
            log.info("removing unfinished cache file %s left by an interrupted build", p)
    return paths


def done_sources(t: BuildTarget, keys: list[str]) -> dict[str, tuple[str, int]]:
    """Where the stored record of each of ``keys`` is: key -> (shard, offset), or (cache file, 0)."""
    if t.layout == "shards":
        _, known = collect_entries(t.store)
        wanted = set(keys)
        return {e.key: (s, e.offset) for s in sorted(known, key=shard_order) for e in known[s] if e.key in wanted}
    return {k: (str(p), 0) for k, p in per_image_caches(t, keys).items() if p.is_file()}


@dataclass
class StoredMeta:
    """Reads the metadata of stored records, keeping the local shard files it opened until :meth:`close`."""

    target: BuildTarget
    files: dict[str, Any] = field(default_factory=dict)

    def __call__(self, where: tuple[str, int]) -> dict[str, Any]:
        """The metadata of the record at ``where`` (a per-image file, or the record header in its shard)."""
        t = self.target
        if t.layout == "per-image":
            return dict(read_pt(Path(where[0]), verify=False).meta)
        if t.remote:
            return read_record_meta_at(t.store, where[0], where[1])
        f = self.files.get(where[0])
        if f is None:
            f = self.files[where[0]] = open(t.out / SHARDS_DIR / where[0], "rb")
        return read_record_meta(f.fileno(), where[1])

    def close(self) -> None:
        """Close the shard files opened so far."""
        for f in self.files.values():
            f.close()
        self.files.clear()


def is_stale(item: RecordItem, where: tuple[str, int], meta_of: StoredMeta) -> bool:
    """True when the image (any frame of a sample) changed since its record was built (featstore.formats.staleness:
    content for records built with --hash-inputs, else size and mtime); unreadable or unfingerprinted records
    are rebuilt."""
    try:
        meta = meta_of(where)
    except (FeatstoreError, OSError, ValueError):
        return True
    try:
        if isinstance(item, SampleItem):
            return frames_changed(item.paths, meta.get("frame_sources") or [])
        recorded = meta.get("source") or {}
        return not is_checkable(recorded) or source_changed(item.paths[0], recorded)
    except OSError:
        return False  # the image is gone: nothing to rebuild from


@dataclass
class ResumePlan:
    """What one rank builds: the items still to build, and how many it skips as done or rebuilds as stale."""

    todo: list[RecordItem]
    skipped: int = 0
    stale: int = 0


def plan_resume(t: BuildTarget, mine: list[RecordItem], skip_existing: bool, rebuild_stale: bool) -> ResumePlan:
    """Of this rank's items, those still to build: not stored yet, or (``rebuild_stale``) stale."""
    if not skip_existing:
        if t.layout == "per-image":
            per_image_caches(t, [it.key for it in mine])  # refuse a cache outside its root before any work
        return ResumePlan(list(mine))
    done = done_sources(t, [it.key for it in mine])
    plan = ResumePlan([])
    meta_of = StoredMeta(t)
    try:
        for it in mine:
            if it.key not in done:
                plan.todo.append(it)
            elif rebuild_stale and is_stale(it, done[it.key], meta_of):
                plan.stale += 1
                plan.todo.append(it)
            else:
                plan.skipped += 1
    finally:
        meta_of.close()
    return plan
