"""Mid-epoch resume of stream(): state_dict/load_state_dict, exactly once across workers and real torchrun ranks,
at the world size and worker count of the save or at others (elastic)."""

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
from featstore.read.resume import resumed_orders, split
from featstore.build.merge import merge_shard_store
from helpers import REPO_ROOT


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
    with pytest.raises(StoreError, match="shuffle_buffer"):
        stream(root, seed=3, shuffle_buffer=7).load_state_dict(state)
    with pytest.raises(StoreError, match="newer"):
        stream(root, seed=3).load_state_dict(dict(state, version=99))


def keys_of(items, batched):
    return [k for it in items for k in (it["key"] if batched else [it["key"]])]


def ranks(root, world, workers, take=None, state=None, batch_size=None, monkeypatch=None, **kw):
    """``world`` ranks one after the other (RANK/WORLD_SIZE, as torchrun sets them), each a loader of ``workers``
    taking ``take`` items (all when None); returns the keys each rank got and rank 0's state."""
    got, state0 = [], None
    for r in range(world):
        monkeypatch.setenv("RANK", str(r))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        ds = stream(root, seed=3, epoch=1, shuffle_buffer=5, **kw)
        if state is not None:
            ds.load_state_dict(state)
        items = itertools.islice(ds.loader(batch_size=batch_size, num_workers=workers), take)
        got.append(keys_of(items, batch_size is not None or kw.get("batch_size") is not None))
        if r == 0:
            state0 = json.loads(json.dumps(ds.state_dict()))
    return got, state0


@pytest.mark.parametrize("before,after", [((2, 2), (1, 3)), ((2, 2), (3, 0)), ((1, 0), (2, 2))])
def test_elastic_resume_other_world_size_and_workers_exactly_once(store, monkeypatch, before, after):
    root, keys = store
    first, state = ranks(root, *before, take=3, monkeypatch=monkeypatch)
    assert [len(f) for f in first] == [3] * before[0]
    rest, _ = ranks(root, *after, state=state, monkeypatch=monkeypatch)
    seen = [k for part in first + rest for k in part]
    assert len(seen) == len(keys) and sorted(seen) == keys


def test_elastic_resume_chains_and_keeps_loader_batches(store, monkeypatch):
    root, keys = store
    first, state = ranks(root, 2, 2, take=2, batch_size=3, monkeypatch=monkeypatch)
    second, state2 = ranks(root, 3, 0, take=1, state=state, batch_size=2, monkeypatch=monkeypatch)
    assert len(state2["resumed"]) == 1 and state2["world_size"] == 3
    rest, _ = ranks(root, 1, 2, state=state2, monkeypatch=monkeypatch)
    seen = [k for part in first + second + rest for k in part]
    assert len(seen) == len(keys) and sorted(seen) == keys


def test_resumed_orders_split_what_is_left():
    plans = {m: split(np.arange(40), m) for m in (1, 2, 3, 4, 6)}
    state = {"epoch": 0, "world_size": 2, "num_workers": 2, "batch_size": None, "drop_last": False, "consumed": 5}
    orders = resumed_orders(lambda m: plans[m], [state], 3, np.zeros(40, np.int64))
    taken = round_robin_taken([10, 10], 5)  # per rank: worker 0 handed out 3, worker 1 handed out 2
    done = {int(v) for c in range(4) for v in plans[4][c][:taken[c % 2]]}
    assert sorted(int(v) for o in orders for v in o) == sorted(set(range(40)) - done)
    assert [len(o) for o in orders] == [6, 7, 7] or max(map(len, orders)) - min(map(len, orders)) <= 1
    same = resumed_orders(lambda m: plans[m], [dict(state, world_size=1, num_workers=0)], 1, np.zeros(40, np.int64))
    assert same[0].tolist() == list(range(5, 40))  # the same consumers continue their own sequence


def run_phase(store: Path, out: Path, phase: str, stop_after: int, nproc: int = 2, workers: int = 2) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(REPO_ROOT / "tests" / "ddp_resume_worker.py"), str(store), str(out), phase, str(stop_after),
           str(workers)]
    r = subprocess.run(cmd, env=env, timeout=180, cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("nproc,workers", [(2, 2), (1, 3), (3, 1)])
def test_torchrun_two_ranks_two_workers_resume_exactly_once(store, tmp_path, nproc, workers):
    """Saved at 2 ranks x 2 workers; resumed at the same, at 1 rank x 3 workers and at 3 ranks x 1 worker."""
    root, keys = store
    run_phase(root, tmp_path, "first", 3)  # 3 batches of 2 per rank, then the job "dies"
    run_phase(root, tmp_path, "rest", 0, nproc, workers)
    first = [json.loads((tmp_path / f"first-rank{r}.json").read_text())["keys"] for r in range(2)]
    rest = [json.loads((tmp_path / f"rest-rank{r}.json").read_text())["keys"] for r in range(nproc)]
    assert [len(f) for f in first] == [6, 6]
    seen = [k for part in first + rest for k in part]
    assert len(seen) == len(keys) and sorted(seen) == keys  # every record exactly once across ranks, workers, runs
