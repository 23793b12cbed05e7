"""Tests never depend on the state of the checkout: following the README (which builds and exports into
examples/sample/) must not change what any test sees."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from helpers import REPO_ROOT, SAMPLE, build, copy_sample


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_sample_copy_ignores_what_the_readme_commands_write(tmp_path):
    pristine = _files(copy_sample(tmp_path / "pristine"))
    assert len([f for f in pristine if f.endswith((".jpg", ".png"))]) == 12
    assert "train.jsonl" in pristine and "annotations.json" in pristine
    # A checkout after the README's commands: a shard store, per-image caches, manifests and ledgers.
    dirty = copy_sample(tmp_path / "dirty")
    build(dirty, "--format", "per-image")
    shutil.copytree(tmp_path / "pristine", dirty / "vggt_featstore" / "shards")  # what a shard build leaves
    (dirty / "vggt_featstore" / "manifest.json").write_text("{}")
    assert (dirty / "vggt_cache_manifest.json").is_file() and (dirty / "vggt_cache_failures.jsonl").is_file()
    assert any(f.endswith(".vggt_cache.pt") for f in _files(dirty))
    assert _files(copy_sample(tmp_path / "again", src=dirty)) == pristine


def test_no_test_reads_the_sample_folder_directly():
    """Only tests/helpers.py names examples/sample; every test copies from it to tmp_path."""
    pattern = re.compile(r"examples[\"'/ ,]+[\"']?sample|SAMPLE\b")
    offenders = [p.name for p in (REPO_ROOT / "tests").rglob("*.py")
                 if p.name not in ("helpers.py", Path(__file__).name) and pattern.search(p.read_text())]
    assert offenders == []
    assert SAMPLE.is_dir()
