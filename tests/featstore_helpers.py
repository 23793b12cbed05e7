"""Helpers for verify/export/loader tests: copy the sample images and build real stores with the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from featstore.cli.main import main

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO_ROOT / "examples" / "sample"


SAMPLE_FILES = ("*.jpg", "*.png", "train.jsonl", "annotations.json")


def copy_sample(dst: Path, src: Path = SAMPLE, patterns: tuple[str, ...] = SAMPLE_FILES) -> Path:
    """Copy the sample data set's own files (images, annotations) to ``dst``, and nothing a user's run of the
    README may have written there (stores, caches, manifests, ledgers): tests never depend on the checkout."""
    for pattern in patterns:
        for p in src.rglob(pattern):
            rel = p.relative_to(src)
            if p.is_file() and "vggt_featstore" not in rel.parts:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst / rel)
    return dst


def copy_images(dst: Path, drop: int = 0) -> Path:
    """Copy the sample images (no store, no annotations) to ``dst``; optionally drop the last ``drop`` images."""
    copy_sample(dst, patterns=("*.jpg", "*.png"))
    if drop:
        for p in sorted(dst.rglob("*.*"))[-drop:]:
            p.unlink()
    return dst


def build(data_root: Path, *args: str) -> None:
    """Run `featstore build` with the tiny model on CPU; fails the test on a non-zero exit."""
    rc = main(["build", "--data-root", str(data_root), "--model", "tiny", "--device", "cpu", "--no-progress",
               "--num-workers", "0", "--writer-threads", "1", "--no-fsync", *args])
    assert rc == 0, f"build failed with {rc}"


def run_verify(path: Path, tmp: Path, *args: str) -> tuple[int, dict]:
    """Run `featstore verify --json`; returns (exit code, report)."""
    report = tmp / f"report-{len(list(tmp.glob('report-*')))}.json"
    rc = main(["verify", str(path), "--json", str(report), "--no-progress", *args])
    return rc, json.loads(report.read_text())


def problem_keys(report: dict, kind: str) -> set[str]:
    """Keys named by problems of one kind."""
    return {p["key"] for p in report["problems"] if p["kind"] == kind}
