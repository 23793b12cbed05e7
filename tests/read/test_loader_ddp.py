"""Real DDP on CPU: torchrun, 2 gloo ranks x 2 DataLoader workers over a store with an odd number of shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from featstore.read import open_store
from helpers import REPO_ROOT, build, copy_images

pytestmark = pytest.mark.slow  # real torchrun processes with DataLoader workers (about 35 s)


def run_ranks(store: Path, out: Path, seed: int, epoch: int) -> list[list[str]]:
    out.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO_ROOT / "tests" / "ddp_worker.py"), str(store), str(out), str(seed), str(epoch)]
    subprocess.run(cmd, check=True, env=env, timeout=120, cwd=REPO_ROOT, capture_output=True)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in reports:
        assert r["world"] == 2 and len(r["keys"]) == r["len"]
    return [r["keys"] for r in reports]


@pytest.mark.parametrize("shard_size", ["20KB", "2000KB"])  # 11 shards of 1 record; 3 shards (< 4 consumers)
def test_ddp_two_ranks_two_workers_each_key_once(tmp_path, shard_size):
    data = copy_images(tmp_path / "data", drop=1)
    store = tmp_path / "store"
    build(data, "--out", str(store), "--shard-size", shard_size)
    n_shards = len(list((store / "shards").glob("*.tar")))
    assert n_shards % 2 == 1
    keys = open_store(store).keys()
    assert len(keys) == 11

    first = run_ranks(store, tmp_path / "a", seed=7, epoch=2)
    union = first[0] + first[1]
    assert sorted(union) == keys  # every key exactly once across ranks and workers
    assert all(first)  # no rank got nothing
    assert abs(len(first[0]) - len(first[1])) <= 1
    second = run_ranks(store, tmp_path / "b", seed=7, epoch=2)
    assert second == first  # same seed and epoch: same order on each rank
    if shard_size == "20KB":
        other = run_ranks(store, tmp_path / "c", seed=7, epoch=3)
        assert sorted(other[0] + other[1]) == keys and other != first
