"""Mid-epoch resume of stream(): state_dict/load_state_dict, exactly once across workers and real torchrun ranks."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from featstore.formats.layout import SHARDS_DIR
from featstore.errors import StoreError
from featstore.formats.record import Record, encode_record
from featstore.formats.shards import ShardWriter
from featstore.read import stream
from featstore.read.plans import buffer_shuffle, round_robin_taken
from featstore.build.merge import merge_shard_store
from tests.featstore_helpers import REPO_ROOT


def make_store(root: Path, n: int, per_shard: int) -> list[str]:
    """A real shard store of ``n`` small records, ``per_shard`` to a shard (the last one shorter)."""
    w = ShardWriter(root / SHARDS_DIR, "vggt", 0, 0, fsync=False)
    keys = []
    for i in range(n):
        key = f"ep{i // 10}/frame_{i:03d}.jpg"
        w.write(key, encode_record(Record(key, key, {"features": torch.full((1, 3, 4), float(i))}), codec="raw"))
        keys.append(key)
        if (i + 1) % per_shard == 0:
            w.close_shard()
    w.close_shard()
    merge_shard_store(root)
    return sorted(keys)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume") / "store"
    return root, make_store(root, 41, 6)


class Counted(torch.utils.data.IterableDataset):
    def __init__(self, counts):
        self.counts = counts

    def __iter__(self):
        w = torch.utils.data.get_worker_info().id
        return iter([w] * self.counts[w])


def test_round_robin_model_matches_torch_dataloader_order():
    counts = [5, 2, 4]
    order = list(torch.utils.data.DataLoader(Counted(counts), batch_size=None, num_workers=3, prefetch_factor=3))
    assert len(order) == sum(counts)
    for k in range(len(order) + 1):
        assert round_robin_taken(counts, k) == [order[:k].count(w) for w in range(3)]


def test_buffer_shuffle_is_a_deterministic_permutation():
    seq = np.arange(100, dtype=np.int64)
    a = buffer_shuffle(seq, 8, np.random.default_rng([1, 2]))
    assert sorted(a.tolist()) == list(range(100)) and a.tolist() != list(range(100))
    assert np.array_equal(a, buffer_shuffle(seq, 8, np.random.default_rng([1, 2])))
    assert max(abs(int(v) - i) for i, v in enumerate(a)) > 8  # a buffer lets records travel past its size


@pytest.mark.parametrize("batch_size,workers,stop", [(None, 2, 9), (3, 2, 4), (4, 0, 3), (None, 0, 17)])
def test_resume_mid_epoch_delivers_each_record_once(store, batch_size, workers, stop):
    root, keys = store

    def keys_of(items):
        return [k for it in items for k in (it["key"] if batch_size else [it["key"]])]

    ds = stream(root, seed=3, epoch=1, shuffle_buffer=5)
    first = keys_of(itertools.islice(ds.loader(batch_size=batch_size, num_workers=workers), stop))
    state = json.loads(json.dumps(ds.state_dict()))  # a checkpoint holds plain JSON
    assert state["consumed"] == stop and state["epoch"] == 1
    resumed = stream(root, seed=3, epoch=0, shuffle_buffer=5)
    resumed.load_state_dict(state)
    rest = keys_of(resumed.loader(batch_size=batch_size, num_workers=workers))
    assert len(first) + len(rest) == len(keys) and sorted(first + rest) == keys
    resumed.set_epoch(2)  # the next epoch is whole again
    assert sorted(keys_of(resumed.loader(batch_size=batch_size, num_workers=workers))) == keys


def test_resume_in_process_without_a_dataloader(store):
    root, keys = store
    ds = stream(root, seed=0, shuffle_buffer=3)
    first = [s["key"] for s in itertools.islice(iter(ds), 11)]
    resumed = stream(root, seed=0, shuffle_buffer=3)
    resumed.load_state_dict(ds.state_dict())
    assert sorted(first + [s["key"] for s in resumed]) == keys


def test_resume_refuses_other_settings(store):
    root, _ = store
    ds = stream(root, seed=3)
    list(itertools.islice(ds.loader(num_workers=2), 5))
    state = ds.state_dict()
    with pytest.raises(StoreError, match="seed"):
        stream(root, seed=4).load_state_dict(state)
    other = stream(root, seed=3)
    other.load_state_dict(state)
    with pytest.raises(StoreError, match="workers"):
        list(other.loader(num_workers=0))


def run_phase(store: Path, out: Path, phase: str, stop_after: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO_ROOT / "tests" / "ddp_resume_worker.py"), str(store), str(out), phase, str(stop_after)]
    r = subprocess.run(cmd, env=env, timeout=180, cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_resume_exactly_once(store, tmp_path):
    root, keys = store
    run_phase(root, tmp_path, "first", 3)  # 3 batches of 2 per rank, then the job "dies"
    run_phase(root, tmp_path, "rest", 0)
    seen = [k for phase in ("first", "rest") for r in range(2)
            for k in json.loads((tmp_path / f"{phase}-rank{r}.json").read_text())["keys"]]
    first = [json.loads((tmp_path / f"first-rank{r}.json").read_text())["keys"] for r in range(2)]
    assert [len(f) for f in first] == [6, 6]
    assert len(seen) == len(keys) and sorted(seen) == keys  # every record exactly once across ranks, workers, runs
