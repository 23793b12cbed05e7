"""benchmarks/gpu_bench.py --smoke runs every part (model, fp8, build, null, context, build-ctx, joint) on CPU and
prints issue 18's targets from their outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # seven benchmark processes (about 2 min, 48 s of CPU, on the shared 2-core machine)
def test_gpu_bench_smoke_runs_every_part(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_bench.py"), "--smoke"],
                          capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = proc.stdout
    for name in ("model", "fp8", "build", "null", "context", "build-ctx", "joint"):
        assert f"{name}: exit 0" in out, name
    assert "compiled vs eager features" in out and "target 2, model-only compiled" in out
    assert "target 4, fp8 (emulate)" in out and "rel L2 / max abs layer 0" in out
    assert "target 3, JanusVLN's way" in out and "build end to end" in out and "(>= 8x)" in out
    assert "joint (12-frame episodes): batched B=4" in out
