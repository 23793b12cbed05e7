"""Shared test fixtures: where the golden reference data lives, and the slow-test switch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_golden() -> Path | None:
    env = os.environ.get("FEATSTORE_GOLDEN")
    candidates = [Path(env)] if env else []
    candidates += [REPO_ROOT / "shared" / "golden", REPO_ROOT.parent / "shared" / "golden"]
    for c in candidates:
        if (c / "README.md").is_file():
            return c
    return None


GOLDEN_DIR = _find_golden()


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """The golden reference folder (../shared/golden beside the checkout, or $FEATSTORE_GOLDEN)."""
    if GOLDEN_DIR is None:
        pytest.fail("golden reference data not found: expected ../shared/golden beside the checkout "
                    "or FEATSTORE_GOLDEN=/path/to/golden")
    return GOLDEN_DIR


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
