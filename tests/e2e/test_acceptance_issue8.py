"""Issue 8's acceptance scenario, end to end with the real CLI: a JanusVLN-style data root whose annotation
files live in subfolders (one resolving its images through data_path), with unreferenced images elsewhere."""

from __future__ import annotations

import pytest

import json
import time
from pathlib import Path

from featstore.formats.index import Index
from helpers import build_args, make_images, run_cli, run_inproc, write_jsonl


def janusvln_root(root: Path) -> list[str]:
    """R2R/annotations.json and seed/train.jsonl name 8 images; 6 more images are named by nothing."""
    r2r = make_images(root / "R2R", 6)                      # ep0/frame.000..003, ep1/frame.000..001
    (root / "R2R" / "annotations.json").write_text(json.dumps([
        {"id": "r2r_0", "images": [f"R2R/{k}" for k in r2r[:4]], "conversations": []},
        {"id": "r2r_1", "image": f"R2R/{r2r[4]}"}]))
    seed = make_images(root / "seed" / "frames", 3, prefix="traj")
    write_jsonl(root / "seed" / "train.jsonl", [
        {"id": "s0", "data_path": "seed/frames", "history_images": seed[:2], "current_image": seed[2]}])
    make_images(root / "unused", 5, prefix="other")
    return sorted([f"R2R/{k}" for k in r2r[:5]] + [f"seed/frames/{k}" for k in seed])


def caches(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root))[: -len(".vggt_cache.pt")]: p.stat().st_mtime_ns
            for p in root.rglob("*.vggt_cache.pt")}


@pytest.mark.slow
def test_issue8_acceptance(tmp_path):
    root = tmp_path / "train"
    wanted = janusvln_root(root)
    assert len(wanted) == 8

    r = run_inproc(*build_args(root, "--format", "per-image"))
    assert r.returncode == 0, r.stderr
    assert "R2R/annotations.json: 2 records, 5 images" in r.stderr
    assert "seed/train.jsonl: 1 records, 3 images" in r.stderr
    first = caches(root)
    assert sorted(first) == wanted

    started = time.monotonic()
    r = run_cli(*build_args(root, "--format", "per-image"))  # a real process, as a user re-runs it
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert "processed 0, skipped 8" in r.stderr and "model not loaded" in r.stderr, r.stderr
    assert caches(root) == first, "a re-run rebuilt something"
    assert took < 20, f"re-run took {took:.1f} s"

    store = tmp_path / "elsewhere" / "store"
    r = run_inproc(*build_args(root, "--out", str(store)))
    assert r.returncode == 0, r.stderr
    assert sorted(Index(store / "index.fsi").keys()) == wanted

    for target in (root, store):
        r = run_inproc("verify", str(target))
        assert r.returncode == 0, r.stdout + r.stderr
        assert "OK: every check passed" in r.stdout
