"""Checks of one record, as functions from plain data to findings (they run in worker processes).

A record is checked against :class:`Expectations`, the picklable facts taken from the manifest: its tensors'
dtypes and shapes, finite values, provenance (model, layers, preprocessing, tokens) and, when the data root is
at hand, that its source image (or a sample's frames) still exists unchanged.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from featstore.errors import FeatstoreError
from featstore.formats.keys import image_path_of
from featstore.formats.manifest import BuildSettings, shape_key
from featstore.formats.record import Record, decode_record, dtype_name
from featstore.formats.staleness import frames_changed, is_checkable, source_changed
from featstore.verify.fixes import rebuild_records
from featstore.verify.report import INFO_LEGACY_RECORDS, INFO_NO_FINGERPRINT, Finding


@dataclass(frozen=True)
class Expectations:
    """What every record of a store is checked against, and the command that rebuilds its records."""

    dtypes: dict[str, str | None]
    layers: dict[str, int | None]
    shapes: frozenset[str]
    model: str | None
    preprocess: str | None
    tokens: str | None
    context: str
    data_root: str | None  # where the images are now; None when that folder is not found
    rebuild: str

    @classmethod
    def from_manifest(cls, m: dict[str, Any], data_root: str | None, rebuild: str) -> "Expectations":
        """The expectations a manifest sets (its settings read as formats.manifest.BuildSettings, older
        manifests with their historic defaults), with the images looked for under ``data_root``."""
        settings = BuildSettings.of(m)
        tensors = {n: t for n, t in settings.tensors.items() if isinstance(t, dict)}
        return cls(dtypes={n: t.get("dtype") for n, t in tensors.items()},
                   layers={n: t.get("layer") for n, t in tensors.items()},
                   shapes=frozenset((m.get("feature_shapes") or {}).keys()),
                   model=settings.model.get("fingerprint"), preprocess=settings.preprocess.get("mode"),
                   tokens=m.get("tokens"), context=settings.context["mode"],
                   data_root=data_root if data_root and os.path.isdir(data_root) else None, rebuild=rebuild)


def check_record_bytes(key: str, data: bytes, ex: Expectations, fix: str, where: str) -> tuple[list[Finding], Counter]:
    """Decode stored record bytes (checksums included), check that they hold ``key``'s record, then check it."""
    try:
        rec = decode_record(data)
    except FeatstoreError as e:
        return [Finding("corrupt", key, f"{where}: {e}", fix)], Counter()
    if rec.key != key:
        return [Finding("corrupt", key, f"member holds the record of {rec.key!r}", fix)], Counter()
    return check_record(rec, ex, key)


def check_record(rec: Record, ex: Expectations, key: str) -> tuple[list[Finding], Counter]:
    """Every content check of one decoded record, named ``key``: findings and information counters."""
    info: Counter = Counter()
    found = check_tensors(rec, ex, key)
    if rec.meta.get("legacy"):
        info[INFO_LEGACY_RECORDS] += 1
    else:
        found += check_provenance(rec, ex, key)
    if rec.meta.get("context") == "joint" or ex.context == "joint":
        return found + check_joint_record(rec, ex, key), info
    if rec.meta.get("context") == "sample" or ex.context == "sample":
        return found + check_sample_record(rec, ex, key), info
    if ex.data_root is not None:
        source, fingerprinted = check_source_image(rec, ex, key)
        found += source
        if not fingerprinted:
            info[INFO_NO_FINGERPRINT] += 1
    return found, info


def check_tensors(rec: Record, ex: Expectations, key: str) -> list[Finding]:
    """Each tensor has the manifest's dtype and only finite values; the features shape is a known one."""
    out, fix = [], rebuild_records(ex.rebuild)
    for name, t in rec.tensors.items():
        want = ex.dtypes.get(name)
        if want and dtype_name(t.dtype) != want:
            out.append(Finding("layout", key, f"tensor {name!r} is {dtype_name(t.dtype)}, the manifest says {want}", fix))
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            out.append(Finding("nonfinite", key, f"tensor {name!r} has {bad} NaN/Inf values", fix))
    if ex.shapes and shape_key(rec.features.shape) not in ex.shapes:
        out.append(Finding("layout", key, f"features shape {list(rec.features.shape)} is not among the manifest's "
                                          f"{sorted(ex.shapes)}", fix))
    return out


def check_provenance(rec: Record, ex: Expectations, key: str) -> list[Finding]:
    """The record was made by the manifest's model, layers, preprocessing and tokens."""
    meta, fix = rec.meta, rebuild_records(ex.rebuild)
    out = []
    if ex.model and meta.get("model") != ex.model:
        out.append(f"model fingerprint {str(meta.get('model'))[:12]} differs from the manifest's {ex.model[:12]}")
    layers = meta.get("layers")
    if ex.layers and layers is not None and dict(layers) != ex.layers:
        out.append(f"layers {layers} differ from the manifest's {ex.layers}")
    if ex.preprocess and meta.get("preprocess") not in (None, ex.preprocess):
        out.append(f"preprocess {meta.get('preprocess')!r} differs from the manifest's {ex.preprocess!r}")
    if ex.tokens and meta.get("tokens") not in (None, ex.tokens):
        out.append(f"tokens {meta.get('tokens')!r} differ from the manifest's {ex.tokens!r}")
    return [Finding("provenance", key, detail, fix) for detail in out]


def check_source_image(rec: Record, ex: Expectations, key: str) -> tuple[list[Finding], bool]:
    """The record's image exists and is the one it was built from; also whether the record carries the
    fingerprint that makes staleness checkable."""
    assert ex.data_root is not None
    img = image_path_of(rec.key, ex.data_root)
    try:
        st = os.stat(img)
    except OSError:
        return [Finding("orphan", key, f"source image {img} does not exist",
                        "restore the image, or rebuild the store from the current image list")], True
    src = rec.meta.get("source") or {}
    if not is_checkable(src):
        return [], False
    try:
        stale = source_changed(img, src)
    except OSError as e:
        return [Finding("orphan", key, f"source image {img} cannot be read ({e.strerror})",
                        "restore the image or its permissions")], True
    if not stale:
        return [], True
    what = "content (sha256)" if src.get("sha256") else "size or mtime"
    return [Finding("stale", key, f"source image changed after the build: its {what} differs (recorded size "
                                  f"{src.get('size')}, mtime_ns {src.get('mtime_ns')}; now {st.st_size}, "
                                  f"{st.st_mtime_ns})", f"re-run `{ex.rebuild} --rebuild-stale`")], True


def check_sample_record(rec: Record, ex: Expectations, key: str) -> list[Finding]:
    """A sample record's own consistency (frames, kept frame, grid vs tensor) and, with the data root, that its
    frames exist and are unchanged (any changed frame makes the sample stale)."""
    meta, fix = rec.meta, f"re-run `{ex.rebuild} --no-skip-existing`"
    frames, grid, kept = meta.get("frames"), meta.get("grid"), meta.get("kept")
    if not (isinstance(frames, list) and frames and isinstance(kept, int) and 0 <= kept < len(frames)
            and isinstance(grid, list) and len(grid) == 2):
        return [Finding("layout", key, f"sample record has no valid frames/kept/grid (frames {str(frames)[:80]}, "
                                       f"kept {kept}, grid {grid})", fix)]
    tokens = grid[0] * grid[1] + (0 if (ex.tokens or meta.get("tokens")) != "all" else 5)
    out = []
    if rec.features.shape[-2] != tokens:
        out.append(Finding("layout", key, f"features have {rec.features.shape[-2]} tokens, its grid "
                                          f"{grid[0]}x{grid[1]} means {tokens}", fix))
    if ex.data_root is None:
        return out
    return out + check_sample_frames(frames, meta.get("frame_sources") or [], ex, key)


def check_joint_record(rec: Record, ex: Expectations, key: str) -> list[Finding]:
    """A joint record's own consistency (its frame list, grid and frame count against the tensor ``[S, h*w, C]``)
    and, with the data root, that its frames exist and are unchanged."""
    meta, fix = rec.meta, f"re-run `{ex.rebuild} --no-skip-existing`"
    frames, grid = meta.get("frames"), meta.get("grid")
    if not (isinstance(frames, list) and frames and all(isinstance(f, str) for f in frames)
            and isinstance(grid, list) and len(grid) == 2):
        return [Finding("layout", key, f"joint record has no valid frames/grid (frames {str(frames)[:80]}, "
                                       f"grid {grid})", fix)]
    tokens = grid[0] * grid[1] + (0 if (ex.tokens or meta.get("tokens")) != "all" else 5)
    out = []
    for name, t in rec.tensors.items():
        if t.dim() != 3 or t.shape[0] != len(frames) or t.shape[1] != tokens:
            out.append(Finding("layout", key, f"tensor {name!r} is {list(t.shape)}; its {len(frames)} frames and "
                                              f"grid {grid[0]}x{grid[1]} mean [{len(frames)}, {tokens}, C]", fix))
    if ex.data_root is None:
        return out
    return out + check_sample_frames(frames, meta.get("frame_sources") or [], ex, key)


def check_sample_frames(frames: list[str], recorded: list[Any], ex: Expectations, key: str) -> list[Finding]:
    """Every frame of a sample exists and is unchanged since the build."""
    assert ex.data_root is not None
    paths = [image_path_of(f, ex.data_root) for f in frames]
    gone = [p for p in paths if not os.path.isfile(p)]
    if gone:
        return [Finding("orphan", key, f"frame {gone[0]} of the sample does not exist",
                        "restore the frame, or rebuild the store from the current annotations")]
    try:
        if frames_changed(paths, recorded):
            return [Finding("stale", key, "a frame of the sample changed after the build (or the record notes no "
                                          "frames)", f"re-run `{ex.rebuild} --rebuild-stale`")]
    except OSError as e:
        return [Finding("orphan", key, f"a frame of the sample cannot be read ({e.strerror})", "restore the frame")]
    return []
