"""``featstore export``: move a store between layouts, bit for bit.

* shards -> per-image: each live record (the one the index points to) becomes ``<image>.vggt_cache.pt``
  beside the image under the manifest's data root, or mirrored under ``--out``; plus the per-image
  manifest. Idempotent (an identical file is left alone), atomic, and a key that would land outside the
  output root (``..``, an absolute path, a symlinked folder) is refused and reported.
* per-image -> shards: packs every cache under a data root (featstore-written or legacy ``{"features",
  "path"}`` files) into tar shards with an index and a manifest that lists what is unknown about legacy
  provenance.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from featstore.errors import FeatstoreError, RecordError, StoreError
from featstore.formats.index import INDEX_NAME, Index, IndexEntry, write_index
from featstore.formats.keys import is_safe_relative_key
from featstore.formats.manifest import (PER_IMAGE_MANIFEST, SHARD_MANIFEST, find_manifest, new_manifest,
                                        read_manifest, shape_key, write_manifest)
from featstore.formats.perimage import read_pt, write_pt
from featstore.formats.record import Record, decode_record, encode_record
from featstore.formats.shards import (DEFAULT_SHARD_BYTES, SHARDS_DIR, ShardWriter, iter_shard_records,
                                      parse_shard_name, sha256_file)
from featstore.formats.storage import add_storage_options_argument, is_remote, redact, storage_options_of
from featstore.merge import shard_order, collect_entries
from featstore.loader import ShardStore, open_store, scan_per_image

log = logging.getLogger("featstore")
COPIED_FIELDS = ("vggt_model_path", "model", "layers", "tensors", "preprocess", "dtype", "tokens",
                 "source_fingerprint", "total_images")
LEGACY_UNKNOWN = ["model.fingerprint", "layers", "preprocess", "tokens", "source fingerprint (staleness)"]


@dataclass
class ExportResult:
    """What an export did: records written, left unchanged, refused (unsafe keys) and failed (unreadable)."""

    written: int = 0
    unchanged: int = 0
    refused: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    out: Path | None = None

    @property
    def ok(self) -> bool:
        """True when every record was exported."""
        return not self.refused and not self.failed


def safe_destination(key: str, root: Path) -> Path:
    """The per-image file for ``key`` under ``root``; RecordError if it would land outside ``root``."""
    if not is_safe_relative_key(key):
        raise RecordError(f"refusing key {key!r}: it is absolute or contains '..', so its cache would land "
                          f"outside {root}")
    dest = root / (key + ".vggt_cache.pt")
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(dest.parent)
    if real_parent != real_root and not real_parent.startswith(real_root.rstrip(os.sep) + os.sep):
        raise RecordError(f"refusing key {key!r}: its folder resolves through a link to {real_parent}, outside {root}")
    if dest.is_symlink():
        raise RecordError(f"refusing key {key!r}: {dest} is a symbolic link")
    return dest


def _same_record(path: Path, rec: Record) -> bool:
    try:
        old = read_pt(path, key=rec.key)
    except (FeatstoreError, OSError):
        return False
    if list(old.tensors) != list(rec.tensors) or old.meta != rec.meta or old.path != rec.path:
        return False
    return all(o.dtype == t.dtype and o.shape == t.shape and torch.equal(o.view(torch.uint8) if o.dim() else o,
                                                                       t.view(torch.uint8) if t.dim() else t)
               for o, t in zip(old.tensors.values(), rec.tensors.values()))


def _stored_records(store: ShardStore) -> Iterator[tuple[IndexEntry, bytes | Exception]]:
    """Every live record's stored bytes (or the error reading them), shard by shard, read sequentially.

    A remote shard arrives as a few large ranged GETs; a shard that turns out truncated falls back to
    reading its remaining records one by one, so each unreadable record is reported on its own.
    """
    for shard, entries in store.index.shard_entries().items():
        done = 0
        try:
            for e, data in iter_shard_records(store.storage, [(shard, entries)]):
                done += 1
                yield e, data
        except (FeatstoreError, OSError):
            for e in entries[done:]:
                try:
                    yield e, store.read_bytes(e)
                except (FeatstoreError, OSError) as err:
                    yield e, err


def export_to_per_image(store_path: Path | str, out: Path | None = None, *, fsync: bool = True,
                        storage_options: dict[str, Any] | None = None) -> ExportResult:
    """Write every live record of a shard store (local or an fsspec URL) as a per-image cache, plus the
    per-image manifest."""
    store = open_store(store_path, storage_options=storage_options)
    if not isinstance(store, ShardStore):
        raise StoreError(f"{store_path} is already a per-image store; export it with --format shards")
    m = store.manifest
    data_root = Path(m.get("data_root") or "")
    if out is None and not data_root.is_dir():
        raise StoreError(f"the manifest's data root {data_root} does not exist; pass --out DIR to mirror the caches there")
    root = Path(out).resolve() if out is not None else data_root
    root.mkdir(parents=True, exist_ok=True)
    res = ExportResult(out=root)
    shapes: Counter = Counter()
    for e, data in _stored_records(store):
        try:
            dest = safe_destination(e.key, root)
        except RecordError as err:
            res.refused.append(e.key)
            log.error("%s", err)
            continue
        try:
            if isinstance(data, Exception):
                raise data
            rec = decode_record(data, verify=False)
        except (FeatstoreError, OSError) as err:
            res.failed.append((e.key, str(err)))
            log.error("cannot read record %r: %s", e.key, err)
            continue
        shapes[shape_key(rec.features.shape)] += 1
        if dest.is_file() and _same_record(dest, rec):
            res.unchanged += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_pt(dest, rec, fsync=fsync)
        res.written += 1
    done = res.written + res.unchanged
    pm = new_manifest(layout="per-image", data_root=str(data_root), model_path=str(m.get("vggt_model_path", "")),
                      **{k: m[k] for k in COPIED_FIELDS if k in m and k != "vggt_model_path"})
    pm.update(cache_root=str(root) if out is not None else None, processed_images=done, feature_shapes=dict(shapes),
              provenance_unknown=list(m.get("provenance_unknown") or []),
              counts=dict(pm["counts"], records=done, failed=len(res.failed) + len(res.refused)),
              complete=bool(m.get("complete")) and res.ok,
              times={"started": None, "finished": time.time(), "seconds": None})
    write_manifest(root / PER_IMAGE_MANIFEST, pm)
    return res


def _per_image_root(data_root: Path) -> tuple[Path, Path, dict[str, Any] | None]:
    """(data root, cache root, manifest or None) for a folder holding per-image caches."""
    try:
        mpath = find_manifest(data_root)
    except StoreError:
        return data_root, data_root, None
    m = read_manifest(mpath)
    if m.get("layout") != "per-image":
        raise StoreError(f"{data_root} holds a shard store ({mpath}); export it with --format per-image")
    droot = Path(m.get("data_root") or mpath.parent)
    croot = Path(m["cache_root"]) if m.get("cache_root") else mpath.parent
    return droot, croot, m


def export_to_shards(data_root: Path, out: Path, *, shard_size: int = DEFAULT_SHARD_BYTES, prefix: str = "vggt",
                     fsync: bool = True) -> ExportResult:
    """Pack every per-image cache under ``data_root`` (legacy ones included) into a shard store at ``out``.

    Resumable: records already in ``out``'s complete shards (from an interrupted export of the same data
    root) are kept and skipped; only the rest is written, then index and manifest are rebuilt atomically.
    """
    droot, croot, pm = _per_image_root(Path(data_root).resolve())
    out = Path(out).resolve()
    old = read_manifest(out / SHARD_MANIFEST) if (out / SHARD_MANIFEST).is_file() else None
    if old is not None and Path(str(old.get("data_root") or "")).resolve() != droot:
        raise StoreError(f"{out} already holds a shard store of {old.get('data_root')}; export {droot} into an "
                         f"empty folder (or delete {out} first)")
    _, known = collect_entries(out)  # complete shards only; an interrupted writer's temp file is ignored
    done = {e.key for es in known.values() for e in es}
    first_n = max((p[2] for p in map(parse_shard_name, known) if p), default=-1) + 1
    res = ExportResult(out=out)
    writer = ShardWriter(out / SHARDS_DIR, prefix, 0, first_n, shard_size, fsync=fsync)
    legacy = 0
    try:
        for key in scan_per_image(croot):
            if key in done:
                res.unchanged += 1
                continue
            try:
                rec = read_pt(croot / (key + ".vggt_cache.pt"), key=key)
            except (FeatstoreError, OSError) as err:
                res.failed.append((key, str(err)))
                log.error("cannot read per-image cache for %r: %s", key, err)
                continue
            rec.key = key  # the file's location is the truth (older scripts stored absolute paths)
            legacy += bool(rec.meta.get("legacy"))
            writer.write(key, encode_record(rec))
            res.written += 1
        writer.close_shard()
    except BaseException:
        writer.abort()
        raise
    for info, es in writer.closed_shards:
        known[info.name] = es
    shards = sorted(known, key=shard_order)
    n = write_index(out / INDEX_NAME, shards, ((i, e) for i, s in enumerate(shards) for e in known[s]))
    ix = Index(out / INDEX_NAME)  # fail loudly now rather than in training if the index is unreadable
    specs = Counter(int(x) for x in ix.cols["spec"]) if n else Counter()
    shapes = Counter({shape_key(ix.specs[i][0][2]): c for i, c in specs.items()})
    dtypes = {ix.specs[i][0][1] for i in specs}
    sha = {i.name: i.sha256 for i, _ in writer.closed_shards}
    sha.update({s["name"]: s["sha256"] for s in (old or {}).get("shards", []) if s.get("sha256")})
    base = pm or {}
    m = new_manifest(layout="shards", data_root=str(droot), model_path=str(base.get("vggt_model_path", "unknown")),
                     **{k: base[k] for k in COPIED_FIELDS if k in base and k != "vggt_model_path"})
    if not m["dtype"] and len(dtypes) == 1:
        m["dtype"] = next(iter(dtypes))
    if not m["tensors"] and len(dtypes) == 1:
        m["tensors"] = {"features": {"layer": None, "dtype": next(iter(dtypes))}}
    unknown = list(base.get("provenance_unknown") or [])
    if legacy or (old and old.get("provenance_unknown")):
        unknown += [u for u in LEGACY_UNKNOWN if u not in unknown]
    total = max(int(base.get("total_images") or 0), n)
    m.update(total_images=total, processed_images=n, feature_shapes=dict(shapes), provenance_unknown=unknown,
             counts=dict(m["counts"], records=n, failed=len(res.failed)), complete=res.ok and n >= total,
             shards=[{"name": s, "records": len(known[s]), "bytes": (out / SHARDS_DIR / s).stat().st_size,
                      "sha256": sha.get(s) or sha256_file(out / SHARDS_DIR / s)} for s in shards],
             index={"name": INDEX_NAME, "records": n, "bytes": (out / INDEX_NAME).stat().st_size,
                    "sha256": sha256_file(out / INDEX_NAME)},
             times={"started": None, "finished": time.time(), "seconds": None})
    if legacy:
        log.warning("%d of %d caches have no featstore metadata (older scripts); the manifest lists what is "
                    "unknown about their provenance", legacy, n)
    write_manifest(out / SHARD_MANIFEST, m)
    return res


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore export``."""
    from featstore.cli import HelpFormatter, parse_size

    p = sub.add_parser(
        "export", help="convert a store between shards and per-image caches",
        formatter_class=HelpFormatter,
        description="featstore export STORE --format per-image [--out DIR]: write <image>.vggt_cache.pt files "
                    "beside the images (or mirrored under --out) from a shard store, bit for bit. "
                    "featstore export DATA_ROOT --format shards --out DIR: pack per-image caches (including "
                    "legacy ones with only 'features' and 'path') into shards. Exit 0 when every record was "
                    "exported, 1 when some were refused or unreadable, 2 when the export could not run.")
    p.add_argument("source", help="a shard store folder or URL (s3://bucket/prefix, any fsspec URL; for "
                                  "--format per-image) or a data root holding per-image caches (for --format shards)")
    p.add_argument("--format", required=True, choices=("per-image", "shards"), help="the layout to write")
    p.add_argument("--out", type=Path, help="per-image: mirror caches under this folder instead of beside the "
                                            "images; shards: the new store folder (required)")
    p.add_argument("--shard-size", type=parse_size, default=1_000_000_000, help="target shard size (shards only)")
    p.add_argument("--shard-prefix", default="vggt", help="shard file name prefix (shards only)")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="skip fsync after writes")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    try:
        if args.format == "per-image":
            res = export_to_per_image(args.source, args.out, fsync=args.fsync,
                                      storage_options=storage_options_of(args))
        else:
            if is_remote(args.source):
                log.error("--format shards reads per-image caches from a local data root, not %s; pass a local "
                          "folder", redact(args.source))
                return 2
            if args.out is None:
                log.error("--format shards needs --out DIR (the new shard store folder)")
                return 2
            res = export_to_shards(Path(args.source), args.out, shard_size=args.shard_size, prefix=args.shard_prefix,
                                   fsync=args.fsync)
    except (FeatstoreError, OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("exported to %s: %d written, %d unchanged, %d refused, %d unreadable", res.out, res.written,
             res.unchanged, len(res.refused), len(res.failed))
    if res.refused:
        log.error("refused %d keys that would land outside %s, e.g. %s", len(res.refused), res.out, res.refused[:3])
    return 0 if res.ok else 1
