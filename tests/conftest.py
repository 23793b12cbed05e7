"""Shared test fixtures: where the golden reference data lives, and the slow-test switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


#: The golden reference data the tests read, in the repository (see tests/golden/README.md).
GOLDEN_IN_REPO = REPO_ROOT / "tests" / "golden"


def _materialize_golden(src: Path, dst: Path) -> Path:
    """A folder laid out as the golden data: `*.zst` files decompressed (zstd keeps the checkout small), the rest
    linked. A file that should be there and is not surfaces as a FileNotFoundError naming its path."""
    import zstandard

    for f in sorted(src.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(src)
        out = dst / (rel.with_suffix("") if f.suffix == ".zst" else rel)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".zst":
            with open(f, "rb") as fin, open(out, "wb") as fout:
                zstandard.ZstdDecompressor().copy_stream(fin, fout)
        else:
            out.symlink_to(f)
    return dst


@pytest.fixture(scope="session")
def golden_dir(tmp_path_factory) -> Path:
    """The golden reference folder: $FEATSTORE_GOLDEN when set (an uncompressed copy, e.g. ../shared/golden),
    else the repository's tests/golden, decompressed once per session."""
    env = os.environ.get("FEATSTORE_GOLDEN")
    if env:
        if not (Path(env) / "README.md").is_file():
            pytest.fail(f"FEATSTORE_GOLDEN={env!r} is not a golden reference folder (no README.md there): "
                        f"unset it to use {GOLDEN_IN_REPO}")
        return Path(env)
    if not (GOLDEN_IN_REPO / "README.md").is_file():
        pytest.fail(f"golden reference data not found at {GOLDEN_IN_REPO}: the checkout is incomplete")
    return _materialize_golden(GOLDEN_IN_REPO, tmp_path_factory.mktemp("golden"))


@pytest.fixture
def one_thread():
    """torch on one CPU thread for the test, as the golden reference files were made (their README: 2 threads
    give the same bits; BLAS may not on another machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Skip @pytest.mark.slow tests unless FEATSTORE_RUN_SLOW=1, CI=true (CI runs them) or `-m slow`."""
    if (os.environ.get("FEATSTORE_RUN_SLOW") == "1" or os.environ.get("CI", "").lower() == "true"
            or "slow" in (config.getoption("-m") or "")):
        return
    skip = pytest.mark.skip(reason="slow: set FEATSTORE_RUN_SLOW=1 (CI=true does too) or run `pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_model():
    """The built-in tiny VGGT (golden rule weights)."""
    from featstore.model import load_vggt

    return load_vggt("tiny")


@pytest.fixture(scope="module")
def stream_data(golden_dir):
    """Golden tiny_stream: float inputs [1, 4, 3, H, W], JanusVLN's per-frame stream outputs, its causal outputs."""
    import torch
    from safetensors.torch import load_file

    d = golden_dir / "tiny_stream"
    images = load_file(str(d / "inputs.safetensors"))["images_u8"].to(torch.float32) / 255
    return images, load_file(str(d / "stream_outputs.safetensors")), load_file(str(d / "causal_outputs.safetensors"))
