"""stream(batch_size=N, bucket_by_shape=True): batches of one shape stacked in the worker, each record once."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import featstore
from featstore.build.merge import merge_shard_store
from featstore.errors import StoreError
from featstore.formats.layout import SHARDS_DIR
from featstore.formats.record import Record, encode_record
from featstore.formats.shards import ShardWriter
from featstore.read import open_store, stream
from featstore.read import sharedpool
from featstore.read.batches import Batching, batch_plan

SHAPES = [(1, 3, 8), (1, 5, 8), (1, 2, 8)]
CODECS = ["raw", "zstd", "int8"]


def make_mixed_store(root: Path, n: int = 47, per_shard: int = 7) -> dict[str, tuple[int, ...]]:
    """Records of three shapes (aspect ratios) and three codecs, interleaved."""
    w = ShardWriter(root / SHARDS_DIR, "vggt", 0, 0, fsync=False)
    shapes = {}
    g = torch.Generator().manual_seed(1)
    for i in range(n):
        key, shape = f"ep{i // 10}/frame_{i:03d}.jpg", SHAPES[(i * 7) % 3]
        feats = (torch.randn(shape, generator=g) + i).to(torch.bfloat16)
        w.write(key, encode_record(Record(key, key, {"features": feats}), codec=CODECS[i % 3]))
        shapes[key] = shape
        if (i + 1) % per_shard == 0:
            w.close_shard()
    w.close_shard()
    merge_shard_store(root)
    return shapes


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("batches") / "store"
    return root, make_mixed_store(root)


def check_batches(batches, shapes, n, drop_last, consumers=1):
    store_of = {}
    for b in batches:
        assert isinstance(b["key"], list) and len(b["key"]) == b["features"].shape[0] <= n
        assert b["features"].shape[1:] == shapes[b["key"][0]]
        assert {shapes[k] for k in b["key"]} == {tuple(b["features"].shape[1:])}  # one shape per batch
        assert b["__key__"] and len(b["__key__"]) == len(b["key"])
        for i, k in enumerate(b["key"]):
            store_of[k] = b["features"][i]
    partial = Counter(tuple(b["features"].shape[1:]) for b in batches if len(b["key"]) < n)
    assert all(c <= consumers for c in partial.values())  # one per shape per consumer and (not drop_last or not partial)
    return store_of


@pytest.mark.parametrize("workers", [0, 2])
def test_bucketed_batches_one_shape_each_record_once(mixed, workers):
    root, shapes = mixed
    ds = stream(root, seed=2, batch_size=4, bucket_by_shape=True)
    batches = list(ds.loader(num_workers=workers))
    got = check_batches(batches, shapes, 4, drop_last=False, consumers=max(1, workers))
    if workers and sharedpool.AVAILABLE:  # stacked into the worker's slot, received by reference (no copy here)
        assert sharedpool._latest and not any(b["features"].is_shared() for b in batches)
    assert sorted(k for b in batches for k in b["key"]) == sorted(shapes)
    st = open_store(root)
    assert all(torch.equal(got[k], st[k]) for k in shapes)


def test_stacked_batches_equal_the_records_and_dequantize_on_the_batch(mixed):
    root, shapes = mixed
    st = open_store(root)
    for b in stream(root, seed=1, batch_size=3, bucket_by_shape=True):
        for i, k in enumerate(b["key"]):
            assert torch.equal(b["features"][i], st[k])
    quantized = [b for b in stream(root, seed=1, batch_size=3, bucket_by_shape=True, dequantize=False)
                 if b["features"].dtype == torch.int8]
    assert quantized, "int8 records stay quantized with dequantize=False"
    for b in quantized:
        deq = featstore.dequantize(b)
        for i, k in enumerate(b["key"]):
            assert torch.equal(deq[i], st[k])


def test_drop_last_drops_only_partial_buckets(mixed):
    root, shapes = mixed
    batches = list(stream(root, seed=4, batch_size=5, bucket_by_shape=True, drop_last=True))
    check_batches(batches, shapes, 5, drop_last=True)
    per_shape = Counter(shapes.values())
    assert sum(len(b["key"]) for b in batches) == sum(c - c % 5 for c in per_shape.values())


def test_batch_plan_from_the_index_alone():
    rows, specs = np.arange(10), np.array([0, 1, 0, 0, 1, 2, 0, 1, 2, 0])
    plan = batch_plan(rows, specs, Batching(2, True))
    assert [b.tolist() for b in plan] == [[0, 2], [1, 4], [3, 6], [5, 8], [7], [9]]
    assert [b.tolist() for b in batch_plan(rows, specs, Batching(3, False, True))] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(StoreError, match="bucket_by_shape"):
        Batching(None, True)


def test_mixed_shapes_without_buckets_is_an_actionable_error(mixed):
    root, _ = mixed
    with pytest.raises(StoreError, match="bucket_by_shape=True"):
        list(stream(root, shuffle=False, batch_size=3))


def test_bucketed_stream_resumes_exactly_once_at_another_worker_count(mixed):
    root, shapes = mixed
    ds = stream(root, seed=6, batch_size=4, bucket_by_shape=True)
    first = [k for b in itertools.islice(ds.loader(num_workers=2), 3) for k in b["key"]]
    state = json.loads(json.dumps(ds.state_dict()))
    resumed = stream(root, seed=6, batch_size=4, bucket_by_shape=True)
    resumed.load_state_dict(state)
    rest = [k for b in resumed.loader(num_workers=3) for k in b["key"]]
    assert len(first) + len(rest) == len(shapes) and sorted(first + rest) == sorted(shapes)
