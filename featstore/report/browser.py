"""Headless Chromium for looking at a report as a browser renders it (the slow test and
``tools/make_report_screenshot.py``): its DOM after load, and a screenshot of the whole page."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH = 1280
TIMEOUT_S = 120


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) binary on PATH, or None."""
    return next((p for p in map(shutil.which, NAMES) if p), None)


def _run(binary: str, *args: str) -> str:
    with tempfile.TemporaryDirectory(prefix="featstore-chromium-") as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-extensions", "--force-device-scale-factor=1", f"--user-data-dir={profile}", *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{binary} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return done.stdout


@dataclass(frozen=True)
class Box:
    """An element's box on the page, in CSS pixels (the screenshot's pixels at scale factor 1)."""

    x: int
    y: int
    width: int
    height: int


def dump_dom(page: Path, binary: str, width: int = WIDTH, height: int = 2000) -> str:
    """The page's DOM after its load event (scripts run), as Chromium serialises it."""
    return _run(binary, f"--window-size={width},{height}", "--virtual-time-budget=5000", "--dump-dom",
                page.resolve().as_uri())


def page_height(dom: str) -> int:
    """The page's full height, which its layout script records on ``<body data-height>``."""
    m = re.search(r'<body[^>]*data-height="(\d+)"', dom)
    return int(m.group(1)) if m else 2000


def image_boxes(dom: str) -> list[tuple[str, Box]]:
    """(``alt`` text, box) of every image the page's layout script measured, in page order."""
    out = []
    for tag in re.findall(r"<img\b[^>]*>", dom):
        alt, box = re.search(r'alt="([^"]*)"', tag), re.search(r'data-box="(-?\d+),(-?\d+),(\d+),(\d+)"', tag)
        if alt and box:
            out.append((html.unescape(alt.group(1)), Box(*(int(v) for v in box.groups()))))
    return out


def screenshot(page: Path, png: Path, binary: str, width: int = WIDTH, height: int | None = None) -> str:
    """Screenshot ``page`` into ``png`` (the whole page unless ``height`` is given); returns the DOM it measured
    (laid out at the same width)."""
    full = height or page_height(dump_dom(page, binary, width))
    dom = dump_dom(page, binary, width, full)  # measured in the window the screenshot uses
    _run(binary, f"--window-size={width},{full}", "--virtual-time-budget=5000", f"--screenshot={png.resolve()}",
         page.resolve().as_uri())
    return dom
