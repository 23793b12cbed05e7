"""`featstore build --compile on` (the default `auto` on CUDA) on CPU with inductor: the blocks compile once,
the warm-up is logged with its seconds, and the stored features equal an eager build's within float32
rounding, per image and per sample."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import featstore
from helpers import build_args, run_cli


def _episode(root, n: int = 8) -> None:
    """`n` real PNG frames of one size in one episode folder (a sample's frames must share a size)."""
    rng = np.random.RandomState(0)
    (root / "ep0").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (42, 56, 3), dtype=np.uint8)).save(root / "ep0" / f"frame.{i:03d}.png")


def _features(root, out):
    store = featstore.open_store(out)
    return {k: store.features_of(k) for k in store.keys()}


@pytest.mark.slow  # inductor compiles C++ kernels on CPU (a minute or more on 2 cores, cold cache)
@pytest.mark.parametrize("context", ["image", "sample"])
def test_compiled_build_equals_eager_build(tmp_path, context):
    root = tmp_path / "data"
    _episode(root)
    extra = ["--image-size", "112", *(["--context", "sample", "--history", "3"] if context == "sample" else [])]
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    eager = run_cli(*build_args(root, "--out", str(tmp_path / "eager"), *extra), env=env)
    assert eager.returncode == 0, eager.stderr
    assert "compile: off (auto: off on cpu)" in eager.stderr
    compiled = run_cli(*build_args(root, "--out", str(tmp_path / "compiled"), "--compile", *extra), env=env,
                       timeout=900)
    assert compiled.returncode == 0, compiled.stderr
    line = next(ln for ln in compiled.stderr.splitlines() if "compile: on" in ln)
    assert "compile: on (--compile on): 6 blocks, backend inductor" in line and "warm-up" in line
    assert str(tmp_path / "inductor") in line
    ref, got = _features(root, tmp_path / "eager"), _features(root, tmp_path / "compiled")
    assert ref.keys() == got.keys() and len(ref) == 8
    for k in ref:
        # measured: max abs <= 1e-6 (inductor reassociates float32 sums)
        assert (ref[k] - got[k]).abs().max().item() <= 1e-5, k
