"""``build_bench.py --model null --json``: the null-model pipeline benchmark runs end to end and reports its
CPU budget per image with the figures issue 18 names."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

KEYS = ("main_thread_cpu_ms_per_image", "decode_cpu_ms_per_image", "encode_cpu_ms_per_image", "e2e_images_per_s",
        "decode_only_images_per_s", "capacity_images_per_s", "e2e_over_capacity")


@pytest.mark.slow  # a benchmark process with a decode worker (about 5-8 s)
def test_build_bench_null_model_json(tmp_path):
    out = tmp_path / "null.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "build_bench.py"), "--model", "null",
                           "--n", "8", "--size", "150x150", "--image-size", "140", "--batch-size", "4", "--workers", "1",
                           "--out-dir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert all(res[k] > 0 for k in KEYS), {k: res[k] for k in KEYS}
    assert res["images"] == 8 and res["cores"] >= 1
    per = [res[k] for k in ("main_thread_cpu_ms_per_image", "decode_cpu_ms_per_image", "encode_cpu_ms_per_image",
                            "write_cpu_ms_per_image", "other_cpu_ms_per_image")]
    assert res["total_cpu_ms_per_image"] == pytest.approx(sum(per))
    assert res["capacity_images_per_s"] == pytest.approx(res["cores"] * 1e3 / res["total_cpu_ms_per_image"])
    assert res["e2e_over_capacity"] == pytest.approx(res["e2e_images_per_s"] / res["capacity_images_per_s"])
    assert res["encode_record_ms"]["zstd"] > 0 and 0 < res["encode_record_ms"]["stored_ratio"] < 1
    assert set(res["targets"]) == {"main_thread_cpu_ms_per_image", "e2e_over_capacity"}
    probes = res["gil_probe_late_ms"]
    assert set(probes) == {"in_process", "own_process"} and all(0 <= p["p50"] <= p["p99"] <= p["max"] for p in probes.values())
    assert "CPU budget per image" in proc.stdout and "where the cores'" in proc.stdout
