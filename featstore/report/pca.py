"""Patch tokens as colours: the first three principal components of the tokens, fitted jointly over the records
shown (so one colour means one direction in feature space on every map), mapped to RGB on the record's grid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

COMPONENTS = 3
MAX_FIT_ROWS = 20_000  # tokens the fit uses at most (evenly strided over all shown maps)
ITERATIONS = 8
LOW_PCT, HIGH_PCT = 1.0, 99.0  # each component's range maps to 0..1 between these percentiles (clipped)


@dataclass(frozen=True)
class Basis:
    """A fitted projection: the mean token, ``components`` [k, C] and each component's [lo, hi] range."""

    mean: np.ndarray
    components: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def token_maps(features: Any, grid: tuple[int, int]) -> np.ndarray:
    """A features tensor ``[S, P, C]`` (or ``[P, C]``) as ``S`` maps ``[S, h, w, C]`` (float32) on ``grid`` (h, w).

    With more tokens than the grid has cells (camera and register tokens stored too), the patch tokens are the
    last ``h * w``; ValueError when there are fewer.
    """
    x = np.asarray(features.float().numpy() if hasattr(features, "float") else features, dtype=np.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"features of shape {list(x.shape)}: expected [S, P, C]")
    h, w = grid
    if x.shape[1] < h * w:
        raise ValueError(f"{x.shape[1]} tokens cannot fill a {h}x{w} grid")
    return x[:, x.shape[1] - h * w:, :].reshape(x.shape[0], h, w, x.shape[2])


def infer_grid(tokens: int, aspect: float) -> tuple[int, int]:
    """The (h, w) with ``h * w == tokens`` whose w/h is nearest ``aspect`` (for records that do not say)."""
    pairs = [(h, tokens // h) for h in range(1, tokens + 1) if tokens % h == 0]
    return min(pairs, key=lambda p: abs(math.log(p[1] / p[0]) - math.log(aspect)))


def _fit_rows(maps: Sequence[np.ndarray], max_rows: int) -> np.ndarray:
    rows = np.concatenate([m.reshape(-1, m.shape[-1]) for m in maps]).astype(np.float64)
    rows = rows[np.isfinite(rows).all(axis=1)]
    if len(rows) > max_rows:
        rows = rows[np.linspace(0, len(rows) - 1, max_rows).astype(np.int64)]
    return rows


def _top_directions(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The top-``k`` right singular vectors of the centred ``x`` [N, C] (subspace iteration), rows [k, C]."""
    rank = min(x.shape[1], x.shape[0], k + 5)
    q = np.random.default_rng(seed).standard_normal((x.shape[1], rank))
    for _ in range(ITERATIONS):
        q, _ = np.linalg.qr(x.T @ (x @ q))
    _, _, vt = np.linalg.svd(x @ q, full_matrices=False)
    comps = (q @ vt.T).T[:k]
    if len(comps) < k:  # fewer tokens or channels than components: the missing ones project to nothing
        comps = np.vstack([comps, np.zeros((k - len(comps), x.shape[1]))])
    # A component's sign is arbitrary: make its largest loading positive, so colours are repeatable.
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(axis=1)])
    return comps * np.where(signs == 0, 1.0, signs)[:, None]


def fit_basis(maps: Sequence[np.ndarray], k: int = COMPONENTS, max_rows: int = MAX_FIT_ROWS, seed: int = 0
              ) -> Basis:
    """Fit the projection on every token of ``maps`` (arrays ``[..., C]``) together; ValueError without tokens."""
    rows = _fit_rows(maps, max_rows)
    if not len(rows):
        raise ValueError("no finite tokens to fit the colour map on")
    mean = rows.mean(axis=0)
    comps = _top_directions(rows - mean, k, seed)
    proj = (rows - mean) @ comps.T
    lo, hi = np.percentile(proj, LOW_PCT, axis=0), np.percentile(proj, HIGH_PCT, axis=0)
    return Basis(mean, comps, lo, hi)


def to_rgb(tokens: np.ndarray, basis: Basis) -> np.ndarray:
    """Tokens ``[..., C]`` as uint8 colours ``[..., 3]``: each component scaled from its range to 0..255
    (a component without spread is mid-grey; non-finite tokens are black)."""
    flat = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    finite = np.isfinite(flat).all(axis=1)
    proj = (np.where(finite[:, None], flat, 0.0) - basis.mean) @ basis.components.T
    span = basis.hi - basis.lo
    spread = span > 1e-9 * max(float(span.max()), 1e-30)  # float noise in a direction the tokens do not vary in
    scaled = np.where(spread, (proj - basis.lo) / np.where(spread, span, 1.0), 0.5)
    rgb = np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
    rgb[~finite] = 0
    return rgb.reshape(*tokens.shape[:-1], basis.components.shape[0])
