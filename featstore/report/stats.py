"""The numbers the report plots: per-record token norms and non-finite fraction, per-channel moments over the
records read, and the error bounds lossy records store."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class RecordStats:
    """One record's token statistics: the L2 norm of each finite token (mean and max over tokens) and the
    fraction of its values that are NaN or Inf."""

    key: str
    tokens: int
    norm_mean: float
    norm_max: float
    nonfinite_fraction: float


def as_tokens(features: Any) -> np.ndarray:
    """A features tensor (torch or numpy, ``[..., C]``) as float64 tokens ``[N, C]``."""
    x = features.float().numpy() if hasattr(features, "float") and not isinstance(features, np.ndarray) else features
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, x.shape[-1])


def record_stats(key: str, features: Any) -> RecordStats:
    """The statistics of one record's features (norms over tokens whose values are all finite; NaN when none)."""
    x = as_tokens(features)
    finite = np.isfinite(x)
    whole = finite.all(axis=1)
    norms = np.sqrt((x[whole] ** 2).sum(axis=1))
    mean, peak = (float(norms.mean()), float(norms.max())) if len(norms) else (float("nan"), float("nan"))
    return RecordStats(key, len(x), mean, peak, float((~finite).sum()) / max(x.size, 1))


@dataclass
class ChannelMoments:
    """Per-channel count, sum and sum of squares of the finite values of every record added (float64)."""

    count: np.ndarray | None = None
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    shapes_skipped: int = field(default=0)

    def add(self, features: Any) -> bool:
        """Add a record's tokens; False (and counted in ``shapes_skipped``) when its channel count differs from the
        first record's."""
        x = as_tokens(features)
        if self.count is None:
            c = x.shape[1]
            self.count, self.total, self.squares = np.zeros(c), np.zeros(c), np.zeros(c)
        if x.shape[1] != len(self.count):
            self.shapes_skipped += 1
            return False
        finite = np.isfinite(x)
        x = np.where(finite, x, 0.0)
        self.count += finite.sum(axis=0)
        self.total += x.sum(axis=0)
        self.squares += (x ** 2).sum(axis=0)
        return True

    def mean(self) -> np.ndarray:
        """Each channel's mean over every token added."""
        assert self.count is not None and self.total is not None
        return self.total / np.maximum(self.count, 1)

    def std(self) -> np.ndarray:
        """Each channel's (population) standard deviation over every token added."""
        assert self.count is not None and self.squares is not None
        m = self.mean()
        return np.sqrt(np.maximum(self.squares / np.maximum(self.count, 1) - m ** 2, 0.0))


@dataclass(frozen=True)
class CodecBound:
    """The error bound one lossy record stores for its features: codec, relative L2 and max abs error."""

    key: str
    codec: str
    rel_l2: float
    max_abs: float


def codec_bound(key: str, bounds: Mapping[str, Mapping[str, Any]], name: str = "features") -> CodecBound | None:
    """The bound of tensor ``name`` among a record's ``bounds`` (``Record.bounds``), or None for a lossless one."""
    b = bounds.get(name)
    if not b:
        return None
    return CodecBound(key, str(b.get("codec", "?")), float(b["rel_l2"]), float(b["max_abs"]))


def summary(values: list[float]) -> dict[str, float]:
    """min, median, mean and max of the finite ``values`` (empty when there are none)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return {}
    return {"min": float(v.min()), "median": float(np.median(v)), "mean": float(v.mean()), "max": float(v.max())}
