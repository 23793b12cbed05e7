"""open_store, load_cached_vggt_features, stream and decode_sample on real stores."""

from __future__ import annotations

import glob
import itertools
import logging
import os
import shutil
import threading

import pytest
import torch
import webdataset as wds

import featstore
from featstore.errors import RecordError
from featstore.formats.layout import SHARDS_DIR
from featstore.formats.record import encode_record
from featstore.formats.shards import ShardWriter
from featstore.formats.store import Store
from featstore.formats.keys import encode_key
from featstore.read.loader import decode_sample, open_store, stream
from featstore.build.merge import merge_shard_store
from tests.featstore_helpers import build, copy_images


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    data = copy_images(root / "data")
    build(data, "--out", str(root / "many"), "--shard-size", "20KB")  # 12 shards of 1 record
    build(data, "--out", str(root / "few"), "--shard-size", "1500KB")  # 3 shards of 4 records
    build(data, "--format", "per-image")  # beside the images
    return root


class FeatureDataset(torch.utils.data.Dataset):
    def __init__(self, store, keys):
        self.store, self.keys = store, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return self.keys[i], self.store[self.keys[i]]


def test_open_store_both_layouts_agree(stores):
    shards, per_image = open_store(stores / "many"), open_store(stores / "data")
    assert shards.layout == "shards" and per_image.layout == "per-image"
    assert isinstance(shards, Store) and isinstance(per_image, Store)  # the one interface export and verify use
    assert shards.context == per_image.context == {"mode": "image"}
    assert str(shards.data_root) == str(per_image.data_root) == str(stores / "data")
    assert len(shards) == len(per_image) == 12 and shards.keys() == per_image.keys()
    for k in shards.keys():
        assert k in shards and k in per_image
        assert torch.equal(shards[k], per_image[k])
        assert torch.equal(shards.get(str(stores / "data" / k)), shards[k])  # absolute image path
        assert shards.get(k) is not None
        rec, same = shards.record(k), per_image.record(k)
        assert rec.key == same.key == k and rec.meta["layers"] == {"features": 0} and rec.meta == same.meta
        assert list(rec.tensors) == list(same.tensors) and torch.equal(rec.features, same.features)
    assert "nope.jpg" not in shards and shards.get("nope.jpg") is None and per_image.get("nope.jpg") is None
    with pytest.raises(KeyError):
        shards["nope.jpg"]
    assert shards.manifest["processed_images"] == 12


def test_open_store_in_workers_threads_and_small_lru(stores):
    store = open_store(stores / "many", max_open=2)
    keys = store.keys()
    _ = store[keys[0]]  # opened in the parent before the fork
    dl = torch.utils.data.DataLoader(FeatureDataset(store, keys), batch_size=None, num_workers=2)
    got = dict(dl)
    assert sorted(got) == keys and all(torch.equal(got[k], store[k]) for k in keys)
    errors = []

    def reader(seed):
        try:
            for k in itertools.islice(itertools.cycle(keys[seed:] + keys[:seed]), 60):
                assert torch.equal(store[k], got[k])
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(store.storage._files) <= 2


def test_compressed_records_read_from_the_mapped_shard_survive_truncation_and_growth(stores, tmp_path):
    store_dir = tmp_path / "few"
    shutil.copytree(stores / "few", store_dir)
    st = open_store(store_dir)
    keys = st.keys()
    want = {k: st[k].clone() for k in keys}  # maps every shard
    last = max((st.entry(k) for k in keys), key=lambda e: (e.shard, e.offset))
    shard = store_dir / SHARDS_DIR / last.shard
    original = shard.read_bytes()
    os.truncate(shard, last.offset + 10)  # in place, under the live map: a read must fail cleanly, not SIGBUS
    with pytest.raises(RecordError, match="truncated"):
        st[last.key]
    for k in keys:
        if k != last.key:
            assert torch.equal(st[k], want[k])
    with open(shard, "r+b") as f:  # the same file grows back: mapped again
        f.write(original)
    assert torch.equal(st[last.key], want[last.key])
    st.close()
    assert all(torch.equal(st[k], want[k]) for k in keys)  # reopened after close


def test_load_cached_vggt_features(stores, monkeypatch):
    from featstore.read.loader import _default_stores
    import featstore.read.loader as loader

    img = stores / "data" / "episodes/episode_000/frame.000.jpg"
    want = open_store(stores / "many")["episodes/episode_000/frame.000.jpg"]
    log = logging.getLogger("featstore")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        monkeypatch.setattr(loader, "_announced", False)
        monkeypatch.setenv("USE_VGGT_CACHE", "true")
        monkeypatch.delenv("FEATSTORE_STORE", raising=False)
        assert torch.equal(featstore.load_cached_vggt_features(img), want)  # per-image file beside the image
        assert featstore.load_cached_vggt_features(stores / "data" / "missing.jpg") is None
        monkeypatch.setattr(loader, "_announced", False)
        monkeypatch.setenv("FEATSTORE_STORE", str(stores / "many"))
        for _ in range(3):
            assert torch.equal(featstore.load_cached_vggt_features(str(img)), want)
        assert featstore.load_cached_vggt_features(str(stores / "data" / "missing.jpg")) is None
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        _default_stores.clear()
    msgs = [r.getMessage() for r in records if "VGGT feature cache enabled" in r.getMessage()]
    assert len(msgs) == 2 and str(stores / "many") in msgs[1]


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
