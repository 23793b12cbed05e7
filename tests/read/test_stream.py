"""stream (FeatureStream) and decode_sample on real stores: each record once, superseded records skipped."""

from __future__ import annotations

import glob
import itertools
import shutil

import pytest
import torch
import webdataset as wds

import featstore
from featstore.build.merge import merge_shard_store
from featstore.formats.keys import encode_key
from featstore.formats.layout import SHARDS_DIR
from featstore.formats.record import encode_record
from featstore.formats.shards import ShardWriter
from featstore.read import decode_sample, open_store, stream


@pytest.mark.parametrize("store_name,workers", [("many", 3), ("few", 2), ("few", 0)])
def test_stream_each_record_once(stores, store_name, workers):
    ds = stream(stores / store_name, seed=1, epoch=0, shuffle_buffer=4)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    keys = [s["key"] for s in dl]
    assert sorted(keys) == open_store(stores / store_name).keys()
    assert len(ds) == 12
    again = [s["key"] for s in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)]
    assert again == keys
    ds.set_epoch(1)
    assert [s["key"] for s in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)] != keys


def test_stream_fewer_shards_than_workers_every_worker_reads(stores):
    # 3 shards, 4 workers: records are split inside shards, each worker gets 3
    ds = stream(stores / "few", shuffle=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=4)
    keys = [s["key"] for s in dl]
    assert sorted(keys) == open_store(stores / "few").keys()


def test_stream_samples_and_resampled(stores):
    sample = next(iter(stream(stores / "many")))
    assert set(sample) == {"__key__", "key", "path", "features"} and sample["features"].shape == (1, 1036, 128)
    assert sample["__key__"] == encode_key(sample["key"])  # the webdataset key docs/training.md promises
    endless = stream(stores / "many", resampled=True, shuffle_buffer=2)
    keys = [s["key"] for s in itertools.islice(iter(endless), 30)]
    assert len(keys) == 30 and sorted(keys[:12]) == open_store(stores / "many").keys()


def test_stream_skips_superseded_records(stores, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stores / "few", store)
    st = open_store(store)
    key = st.keys()[0]
    rec = st.record(key)
    rec.tensors["features"] = rec.tensors["features"] + 1
    w = ShardWriter(store / SHARDS_DIR, "vggt", 0, 10, fsync=False)
    w.write(key, encode_record(rec))
    w.close_shard()
    merge_shard_store(store)  # the old shard keeps 3 live records and 1 superseded one
    samples = list(stream(store, shuffle=False))
    assert sorted(s["key"] for s in samples) == st.keys()
    (new,) = [s for s in samples if s["key"] == key]
    assert torch.equal(new["features"], rec.tensors["features"])


def test_plain_webdataset_pipeline_reads_shards(stores):
    urls = sorted(glob.glob(str(stores / "few" / SHARDS_DIR / "*.tar")))
    ds = wds.WebDataset(urls, shardshuffle=False).map(decode_sample)
    samples = list(ds)
    store = open_store(stores / "few")
    assert sorted(s["key"] for s in samples) == store.keys()
    assert all(torch.equal(s["features"], store[s["key"]]) for s in samples)


def test_stream_refuses_per_image(stores):
    with pytest.raises(featstore.errors.StoreError, match="export"):
        stream(stores / "data")


@pytest.mark.parametrize("ahead", [0, 1, 30_000, 1 << 40])
def test_look_ahead_hints_keep_the_order(stores, ahead):
    from featstore.read.fetch import hinted

    st = open_store(stores / "few")
    rows = torch.randperm(len(st), generator=torch.Generator().manual_seed(ahead % 7)).numpy()
    assert [e.key for e in hinted(st, rows, ahead)] == [st.index.entry(int(r)).key for r in rows]
