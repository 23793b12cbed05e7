"""Stores written before the reader and storage splits (tests/data/stores, see its README) open, verify and
stream after them, to the same bytes the code that wrote them read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from featstore.formats.locate import LEGACY, PER_IMAGE, SHARDS, locate_store
from featstore.formats.layout import PER_IMAGE_MANIFEST
from featstore.read import open_store, stream
from helpers import copy_sample, run_verify

OLD = Path(__file__).resolve().parents[1] / "data" / "stores"
EXPECTED = json.loads((OLD / "expected.json").read_text(encoding="utf-8"))
MTIMES = EXPECTED.pop("image_mtime_ns")  # the images' mtimes when the stores were built (their staleness check)
SHARD_STORES = ["shards_zstd", "shards_int8", "samples_zstd"]


def digest(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
            "sha256": hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()}


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("old")
    shutil.copytree(OLD, root / "stores")
    set_mtimes(copy_sample(root / "data"))
    return root


def set_mtimes(data: Path) -> Path:
    for key, ns in MTIMES.items():
        os.utime(data / key, ns=(ns, ns))
    return data


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_store_opens_to_the_same_features(old, name):
    want = EXPECTED[name]
    loc = locate_store(old / "stores" / name)
    assert loc.kind == (PER_IMAGE if name == "per_image" else SHARDS) and loc.layout == want["layout"]
    st = open_store(old / "stores" / name, data_root=old / "data")
    assert st.layout == want["layout"] and len(st) == want["records"] and st.keys() == sorted(want["features"])
    assert {k: digest(st.record(k).features) for k in st.keys()} == want["features"]
    if name != "samples_zstd":  # images are found by their path under the data root they were opened with
        key = st.keys()[0]
        assert torch.equal(st.get(str(old / "data" / key)), st[key])


def test_old_sample_store_finds_samples_by_frames_and_id(old):
    st = open_store(old / "stores" / "samples_zstd", data_root=old / "data")
    ann = json.loads((old / "data" / "annotations.json").read_text(encoding="utf-8"))[0]
    frames = [f"{ann['data_path']}/{f}" for f in [*ann["history_images"], ann["current_image"]]]
    by_frames = st.get_sample([str(old / "data" / f) for f in frames])
    by_id = st.get_sample(id=ann["id"])
    assert by_frames is not None and by_id is not None and torch.equal(by_frames, by_id)
    assert by_frames.shape == (1, 12, 128)


def test_old_legacy_caches_without_manifest(old, tmp_path):
    legacy = set_mtimes(copy_sample(tmp_path / "legacy"))  # caches beside the images, as older scripts wrote them
    shutil.copytree(old / "stores" / "per_image", legacy, dirs_exist_ok=True)
    (legacy / PER_IMAGE_MANIFEST).unlink()
    loc = locate_store(legacy)
    assert loc.kind == LEGACY and loc.manifest is None and loc.data_root == str(legacy.resolve())
    st = open_store(legacy)
    assert {k: digest(st[k]) for k in st.keys()} == EXPECTED["per_image"]["features"]
    assert stream_refused(legacy)
    rc, report = run_verify(legacy, tmp_path)
    assert rc == 0, report["problems"]


def stream_refused(path: Path) -> bool:
    from featstore.errors import StoreError

    with pytest.raises(StoreError, match="is a per-image store; stream"):
        stream(path)
    return True


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_old_store_verifies(old, tmp_path, name):
    rc, report = run_verify(old / "stores" / name, tmp_path, "--data-root", str(old / "data"))
    assert rc == 0, report["problems"]


@pytest.mark.parametrize("name", SHARD_STORES)
def test_old_store_streams_every_record_once(old, name):
    seen = {s["key"]: digest(s["features"]) for s in stream(old / "stores" / name, seed=3)}
    got = list(stream(old / "stores" / name, seed=3))
    assert len(got) == EXPECTED[name]["records"] and seen == EXPECTED[name]["features"]
