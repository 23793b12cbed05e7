"""The manifest schema: one JSON document describing a store, shared by build, merge, verify and export.

Shard stores keep it as ``<out>/manifest.json``; per-image stores as ``<data root>/vggt_cache_manifest.json``
(the file older tools read). The fields older tools read (``total_images``, ``processed_images``,
``vggt_model_path``, ``data_root``, ``cache_format``) are always present.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featstore.errors import StoreError
from featstore.fsutil import atomic_write_json
from featstore.formats.layout import PER_IMAGE_FORMAT, PER_IMAGE_MANIFEST, SHARD_FORMAT, SHARD_MANIFEST, STORE_DIR

if TYPE_CHECKING:
    from featstore.formats.storage import Storage

SCHEMA_VERSION = 1
REQUIRED = ("total_images", "processed_images", "vggt_model_path", "data_root", "cache_format")


def new_manifest(*, layout: str, data_root: str, model_path: str, **fields: Any) -> dict[str, Any]:
    """Return a manifest with every schema field present (``layout`` is ``"shards"`` or ``"per-image"``)."""
    from featstore import __version__

    if layout not in ("shards", "per-image"):
        raise ValueError(f"layout must be 'shards' or 'per-image', not {layout!r}")
    m: dict[str, Any] = {
        "total_images": 0,
        "processed_images": 0,
        "vggt_model_path": model_path,
        "data_root": data_root,
        "cache_format": PER_IMAGE_FORMAT if layout == "per-image" else SHARD_FORMAT,
        "featstore_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "layout": layout,
        "cache_root": None,  # per-image caches mirrored under --out; None when beside the images
        "complete": False,
        "model": {"fingerprint": None, "name": None, "config": None},
        "layers": [],
        "tensors": {},  # name -> {"layer": int, "dtype": str}
        "preprocess": {"mode": None, "apply_exif": False},
        # "image": a record per image; "sample": a record per training sample (its frames streamed as causal
        # context, one frame's tokens kept), with {"reference_frame", "history"}
        "context": {"mode": "image"},
        "dtype": None,
        "compute": None,  # how the model ran: its weights' dtype, or "autocast-bfloat16" (fp32 weights, autocast)
        "codec": None,  # shard codec the build or export wrote with (zstd, raw, int8); None: zstd (older stores)
        "lossy": None,  # {tensor: {"codec", "rel_l2", "max_abs"}}: worst bounds of records decoded from a lossy codec
        "tokens": "patch",  # "patch": patch tokens only (JanusVLN); "all": camera + register + patch
        "feature_shapes": {},  # "[1, P, C]" -> count
        "counts": {"records": 0, "processed": 0, "skipped": 0, "failed": 0, "missing": 0, "stale_rebuilt": 0,
                   "malformed_annotation_lines": 0},
        "failures_ledger": None,
        "missing_ledger": None,  # MISSING_LEDGER / PER_IMAGE_MISSING_LEDGER when annotated images are missing
        # how images were chosen (featstore.sources.Discovery.to_record): annotation files with their counts,
        # image list, data_path, or a scan; verify compares the store with the same sources
        "sources": None,
        "source_fingerprint": "stat",  # "stat" (size, mtime) or "sha256"
        "times": {"started": None, "finished": None, "seconds": None},
        "world_size": 1,
        "parts": None,
        "shards": [],  # [{"name", "records", "bytes", "sha256"}]
        "index": None,  # {"name", "records", "bytes", "sha256"}
        "provenance_unknown": [],  # fields an export from legacy caches could not know
    }
    unknown = set(fields) - set(m)
    if unknown:
        raise ValueError(f"unknown manifest fields {sorted(unknown)}")
    m.update(fields)
    return m


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Validate and write a manifest atomically."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks required fields {missing}")
    atomic_write_json(path, manifest)


def read_manifest(path: Path) -> dict[str, Any]:
    """Read a manifest (featstore's or an older script's); raises StoreError naming what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StoreError(f"manifest not found at {path}: run `featstore build` first (or point at the store "
                         f"directory that holds {SHARD_MANIFEST} or {PER_IMAGE_MANIFEST})") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"manifest {path} is unreadable ({e}); re-run `featstore merge` or `featstore build` to "
                         f"rewrite it") from None
    return parse_manifest(text, str(path))


def parse_manifest(text: str | bytes, where: str) -> dict[str, Any]:
    """Parse manifest JSON read from ``where`` (a path or URL, for messages)."""
    try:
        m = json.loads(text)
    except ValueError as e:
        raise StoreError(f"manifest {where} is not JSON ({e}); re-run `featstore merge` or `featstore build` to "
                         f"rewrite it") from None
    if not isinstance(m, dict):
        raise StoreError(f"manifest {where} is not a JSON object")
    m.setdefault("layout", "per-image" if m.get("cache_format") == PER_IMAGE_FORMAT else "shards")
    return m


def read_store_manifest(storage: "Storage") -> dict[str, Any]:
    """The ``manifest.json`` at the root of a (possibly remote) shard store; StoreError when there is none."""
    try:
        text = storage.read_bytes(SHARD_MANIFEST)
    except FileNotFoundError:
        raise StoreError(f"no featstore manifest at {storage.describe(SHARD_MANIFEST)}: expected a shard store "
                         f"(run `featstore build --out {storage.display}` first)") from None
    return parse_manifest(text, storage.describe(SHARD_MANIFEST))


def find_manifest(path: Path) -> Path:
    """Locate the manifest for a store path (a shard store dir, a data root, or the manifest file itself)."""
    path = Path(path)
    if path.is_file():
        return path
    for name in (SHARD_MANIFEST, PER_IMAGE_MANIFEST):
        if (path / name).is_file():
            return path / name
    if (path / STORE_DIR / SHARD_MANIFEST).is_file():
        return path / STORE_DIR / SHARD_MANIFEST
    raise StoreError(f"no featstore manifest under {path}: expected {SHARD_MANIFEST} (shard store) or "
                     f"{PER_IMAGE_MANIFEST} (per-image caches); run `featstore build` first")


def shape_key(shape: tuple[int, ...] | list[int]) -> str:
    """The ``feature_shapes`` key for a tensor shape, e.g. ``"[1, 1369, 2048]"``."""
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"
