"""The report's pictures as PNG bytes: plots drawn with matplotlib (Agg: no display, the same pixels everywhere)
and images (frames, colour maps) written with Pillow; :func:`data_uri` embeds either in the page."""

from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
from PIL import Image

WIDTH_IN, HEIGHT_IN, DPI = 6.4, 3.2, 100
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def data_uri(png: bytes) -> str:
    """A ``data:`` URI of PNG bytes, for an ``<img src>`` that needs no file beside the page."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_png(rgb: np.ndarray, scale: int = 1, max_width: int | None = None) -> bytes:
    """An RGB uint8 array ``[h, w, 3]`` as PNG, enlarged ``scale`` times (nearest: one block per token) or
    shrunk to ``max_width`` pixels wide."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    if max_width and img.width > max_width:
        img = img.resize((max_width, max(1, round(img.height * max_width / img.width))), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_of(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return buf.getvalue()


def histograms(panels: Sequence[tuple[str, Sequence[float], float | None, str]]) -> bytes:
    """Histograms side by side: per panel (x label, values, a reference value to mark or None, its label)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(panels), figsize=(max(WIDTH_IN * len(panels) / 2 + 1, 5.0), HEIGHT_IN),
                             squeeze=False)
    for ax, (label, values, ref, ref_label) in zip(axes[0], panels):
        v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
        ax.hist(v, bins=min(40, max(5, len(v))), color=COLOURS[0], edgecolor="white")
        if ref is not None:
            ax.axvline(ref, color=COLOURS[3], linestyle="--", label=ref_label)
            ax.legend(loc="upper right", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(label, fontsize=9)
        ax.set_ylabel("records")
    return _png_of(fig)


def sorted_channels(mean: np.ndarray, std: np.ndarray) -> bytes:
    """Per-channel mean and std, each sorted, as two curves over the channel rank."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(WIDTH_IN + 1, HEIGHT_IN))
    for ax, values, label, colour in ((axes[0], mean, "channel mean", COLOURS[0]),
                                      (axes[1], std, "channel std", COLOURS[1])):
        ax.plot(np.sort(values), color=colour)
        ax.set_xlabel("channel (sorted by value)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    return _png_of(fig)


def throughput(series: Sequence[tuple[str, np.ndarray]], stages: Sequence[tuple[str, dict[str, float]]]) -> bytes:
    """Records/s over time per run (``series``: label, points [n, 5] as formats.buildstats stores them) beside
    each run's stage split (seconds per stage)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(WIDTH_IN * 1.6, HEIGHT_IN), gridspec_kw={"width_ratios": [3, 2]})
    for i, (label, pts) in enumerate(series):
        if len(pts) >= 2:
            dt = np.diff(pts[:, 0])
            rate = np.diff(pts[:, 1]) / np.where(dt > 0, dt, np.nan)
            left.step(pts[1:, 0], rate, where="pre", color=COLOURS[i % len(COLOURS)], label=label)
    left.set_xlabel("seconds since the run started")
    left.set_ylabel("records/s")
    left.grid(alpha=0.3)
    if series:
        left.legend(fontsize=8)
    names = sorted({k for _, s in stages for k in s})
    bottom = np.zeros(len(stages))
    for j, name in enumerate(names):
        vals = np.asarray([s.get(name, 0.0) for _, s in stages])
        right.bar(range(len(stages)), vals, bottom=bottom, color=COLOURS[j % len(COLOURS)], label=name)
        bottom += vals
    right.set_xticks(range(len(stages)), [label for label, _ in stages], fontsize=8)
    right.set_ylabel("seconds")
    right.legend(fontsize=8)
    return _png_of(fig)
