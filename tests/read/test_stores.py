"""open_store (ShardStore, PerImageStore) and load_cached_vggt_features on real stores."""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import threading

import pytest
import torch

import featstore
from featstore.errors import RecordError
from featstore.formats.layout import SHARDS_DIR
from featstore.formats.store import Store
from featstore.read import open_store


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
    import featstore.read.dropin as loader
    from featstore.read.dropin import _default_stores

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
