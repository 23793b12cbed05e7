"""Lookups that do what users expect (issue 8): a key, an absolute path or a cwd-relative path; a store whose
data moved; FEATSTORE_DATA_ROOT; featstore's public names; a corrupt cache says it is corrupt."""

from __future__ import annotations

import shutil

import pytest
import torch

import featstore
from featstore.errors import RecordError, StoreError
from featstore.formats.perimage import read_pt
from featstore.read import load_cached_vggt_features, open_store
from helpers import build, copy_images


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("lookup")
    data = copy_images(root / "data")
    build(data, "--out", str(root / "store"))
    build(data, "--format", "per-image")
    build(data, "--format", "per-image", "--out", str(root / "mirror"))
    return root


@pytest.mark.parametrize("which", ["store", "data", "mirror"])
def test_key_absolute_and_cwd_relative_paths_agree(built, which, monkeypatch):
    store = open_store(built / which)
    keys = store.keys()
    assert len(keys) == 12
    for key in keys[:4]:
        want = store[key]
        absolute = built / "data" / key
        monkeypatch.chdir(built)
        relative = f"data/{key}"
        for x in (key, str(absolute), absolute, relative, f"./{relative}"):
            assert x in store, x
            assert torch.equal(store[x], want) and torch.equal(store.get(x), want)
            assert store.key_for(x) == key
        monkeypatch.chdir(built / "data" / key.split("/")[0])
        assert torch.equal(store[key.split("/", 1)[1]], want)  # relative to a folder below the data root
        assert store.record(str(absolute)).key == key
    for missing in ("nope.jpg", str(built / "data" / "nope.jpg"), str(built / "elsewhere.jpg"), 42, None):
        assert missing not in store and store.get(missing, "dflt") == "dflt"
    with pytest.raises(KeyError):
        store[str(built / "data" / "nope.jpg")]


@pytest.mark.parametrize("which", ["store", "data"])
def test_a_moved_data_root(built, which, tmp_path, monkeypatch):
    """The data (and the store) copied to another machine: the new paths still find their features."""
    new = tmp_path / "mnt" / "train"
    shutil.copytree(built / "data", new)
    store_path = new if which == "data" else tmp_path / "store"
    if which == "store":
        shutil.copytree(built / "store", store_path)
    old = open_store(built / which)
    key = old.keys()[0]
    store = open_store(store_path, data_root=new)
    assert str(new / key) in store and torch.equal(store[str(new / key)], old[key])
    monkeypatch.chdir(tmp_path / "mnt")
    assert torch.equal(store.get(f"train/{key}"), old[key])
    assert torch.equal(store[str(built / "data" / key)], old[key])  # the recorded paths still work
    if which == "data":  # caches beside the images: the manifest's folder is the data root
        assert str(new / key) in open_store(new)
    with pytest.raises(StoreError, match="data_root .* is not a directory"):
        open_store(store_path, data_root=tmp_path / "nowhere")
    monkeypatch.setenv("FEATSTORE_STORE", str(store_path))
    monkeypatch.setenv("FEATSTORE_DATA_ROOT", str(new))
    assert torch.equal(load_cached_vggt_features(str(new / key)), old[key])
    assert load_cached_vggt_features(str(new / "nope.png")) is None


def test_public_names():
    names = ["open_store", "stream", "load_vggt", "preprocess_image", "load_cached_vggt_features"]
    for name in names:
        assert name in featstore.__all__ and name in dir(featstore) and callable(getattr(featstore, name))
    assert "importlib" not in dir(featstore)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_cache_says_so(built, tmp_path, damage):
    src = sorted((built / "data").rglob("*.vggt_cache.pt"))[0]
    p = tmp_path / "x.vggt_cache.pt"
    data = src.read_bytes()
    p.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[damage])
    with pytest.raises(RecordError) as e:
        read_pt(p)
    assert "corrupt or truncated" in str(e.value) and "could run code" not in str(e.value)
    assert str(p) in str(e.value) and "re-run `featstore build`" in str(e.value)
