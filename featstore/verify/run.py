"""The entry of ``featstore verify``: find what PATH is (:func:`featstore.formats.locate.locate_store`: a shard
store, local or remote, or per-image caches), check it, and optionally recompute records with the model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from featstore.errors import StoreError
from featstore.formats.locate import StoreLocation, locate_store
from featstore.storage import Storage
from featstore.verify.checks import Expectations
from featstore.verify.fixes import rebuild_command
from featstore.verify.per_image import per_image_expectations, verify_per_image
from featstore.verify.recompute import recompute, recorded_model
from featstore.verify.report import Report
from featstore.verify.shard_store import verify_shard_store


@dataclass
class Target:
    """What verify was pointed at: a shard store (``storage``) or per-image caches (``root``), and its manifest."""

    manifest: dict[str, Any]
    manifest_path: Path | None  # None for a remote store or legacy caches without a manifest
    location: StoreLocation
    storage: Storage | None = None  # shard stores
    root: Path | None = None  # per-image caches: the manifest's folder


def find_target(path: Path | str, storage_options: dict[str, Any] | None) -> Target:
    """Resolve PATH (a store folder or URL, a cache or data root, or a manifest file); StoreError when it is
    none of these."""
    loc = locate_store(path, storage_options)
    if loc.layout == "per-image":
        return Target(loc.document(), loc.manifest_path, loc, root=Path(loc.root))
    return Target(loc.document(), loc.manifest_path, loc, storage=loc.storage)


def checked_data_root(data_root: str | None) -> str | None:
    """``--data-root`` made absolute; StoreError when it is not a folder."""
    if data_root is None:
        return None
    if not Path(data_root).is_dir():
        raise StoreError(f"--data-root {data_root} is not a directory; pass the folder that holds the images now")
    return str(Path(data_root).resolve())


def verify(path: Path | str, *, data_root: str | None = None, sample: int | None = None, seed: int = 0,
           workers: int | None = None, progress: bool = False, recompute_n: int = 0, model: str | None = None,
           device: str = "cpu", storage_options: dict[str, Any] | None = None) -> Report:
    """Verify a shard store or per-image cache root; raises StoreError when verification cannot run.

    ``path`` may be an fsspec URL of a shard store (``s3://bucket/prefix``); ``storage_options`` go to its backend.
    ``recompute_n`` records are recomputed with ``model`` (default: the manifest's) on ``device``.
    """
    target = find_target(path, storage_options)
    data_root = checked_data_root(data_root)
    m = target.manifest
    model_note = None
    if recompute_n and not model:
        model = recorded_model(m)
        model_note = f"--recompute uses the manifest's model {model} (pass --model to choose another)"
    workers = workers or min(8, os.cpu_count() or 1)
    if target.storage is not None:
        ex = shard_store_expectations(target.storage, m, data_root)
        report = verify_shard_store(target.storage, m, ex, data_root=data_root, sample=sample, seed=seed,
                                    workers=workers, progress=progress)
    else:
        assert target.root is not None
        ex = per_image_expectations(target.root, m, data_root)
        report = verify_per_image(target.manifest_path, target.root, m, ex, data_root=data_root, sample=sample,
                                  seed=seed, workers=workers, progress=progress)
    if recompute_n:
        assert model is not None
        if model_note:
            report.notes.append(model_note)
        recompute(report, target.location, model, recompute_n, seed, data_root, device, ex.rebuild)
    else:
        report.skip("recompute", "pass --recompute N")
    return report


def shard_store_expectations(storage: Storage, m: dict[str, Any], data_root: str | None) -> Expectations:
    """What the records of a shard store are checked against, and the command that rebuilds them."""
    droot = data_root or m.get("data_root")
    out = storage.local_path() or storage.display
    return Expectations.from_manifest(m, droot, rebuild_command(dict(m, data_root=droot), out, False))
