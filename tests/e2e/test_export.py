"""featstore export: bit-exact round trips in both directions (legacy caches included), idempotence, traversal."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from featstore.formats.layout import SHARDS_DIR
from featstore.cli.main import main
from featstore.formats.record import Record, encode_record
from featstore.formats.shards import ShardWriter
from featstore.read import open_store
from featstore.build.merge import merge_shard_store
from helpers import build, copy_images, run_verify


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8),
                                                                      b.contiguous().view(torch.uint8))


def assert_same_store(a, b) -> None:
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        ra, rb = a.record(k), b.record(k)
        assert list(ra.tensors) == list(rb.tensors)
        assert all(same_bits(ra.tensors[n], rb.tensors[n]) for n in ra.tensors), k
        assert ra.meta == rb.meta and ra.path == rb.path


@pytest.fixture(scope="module")
def shard_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = copy_images(root / "data")
    build(data, "--out", str(root / "store"), "--shard-size", "600KB", "--dtype", "bfloat16", "--layers=-2,-1")
    return root


def test_shards_to_per_image_and_back_bit_exact(shard_store, tmp_path):
    store = shard_store / "store"
    out = tmp_path / "caches"
    assert main(["export", str(store), "--format", "per-image", "--out", str(out)]) == 0
    per_image = open_store(out)
    assert per_image.layout == "per-image" and len(per_image) == 12
    assert_same_store(open_store(store), per_image)
    m = json.loads((out / "vggt_cache_manifest.json").read_text())
    assert m["cache_root"] == str(out) and m["data_root"] == str(shard_store / "data")
    rc, rep = run_verify(out, tmp_path)
    assert rc == 0, rep["problems"]

    # idempotent: nothing rewritten the second time
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    assert main(["export", str(store), "--format", "per-image", "--out", str(out)]) == 0
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}

    back = tmp_path / "back"
    assert main(["export", str(out), "--format", "shards", "--out", str(back), "--shard-size", "300KB"]) == 0
    assert_same_store(open_store(store), open_store(back))
    rc, rep = run_verify(back, tmp_path)
    assert rc == 0, rep["problems"]
    # Re-running is idempotent (resumes; nothing is rewritten) ...
    shard_files = {p: p.stat().st_mtime_ns for p in (back / "shards").iterdir()}
    assert main(["export", str(out), "--format", "shards", "--out", str(back)]) == 0
    assert shard_files == {p: p.stat().st_mtime_ns for p in (back / "shards").iterdir()}
    assert_same_store(open_store(store), open_store(back))
    # ... but a store of another data root is never mixed in.
    other = tmp_path / "other"
    other.mkdir()
    (other / "vggt_cache_manifest.json").write_text(json.dumps(dict(m, data_root=str(other), cache_root=None)))
    assert main(["export", str(other), "--format", "shards", "--out", str(back)]) == 2


def test_export_beside_images(shard_store, tmp_path):
    data = copy_images(tmp_path / "data")
    store = tmp_path / "store"
    shutil.copytree(shard_store / "store", store)
    m = json.loads((store / "manifest.json").read_text())
    m["data_root"] = str(data)
    (store / "manifest.json").write_text(json.dumps(m))
    assert main(["export", str(store), "--format", "per-image"]) == 0
    assert len(list(data.rglob("*.vggt_cache.pt"))) == 12
    d = torch.load(data / "episodes/episode_000/frame.000.jpg.vggt_cache.pt", weights_only=True)
    assert same_bits(d["features"], open_store(store)["episodes/episode_000/frame.000.jpg"])


def test_legacy_caches_round_trip(tmp_path):
    data = copy_images(tmp_path / "data")
    originals = {}
    g = torch.Generator().manual_seed(0)
    for i, img in enumerate(sorted(p for p in data.rglob("*") if p.suffix in (".jpg", ".png"))):
        feats = torch.randn(1, 20 + i, 2048, generator=g)
        originals[img.relative_to(data).as_posix()] = feats
        torch.save({"features": feats, "path": str(img)}, str(img) + ".vggt_cache.pt")
    store = tmp_path / "store"
    assert main(["export", str(data), "--format", "shards", "--out", str(store)]) == 0
    m = json.loads((store / "manifest.json").read_text())
    assert "model.fingerprint" in m["provenance_unknown"] and m["dtype"] == "float32"
    rc, rep = run_verify(store, tmp_path)
    assert rc == 0, rep["problems"]
    s = open_store(store)
    assert sorted(s.keys()) == sorted(originals)
    assert all(same_bits(s[k], v) for k, v in originals.items())

    out = tmp_path / "again"
    assert main(["export", str(store), "--format", "per-image", "--out", str(out)]) == 0
    for k, v in originals.items():
        d = torch.load(out / (k + ".vggt_cache.pt"), weights_only=True)
        assert same_bits(d["features"], v) and d["path"] == str(data / k)
    rc, rep = run_verify(out, tmp_path)
    assert rc == 0, rep["problems"]


def test_path_traversal_refused(shard_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(shard_store / "store", store)
    good = open_store(store).record(open_store(store).keys()[0])
    evil_keys = ["../evil.jpg", "a/../../evil2.jpg", str(tmp_path / "abs_evil.jpg")]
    w = ShardWriter(store / SHARDS_DIR, "vggt", 0, 50, fsync=False)
    for k in evil_keys:
        w.write(k, encode_record(Record(k, k, dict(good.tensors), good.meta)))
    w.close_shard()
    merge_shard_store(store)
    # a folder under the output that links outside it
    out = tmp_path / "out"
    (out / "episodes").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out / "episodes" / "episode_000")
    assert main(["export", str(store), "--format", "per-image", "--out", str(out)]) == 1
    assert not (tmp_path / "evil.jpg.vggt_cache.pt").exists()
    assert not (tmp_path / "evil2.jpg.vggt_cache.pt").exists()
    assert not (tmp_path / "abs_evil.jpg.vggt_cache.pt").exists()
    assert list(outside.iterdir()) == []
    assert len(list(out.rglob("*.vggt_cache.pt"))) == 8  # the 4 records under the linked folder are refused
