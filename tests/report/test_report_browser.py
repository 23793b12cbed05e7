"""The report in a real browser: headless Chromium renders it from a file:// URL; each section is in the DOM
and every figure has non-uniform pixels in the screenshot (its path is printed for a person to look at)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featstore.report.browser import find_chromium, image_boxes, screenshot
from featstore.report.page import SECTION_IDS
from helpers import run_inproc
from helpers import build, copy_sample

CHROMIUM = find_chromium()


@pytest.mark.slow  # two builds, a report and three browser runs: about 20 s
@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install -y chromium; "
                                             ".ci/run installs it)")
def test_report_renders_in_headless_chromium(tmp_path):
    data = copy_sample(tmp_path / "data")
    build(data, "--context", "sample", "--codec", "int8")
    page = tmp_path / "report.html"
    r = run_inproc("report", str(data / "vggt_featstore"), "-o", str(page), "--samples", "3")
    assert r.returncode == 0, r.stderr
    png = tmp_path / "report.png"
    dom = screenshot(page, png, CHROMIUM)
    print(f"report screenshot: {png}")
    for sid in SECTION_IDS:
        assert f'<section id="{sid}">' in dom, f"section {sid} not in the rendered DOM"
    shot = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)
    assert shot.shape[0] > 2000 and shot.reshape(-1, 3).std(axis=0).max() > 10  # a long page, not blank
    boxes = image_boxes(dom)
    figures = [(alt, b) for alt, b in boxes if alt.startswith("token map") or "histogram" in alt or "codec" in alt
               or "per-channel" in alt or "records per second" in alt]
    assert len([a for a, _ in figures if a.startswith("token map")]) == 3 and len(figures) >= 7, boxes
    for alt, b in figures:
        assert b.width > 50 and b.height > 50, (alt, b)
        crop = shot[b.y:b.y + b.height, b.x:b.x + b.width]
        assert crop.shape[:2] == (b.height, b.width), f"{alt} lies outside the screenshot"
        assert crop.reshape(-1, 3).std(axis=0).max() > 5, f"figure {alt!r} is uniform in the screenshot"
