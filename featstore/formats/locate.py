"""What is at a path or URL: the one answer every command and reader starts from.

:func:`locate_store` says which store lives at a location (a shard store folder, a shard store on object
storage, per-image caches with their manifest, or legacy caches that an older script wrote without one) and
returns its storage, manifest and roots. ``open_store``, ``stream``, ``featstore verify``, ``export``, ``merge``
and ``--recompute`` all call it, so a location means the same thing everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from featstore.errors import StoreError
from featstore.formats.layout import PARTS_DIR, PER_IMAGE_STATE_DIR, SHARD_MANIFEST, SHARDS_DIR
from featstore.formats.manifest import find_manifest, parse_manifest, read_manifest, read_store_manifest
from featstore.storage import Storage, is_remote, local_path_of, parse_location

SHARDS = "shards"  # a shard store in a local folder
REMOTE_SHARDS = "remote-shards"  # a shard store on object storage (any fsspec URL)
PER_IMAGE = "per-image"  # per-image caches with their vggt_cache_manifest.json
LEGACY = "legacy-per-image"  # per-image caches an older script wrote, without a manifest


@dataclass(frozen=True)
class StoreLocation:
    """A store found at a location: what it is, where its objects are, and what its manifest says."""

    kind: str  # SHARDS, REMOTE_SHARDS, PER_IMAGE or LEGACY
    storage: Storage  # the store folder or URL; for per-image caches, the folder of the manifest (the cache root)
    manifest: dict[str, Any] | None  # None for legacy caches, and for a build's output not merged yet
    manifest_path: Path | None  # the local manifest file (None when remote, legacy or not merged yet)
    root: Path | str  # the store folder (its URL when remote); per-image: the manifest's folder
    data_root: str | None  # where the images were when the store was built (legacy caches: their folder)

    @property
    def layout(self) -> str:
        """``"shards"`` or ``"per-image"``, as a manifest's ``layout`` says."""
        return "shards" if self.kind in (SHARDS, REMOTE_SHARDS) else "per-image"

    @property
    def is_remote(self) -> bool:
        return self.kind == REMOTE_SHARDS

    def document(self) -> dict[str, Any]:
        """The manifest, or for legacy caches the little that is known: their layout and data root."""
        if self.manifest is not None:
            return self.manifest
        return {"layout": "per-image", "data_root": self.data_root}


def locate_store(location: str | os.PathLike[str] | Storage, storage_options: Mapping[str, Any] | None = None, *,
                 unmerged: bool = False) -> StoreLocation:
    """The store at ``location``: a store folder or fsspec URL, a data root (its ``vggt_featstore/``, its per-image
    manifest or its legacy caches), or a manifest file. StoreError naming what was expected when there is none.

    ``unmerged``: also accept a build's output before its merge (``parts/`` or ``shards/`` without a manifest, or
    per-image caches with their ``.featstore/`` build state); its ``manifest`` is then None (``featstore merge``).
    """
    if isinstance(location, Storage):
        if location.is_local:
            return locate_store(location.local_path(), unmerged=unmerged)
        return _remote(location, unmerged)
    if is_remote(location):
        return _remote(parse_location(str(location), storage_options), unmerged)
    return _local(local_path_of(location), unmerged)


def _remote(storage: Storage, unmerged: bool) -> StoreLocation:
    try:
        text = storage.read_bytes(SHARD_MANIFEST)
    except FileNotFoundError:
        if unmerged:
            if _has_build_output(storage):
                return StoreLocation(REMOTE_SHARDS, storage, None, None, storage.display, None)
            raise StoreError(_not_a_store(storage.display)) from None
        read_store_manifest(storage)  # raises the StoreError that says what is missing
        raise
    m = parse_manifest(text, storage.describe(SHARD_MANIFEST))
    if m.get("layout") != "shards":
        raise StoreError(f"{storage.display} holds a per-image manifest; remote stores must be shard stores "
                         f"(build them with `featstore build --out {storage.display}`)")
    return StoreLocation(REMOTE_SHARDS, storage, m, None, storage.display, m.get("data_root") or None)


def _has_build_output(storage: Storage) -> bool:
    from featstore.formats.shardstore import list_store_shards

    return bool(list_store_shards(storage) or storage.list(PARTS_DIR))


def _local(path: Path, unmerged: bool) -> StoreLocation:
    if not path.exists():
        if unmerged:
            raise StoreError(_not_a_store(path))
        raise StoreError(f"{path} does not exist; pass a shard store folder, a data root with caches, or a manifest")
    if unmerged and path.is_dir() and (path / PER_IMAGE_STATE_DIR).is_dir():
        mpath = _manifest_file(path)
        m = read_manifest(mpath) if mpath is not None else None
        return StoreLocation(PER_IMAGE, parse_location(path), m, mpath, path, _data_root(m, path))
    mpath = _manifest_file(path)
    if mpath is None:
        return _without_manifest(path, unmerged)
    m = read_manifest(mpath)
    root = mpath.parent
    kind = SHARDS if m.get("layout") == "shards" else PER_IMAGE
    return StoreLocation(kind, parse_location(root), m, mpath, root, _data_root(m, root))


def _manifest_file(path: Path) -> Path | None:
    try:
        return find_manifest(path)
    except StoreError:
        return None


def _data_root(m: dict[str, Any] | None, root: Path) -> str | None:
    """The manifest's data root; per-image caches beside the images have theirs where the manifest lies now (so a
    copied store still works), whatever path the manifest recorded."""
    if m is None:
        return None
    if m.get("layout") == "per-image":
        return str(root) if not m.get("cache_root") else (m.get("data_root") or str(root))
    return m.get("data_root") or None


def _without_manifest(path: Path, unmerged: bool) -> StoreLocation:
    """Legacy caches, or (``unmerged``) a shard build's output before its merge; else the error saying what is missing."""
    from featstore.formats.perimage import scan_per_image

    if unmerged and path.is_dir() and any((path / d).is_dir() for d in (SHARDS_DIR, PARTS_DIR)):
        return StoreLocation(SHARDS, parse_location(path), None, None, path, None)
    if path.is_dir() and next(scan_per_image(path), None) is not None:
        root = path.resolve()
        return StoreLocation(LEGACY, parse_location(root), None, None, root, str(root))
    if unmerged:
        raise StoreError(_not_a_store(path))
    find_manifest(path)  # raises the StoreError that names the manifests looked for
    raise StoreError(f"no featstore store at {path}")


def _not_a_store(where: Path | str) -> str:
    return (f"{where} is not a featstore store: expected {SHARDS_DIR}/, {PARTS_DIR}/ or {SHARD_MANIFEST} there (the "
            f"--out of `featstore build`, or the per-image root)")
