"""benchmarks/context_bench.py runs end to end in --quick mode and reports what the schedule counts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from featstore.discover.samples import episode_samples
from featstore.build.schedule import frame_passes_per_sample

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # a benchmark process (about 6 s)
def test_context_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "context_bench.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "x JanusVLN" in proc.stdout and "goal >= 1.6x" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert [(r["length"], r["config"]) for r in rows] == [
        (n, c) for n in (12, 20) for c in ("JanusVLN's way (B=1)", "none, batched", "prefix", "tree")]
    for r in rows:
        samples = episode_samples([f"f{i}" for i in range(r["length"])])
        assert r["passes_per_sample"] == frame_passes_per_sample(samples, r["strategy"])
        assert r["samples_per_s"] > 0 and r["peak_cache_frames"] > 0
        assert r["batch"] == (1 if r["config"].startswith("JanusVLN") else 4)
    assert all(r["ratio"] == 1.0 for r in rows if r["batch"] == 1)
