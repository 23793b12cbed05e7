"""``featstore export``: move a store between layouts (bit for bit), or re-encode it with another codec.

* shards -> per-image: each live record (the one the index points to) becomes ``<image>.vggt_cache.pt``
  beside the image under the manifest's data root, or mirrored under ``--out``; plus the per-image
  manifest. Idempotent (an identical file is left alone), atomic, and a key that would land outside the
  output root (``..``, an absolute path, a symlinked folder) is refused and reported.
* per-image -> shards: packs every cache under a data root (featstore-written or legacy ``{"features",
  "path"}`` files) into tar shards with an index and a manifest that lists what is unknown about legacy
  provenance.
* shards -> shards: re-encodes a shard store's live records with ``--codec`` (zstd, raw, int8).

Records decoded from a lossy codec (int8) are written dequantized, in their stored dtype, and keep the error
bounds they were decoded with in ``meta["lossy"]`` (the manifests list the worst in ``lossy``), so a
per-image cache or a lossless copy never passes for the model's exact output.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from featstore.formats.aliases import SAMPLE_CONTEXTS
from featstore.formats.layout import DEFAULT_SHARD_BYTES, PER_IMAGE_MANIFEST, SHARDS_DIR, SHARD_MANIFEST
from featstore.errors import FeatstoreError, RecordError, StoreError
from featstore.formats.index import IndexEntry
from featstore.formats.keys import CacheLayout
from featstore.formats.locate import StoreLocation, locate_store
from featstore.formats.manifest import BuildSettings, Manifest, read_manifest, shape_key, write_manifest
from featstore.formats.perimage import read_pt, scan_per_image, write_pt
from featstore.formats.codecs import check_codec
from featstore.formats.record import Record, decode_record, encode_record, with_lossy_provenance
from featstore.formats.shards import ClosedShard, ShardWriter, iter_shard_records, parse_shard_name
from featstore.formats.shardstore import finalize_shard_store
from featstore.formats.store import ShardStoreReads, Store
from featstore.storage import parse_location
from featstore.build.merge import collect_entries
from featstore.read import open_store

log = logging.getLogger("featstore")
LEGACY_UNKNOWN = ["model.fingerprint", "layers", "preprocess", "tokens", "source fingerprint (staleness)"]


@dataclass
class ExportResult:
    """What an export did: records written, left unchanged, refused (unsafe keys) and failed (unreadable)."""

    written: int = 0
    unchanged: int = 0
    refused: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    out: Path | None = None
    closed: list[ClosedShard] = field(default_factory=list)  # the shards an export closed

    @property
    def ok(self) -> bool:
        """True when every record was exported."""
        return not self.refused and not self.failed


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


def _stored_records(store: ShardStoreReads) -> Iterator[tuple[IndexEntry, bytes | memoryview | Exception]]:
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
    store = _image_store_to_export(store_path, storage_options)
    data_root = Path(store.manifest.get("data_root") or "")
    if out is None and not data_root.is_dir():
        raise StoreError(f"the manifest's data root {data_root} does not exist; pass --out DIR to mirror the caches there")
    root = Path(out).resolve() if out is not None else data_root
    root.mkdir(parents=True, exist_ok=True)
    res = ExportResult(out=root)
    shapes, lossy = _write_per_image_files(store, CacheLayout(data_root, root if out is not None else None), res, fsync)
    src = Manifest.from_json(store.manifest)
    pm = Manifest.new(layout="per-image", data_root=str(data_root), model_path="")
    pm.use_settings(src.settings())
    done = res.written + res.unchanged
    pm.codec = None  # per-image files have no shard codec
    pm.total_images, pm.sources, pm.provenance_unknown = src.total_images, src.sources, list(src.provenance_unknown or [])
    pm.cache_root, pm.processed_images, pm.feature_shapes = str(root) if out is not None else None, done, dict(shapes)
    pm.counts.update(records=done, failed=len(res.failed) + len(res.refused))
    pm.complete, pm.lossy = src.complete and res.ok, lossy or None
    pm.times = {"started": None, "finished": time.time(), "seconds": None}
    write_manifest(root / PER_IMAGE_MANIFEST, pm)
    return res


def _image_store_to_export(store_path: Path | str, storage_options: dict[str, Any] | None) -> ShardStoreReads:
    """The shard store of per-image records to export; StoreError for a per-image or a sample store."""
    loc = locate_store(store_path, storage_options)
    if loc.layout != "shards":
        raise StoreError(f"{store_path} is already a per-image store; export it with --format shards")
    store = open_store(loc)
    assert isinstance(store, ShardStoreReads)
    if store.context.get("mode") in SAMPLE_CONTEXTS:
        raise StoreError(f"{store_path} holds one record per training sample (--context {store.context['mode']}): a sample's features depend on all "
                         "its frames, so a per-image file beside one image cannot hold them (and training code "
                         "reading per-image caches would take them for context-free features); read the store with "
                         "open_store(...).get_sample(frames) or featstore.load_sample_features instead")
    return store


def _write_per_image_files(store: ShardStoreReads, layout: CacheLayout, res: ExportResult, fsync: bool
                           ) -> tuple[Counter, dict[str, dict[str, Any]]]:
    """Write each live record to its cache file (identical files left alone); returns the feature shapes and
    the worst lossy bounds of the records exported."""
    shapes: Counter = Counter()
    lossy: dict[str, dict[str, Any]] = {}
    for e, data in _stored_records(store):
        try:
            dest = layout.destination(e.key)
        except RecordError as err:
            res.refused.append(e.key)
            log.error("%s", err)
            continue
        try:
            if isinstance(data, Exception):
                raise data
            rec = with_lossy_provenance(decode_record(data, verify=False))
        except (FeatstoreError, OSError) as err:
            res.failed.append((e.key, str(err)))
            log.error("cannot read record %r: %s", e.key, err)
            continue
        shapes[shape_key(rec.features.shape)] += 1
        worst_bounds(lossy, rec.meta.get("lossy") or {})
        if dest.is_file() and _same_record(dest, rec):
            res.unchanged += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_pt(dest, rec, fsync=fsync)
        res.written += 1
    return shapes, lossy


@dataclass
class Source:
    """What ``export --format shards`` packs: per-image caches or another shard store (to re-encode it)."""

    data_root: Path
    manifest: dict[str, Any] | None
    keys: Iterable[str]
    read: Callable[[str], Record]
    path: Path


def _per_image_source(loc: StoreLocation, path: Path) -> Source:
    """The caches of a per-image store (under its manifest's cache root), or legacy caches under their folder."""
    root = Path(loc.root)
    m = loc.manifest
    if m is None:
        return Source(root, None, scan_per_image(root), _pt_reader(root), path)
    droot = Path(m.get("data_root") or root)
    croot = Path(m["cache_root"]) if m.get("cache_root") else root
    return Source(droot, m, scan_per_image(croot), _pt_reader(croot), path)


def _pt_reader(croot: Path) -> Callable[[str], Record]:
    layout = CacheLayout(croot)
    return lambda key: read_pt(layout.path(key), key=key)


def _shard_source(store: ShardStoreReads) -> Source:
    """A shard store's live records in shard and offset order (sequential reads), decoded to their stored dtype."""
    keys = (e.key for entries in store.index.shard_entries().values() for e in entries)
    return Source(Path(store.manifest.get("data_root") or ""), store.manifest, keys, _record_reader(store),
                  Path(store.root))


def _record_reader(store: Store) -> Callable[[str], Record]:
    """Read a key's record from any store, lossy tensors marked with the error bounds they were decoded with."""
    return lambda key: with_lossy_provenance(store.record(key))


def open_source(path: Path) -> Source:
    """Per-image caches or a shard store at ``path``, as a :class:`Source`."""
    loc = locate_store(path)
    if loc.layout == "shards":
        store = open_store(loc)
        assert isinstance(store, ShardStoreReads)
        return _shard_source(store)
    return _per_image_source(loc, path)


def export_to_shards(data_root: Path, out: Path, *, shard_size: int = DEFAULT_SHARD_BYTES, prefix: str = "vggt",
                     fsync: bool = True, codec: str = "zstd") -> ExportResult:
    """Pack per-image caches (legacy ones included), or re-encode a shard store, into a shard store at ``out``.

    ``codec`` names the codec of every tensor (featstore.formats.codecs). Records decoded from a lossy codec
    keep their error bounds in ``meta["lossy"]``. Resumable: records already in ``out``'s complete shards
    (from an interrupted export of the same source) are kept and skipped; only the rest is written, then
    index and manifest are rebuilt atomically.
    """
    check_codec(codec)
    src = open_source(Path(data_root).resolve())
    out = Path(out).resolve()
    if out == src.path.resolve():
        raise StoreError(f"--out {out} is the source store itself; export into another folder")
    old = read_manifest(out / SHARD_MANIFEST) if (out / SHARD_MANIFEST).is_file() else None
    if old is not None and Path(str(old.get("data_root") or "")).resolve() != src.data_root.resolve():
        raise StoreError(f"{out} already holds a shard store of {old.get('data_root')}; export {src.data_root} into "
                         f"an empty folder (or delete {out} first)")
    _, known = collect_entries(out)  # complete shards only; an interrupted writer's temp file is ignored
    res = ExportResult(out=out)
    lossy, legacy = _write_shards(src, out, known, res, shard_size, prefix, fsync, codec)
    _write_shard_manifest(src, out, known, res, old, codec, lossy, legacy)
    return res


def _write_shards(src: Source, out: Path, known: dict[str, list[Any]], res: ExportResult, shard_size: int,
                  prefix: str, fsync: bool, codec: str) -> tuple[dict[str, dict[str, Any]], int]:
    """Encode and append every record of ``src`` not yet in ``out``; returns (worst lossy bounds, legacy count)."""
    done = {e.key for es in known.values() for e in es}
    first_n = max((p[2] for p in map(parse_shard_name, known) if p), default=-1) + 1
    lossy: dict[str, dict[str, Any]] = {}
    legacy = 0
    with ShardWriter(out / SHARDS_DIR, prefix, 0, first_n, shard_size, fsync=fsync, post=res.closed.append) as writer:
        for key in src.keys:
            if key in done:
                res.unchanged += 1
                continue
            try:
                rec = src.read(key)
            except (FeatstoreError, OSError) as err:
                res.failed.append((key, str(err)))
                log.error("cannot read the record of %r: %s", key, err)
                continue
            rec.key = key  # the file's location is the truth (older scripts stored absolute paths)
            legacy += bool(rec.meta.get("legacy"))
            worst_bounds(lossy, rec.meta.get("lossy") or {})
            writer.write(key, encode_record(rec, codec=codec))
            res.written += 1
    known.update((s.info.name, s.entries) for s in res.closed)
    return lossy, legacy


def worst_bounds(into: dict[str, dict[str, Any]], bounds: dict[str, dict[str, Any]]) -> None:
    """Fold per-tensor error bounds into the worst seen so far (the manifest's ``lossy``)."""
    for name, b in bounds.items():
        cur = into.setdefault(name, {"codec": b.get("codec"), "rel_l2": 0.0, "max_abs": 0.0})
        cur["rel_l2"] = max(cur["rel_l2"], float(b.get("rel_l2", 0.0)))
        cur["max_abs"] = max(cur["max_abs"], float(b.get("max_abs", 0.0)))


def _write_shard_manifest(src: Source, out: Path, known: dict[str, list[Any]], res: ExportResult,
                          old: dict[str, Any] | None, codec: str, lossy: dict[str, dict[str, Any]],
                          legacy: int) -> None:
    """Write the index and the manifest of the exported store (settings from the source's manifest, what an
    older script's caches cannot tell listed in ``provenance_unknown``)."""
    store = parse_location(out)
    base = src.manifest or {}
    checksums = [asdict(s.info) for s in res.closed] + list((old or {}).get("shards", []))
    final = finalize_shard_store(store, known, sample_context=(base.get("context") or {}).get("mode") in SAMPLE_CONTEXTS,
                                 checksums=checksums)
    m = Manifest.new(layout="shards", data_root=str(src.data_root), model_path="")
    m.use_settings(BuildSettings.of(base))
    m.vggt_model_path = str(base.get("vggt_model_path", "unknown"))
    only = next(iter(final.dtypes)) if len(final.dtypes) == 1 else None
    m.dtype = m.dtype or only
    if not m.tensors and only:
        m.tensors = {"features": {"layer": None, "dtype": only}}
    m.tensors = {name: dict(t, codec=codec) if isinstance(t, dict) else t for name, t in m.tensors.items()}
    worst_bounds(lossy, (old or {}).get("lossy") or {})
    m.provenance_unknown = list(base.get("provenance_unknown") or [])
    if legacy or (old and old.get("provenance_unknown")):
        m.provenance_unknown += [u for u in LEGACY_UNKNOWN if u not in m.provenance_unknown]
    m.total_images, m.processed_images = max(int(base.get("total_images") or 0), final.records), final.records
    m.sources, m.feature_shapes, m.codec, m.lossy = base.get("sources"), final.feature_shapes, codec, lossy or None
    m.counts.update(records=final.records, failed=len(res.failed))
    m.shards, m.index = final.shards, final.index
    m.complete = res.ok and m.is_complete()
    m.times = {"started": None, "finished": time.time(), "seconds": None}
    if legacy:
        log.warning("%d of %d caches have no featstore metadata (older scripts); the manifest lists what is "
                    "unknown about their provenance", legacy, final.records)
    write_manifest(out / SHARD_MANIFEST, m)
    for name in final.superseded:
        (out / SHARDS_DIR / name).unlink()
