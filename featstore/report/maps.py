"""The feature-map section's content: for each shown record, its frame(s) as the model saw them and the colour
map of its patch tokens on the record's grid (one PCA basis for all shown records)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from featstore.formats.keys import image_path_of
from featstore.formats.record import Record
from featstore.report.figures import image_png
from featstore.report.pca import fit_basis, infer_grid, to_rgb, token_maps

FRAME_WIDTH = 320  # pixels of an embedded frame (the page shows it at this width or less)
MAP_WIDTH = 256  # a colour map is enlarged by whole blocks to about this width


@dataclass
class Tile:
    """One frame of a record: its picture (or why there is none) and, when the record stores one for it, its
    token map (PNG, filled in once the joint basis is fitted)."""

    frame: str
    frame_png: bytes | None = None
    frame_note: str = ""
    kept: bool = False
    map_index: int | None = None  # which of the record's maps belongs to this frame
    map_png: bytes | None = None


@dataclass
class RecordView:
    """A shown record: its kind (``image``, ``sample`` or ``joint``), grid and frames."""

    key: str
    kind: str
    grid: tuple[int, int]
    tiles: list[Tile]
    maps: np.ndarray = field(repr=False)  # [S, h, w, C]
    note: str = ""


def _frame_picture(path: str, pre: dict[str, Any]) -> tuple[bytes | None, str, tuple[int, int] | None]:
    """A frame preprocessed as the build did (PNG), a note when it cannot be shown, and its (h, w)."""
    from featstore.model.preprocess import preprocess_image

    if not os.path.isfile(path):
        return None, f"source image not found at {path}", None
    mode = pre.get("mode")
    try:
        if mode:
            t = preprocess_image(path, mode, apply_exif=bool(pre.get("apply_exif")),
                                 image_size=int(pre.get("target_size") or 518))
            rgb = np.round(t.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
        else:  # preprocessing not recorded (legacy caches): the image as it is
            from PIL import Image

            with Image.open(path) as img:
                rgb = np.asarray(img.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - an unreadable frame is shown as a note, never fatal
        return None, f"cannot read {path}: {e}", None
    return image_png(rgb, max_width=FRAME_WIDTH), "", (rgb.shape[0], rgb.shape[1])


def record_grid(rec: Record, tokens: int, patch: int, frame_hw: tuple[int, int] | None) -> tuple[tuple[int, int], str]:
    """The record's token grid (h, w): recorded (``grid``, or ``image_size`` / patch), else inferred from the
    token count and the frame's aspect ratio (with a note saying so)."""
    meta = rec.meta
    if isinstance(meta.get("grid"), list) and len(meta["grid"]) == 2:
        return (int(meta["grid"][0]), int(meta["grid"][1])), ""
    if isinstance(meta.get("image_size"), list) and len(meta["image_size"]) == 2:
        return (int(meta["image_size"][0]) // patch, int(meta["image_size"][1]) // patch), ""
    aspect = frame_hw[1] / frame_hw[0] if frame_hw else 1.0
    return infer_grid(tokens, aspect), "grid not recorded: inferred from the token count and the image's shape"


def _frames_of(rec: Record, maps: int) -> tuple[str, list[str], int | None]:
    """(kind, frame keys, kept frame index) of a record whose features hold ``maps`` per-frame maps."""
    frames = rec.meta.get("frames")
    if isinstance(frames, list) and frames:
        if maps > 1 and maps == len(frames):
            return "joint", [str(f) for f in frames], None
        kept = rec.meta.get("kept")
        return "sample", [str(f) for f in frames], int(kept) if isinstance(kept, int) else len(frames) - 1
    return "image", [rec.key], 0


def record_view(rec: Record, data_root: str | None, pre: dict[str, Any], patch: int) -> RecordView:
    """The view of one record (frames and maps; colours come later, from the joint basis)."""
    feats = rec.features
    stack = feats if feats.dim() == 3 else feats.reshape(1, -1, feats.shape[-1])
    kind, frames, kept = _frames_of(rec, int(stack.shape[0]))
    tiles, first_hw = [], None
    for i, frame in enumerate(frames):
        path = image_path_of(frame, data_root) if data_root else (rec.path if kind == "image" else frame)
        if kind == "image" and not os.path.isfile(path) and os.path.isfile(rec.path):
            path = rec.path
        png, note, hw = _frame_picture(path, pre)
        first_hw = first_hw or hw
        idx = i if kind == "joint" else (0 if i == kept else None)
        tiles.append(Tile(frame, png, note, kept=(kind == "sample" and i == kept), map_index=idx))
    grid, note = record_grid(rec, int(stack.shape[1]), patch, first_hw)
    return RecordView(rec.key, kind, grid, tiles, token_maps(stack, grid), note)


def colour_views(views: list[RecordView], seed: int = 0) -> None:
    """Fit one basis on every shown map and fill in each tile's colour map."""
    if not views:
        return
    basis = fit_basis([v.maps for v in views], seed=seed)
    for v in views:
        rgb = to_rgb(v.maps, basis)
        scale = max(1, math.ceil(MAP_WIDTH / v.grid[1]))
        for t in v.tiles:
            if t.map_index is not None:
                t.map_png = image_png(rgb[t.map_index], scale=scale)
