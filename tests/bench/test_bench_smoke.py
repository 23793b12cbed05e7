"""The loader, codec and scale benchmarks run end to end in their --quick smoke modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO_ROOT


def run_bench(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # a benchmark process (about 7 s)
def test_loader_bench_quick(tmp_path):
    out = tmp_path / "loader.json"
    run_bench("loader_bench.py", "--json", str(out))
    res = json.loads(out.read_text())
    for section in ("random_access", "dataloader", "cold", "zstd_vs_bare"):
        assert all(r["records_per_s"] > 0 and r["ratio"] > 0 for r in res[section].values()), section
    assert set(res["random_access"]) == {"per-image torch.load", "open_store zstd", "open_store raw", "open_store int8"}
    assert "stream int8 dequantize=False" in res["dataloader"] and res["dequantize_ms_per_record"] > 0
    assert res["bytes_per_record"]["int8"] < res["bytes_per_record"]["zstd"] < res["bytes_per_record"]["raw"]
    import importlib.util  # every target the bench names, each measured in this run

    spec = importlib.util.spec_from_file_location("loader_bench", REPO_ROOT / "benchmarks" / "loader_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(res["targets"]) == {t[0] for t in bench.TARGETS}
    assert all(t["ratio"] > 0 and "met" in t for t in res["targets"].values())


@pytest.mark.slow  # a benchmark process (about 5 s)
def test_codec_bench_quick(tmp_path, golden_dir):
    out = tmp_path / "codec.json"
    run_bench("codec_bench.py", "--golden", str(golden_dir), "--json", str(out))
    res = json.loads(out.read_text())
    plain, outliers = res["errors"]["golden tiny"], res["errors"]["golden tiny + outlier channels"]
    assert plain["featstore int8 (shipped)"]["rel_l2"] <= 0.01
    # the measurement behind the shipped scheme: a per-token scale shared with outliers loses ordinary channels
    shared, ours = outliers["int8 per-token"], outliers["int8 per-channel x per-token"]
    assert shared["rel_l2_ordinary"] > 5 * ours["rel_l2_ordinary"]
    assert res["speed"]["featstore zstd (decode_record)"]["decode_ms"] > 0


@pytest.mark.slow
def test_scale_bench_quick(tmp_path):
    proc = run_bench("scale_bench.py", "--work", str(tmp_path / "scale"), timeout=600)
    assert "stream: each of 2 DataLoader workers peaks" in proc.stdout
