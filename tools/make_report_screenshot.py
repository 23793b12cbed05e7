"""Make docs/images/report.png, the README's screenshot of `featstore report`: build a sample store of
examples/sample (a copy, in a temporary folder) with the tiny model, write its report, and screenshot the top of
the page with headless Chromium.

    python tools/make_report_screenshot.py [--out docs/images/report.png] [--height 1800] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SAMPLE_FILES = ("*.jpg", "*.png", "train.jsonl", "annotations.json")


def copy_sample(dst: Path) -> Path:
    """The sample data set's own files (no store or cache a user's run may have left there)."""
    src = REPO / "examples" / "sample"
    for pattern in SAMPLE_FILES:
        for p in src.rglob(pattern):
            rel = p.relative_to(src)
            if p.is_file() and "vggt_featstore" not in rel.parts:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst / rel)
    return dst


def make(work: Path, out: Path, height: int) -> Path:
    """Build, report and screenshot in ``work``; returns the screenshot written to ``out``."""
    from featstore.cli import main
    from featstore.report.browser import find_chromium, screenshot

    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("[ERROR] no chromium binary on PATH: apt-get install -y chromium, then re-run")
    data = copy_sample(work / "sample")
    rc = main(["build", "--data-root", str(data), "--model", "tiny", "--device", "cpu", "--no-progress",
               "--num-workers", "0", "--context", "sample", "--codec", "int8"])
    if rc != 0:
        raise SystemExit(f"[ERROR] the sample build failed (exit {rc})")
    page = work / "report.html"
    rc = main(["report", str(data / "vggt_featstore"), "-o", str(page), "--samples", "4"])
    if rc != 0:
        raise SystemExit(f"[ERROR] featstore report failed (exit {rc})")
    out.parent.mkdir(parents=True, exist_ok=True)
    screenshot(page, out, chromium, height=height)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "images" / "report.png", help="the PNG to write")
    p.add_argument("--height", type=int, default=1800, help="pixels of the page's top to capture")
    p.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    args = p.parse_args()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        print(make(args.keep, args.out, args.height))
        return 0
    with tempfile.TemporaryDirectory(prefix="featstore-report-") as work:
        print(make(Path(work), args.out, args.height))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
