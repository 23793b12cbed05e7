"""Codecs in real stores: build --codec, mixed codecs, export re-encoding, lossy per-image export, verify."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import featstore
from featstore.formats.layout import SHARDS_DIR
from featstore.cli.main import main
from featstore.formats.record import Record, decode_header, encode_record
from featstore.formats.shards import ShardWriter
from featstore.read import open_store, stream
from featstore.build.merge import merge_shard_store
from featstore.read import sharedpool
from featstore.read.sharedpool import SharedSample, worker_pool
from helpers import build, copy_images, problem_keys, run_verify
from test_codecs import legacy_record


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("codecs")
    data = copy_images(root / "data")
    for codec in ("zstd", "int8"):
        build(data, "--out", str(root / codec), "--shard-size", "700KB", "--dtype", "bfloat16", "--codec", codec)
    assert main(["export", str(root / "zstd"), "--format", "shards", "--codec", "raw", "--out", str(root / "raw"),
                 "--no-fsync"]) == 0
    return root


def header_codecs(store, key: str) -> list[str]:
    return [s.codec for s in decode_header(store.read_bytes(store.entry(key)))[1]]


def test_build_records_the_codec_and_reads_need_no_flag(stores):
    exact, lossy, raw = (open_store(stores / c) for c in ("zstd", "int8", "raw"))
    assert lossy.manifest["codec"] == "int8" and lossy.manifest["tensors"]["features"]["codec"] == "int8"
    assert exact.manifest["codec"] == "zstd" and raw.manifest["codec"] == "raw"
    assert exact.keys() == lossy.keys() == raw.keys()
    for key in exact.keys():
        want = exact.record(key)
        assert torch.equal(raw.record(key).features, want.features) and header_codecs(raw, key) == ["raw"]
        got = lossy.record(key)
        bound = got.bounds["features"]
        assert header_codecs(lossy, key) == ["int8"] and got.features.dtype == torch.bfloat16
        err = (got.features.float() - want.features.float())
        assert float(err.abs().max()) <= bound["max_abs"] and bound["rel_l2"] <= 0.01
        assert float(err.norm() / want.features.float().norm()) == pytest.approx(bound["rel_l2"], rel=1e-5)
    shard_bytes = {c: sum(p.stat().st_size for p in (stores / c / SHARDS_DIR).glob("*.tar")) for c in ("zstd", "int8")}
    assert shard_bytes["int8"] < shard_bytes["zstd"]


def test_records_written_before_codecs_read_through_the_map_and_the_worker_pool(stores, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stores / "zstd", store)
    keys = open_store(store).keys()[:4]
    old = {k: torch.randn(1, 300, 128).to(torch.bfloat16) for k in keys}  # large: the heap / slot output paths
    w = ShardWriter(store / SHARDS_DIR, "vggt", 0, 70, fsync=False)
    for k, t in old.items():
        w.write(k, legacy_record(k, t))
    w.close_shard()
    merge_shard_store(store)
    st = open_store(store)
    assert all(torch.equal(st[k], t) for k, t in old.items())
    dl = torch.utils.data.DataLoader(stream(store), batch_size=None, num_workers=2)
    got = {s["key"]: s["features"] for s in dl}
    assert sorted(got) == st.keys() and all(torch.equal(got[k], t) for k, t in old.items())


def test_per_image_build_refuses_a_shard_codec(stores, tmp_path):
    data = copy_images(tmp_path / "data", drop=10)
    assert main(["build", "--data-root", str(data), "--model", "tiny", "--device", "cpu", "--format", "per-image",
                 "--codec", "int8", "--no-progress"]) == 2
    assert not list(data.rglob("*.pt")) and not (data / "vggt_cache_manifest.json").exists()


def test_mixed_codecs_in_one_store_read_stream_and_verify(stores, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(stores / "zstd", store)
    st = open_store(store)
    keys = st.keys()
    w = ShardWriter(store / SHARDS_DIR, "vggt", 0, 50, fsync=False)
    for key, codec in zip(keys[:4], ("int8", "raw", "int8", "raw")):
        w.write(key, encode_record(st.record(key), codec=codec))
    w.close_shard()
    merge_shard_store(store)
    mixed = open_store(store)
    assert sorted(c for k in keys for c in header_codecs(mixed, k)) == sorted(["int8"] * 2 + ["raw"] * 2 + ["zstd"] * 8)
    samples = {s["key"]: s for s in torch.utils.data.DataLoader(stream(store, dequantize=False), batch_size=None,
                                                                num_workers=2)}
    assert sorted(samples) == keys
    for k in keys:
        assert torch.equal(featstore.dequantize(samples[k]), mixed[k])
        assert (samples[k]["features"].dtype == torch.int8) == ("int8" in header_codecs(mixed, k))
    rc, rep = run_verify(store, tmp_path, "--data-root", str(stores / "data"))
    assert rc == 0, rep["problems"]


@pytest.mark.parametrize("codec", ["zstd", "raw", "int8"])
def test_verify_catches_a_flipped_byte_in_each_codec(stores, tmp_path, codec):
    store = tmp_path / "store"
    shutil.copytree(stores / codec, store)
    st = open_store(store)
    key = st.keys()[3]
    e = st.entry(key)
    _, specs, first = decode_header(st.read_bytes(e))
    with open(store / SHARDS_DIR / e.shard, "r+b") as f:
        pos = e.offset + first + specs[0].zbytes // 2
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x10]))
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and key in problem_keys(rep, "corrupt")


def test_export_reencodes_and_writes_lossy_per_image_caches(stores, tmp_path):
    lossy = open_store(stores / "int8")
    caches = tmp_path / "caches"
    assert main(["export", str(stores / "int8"), "--format", "per-image", "--out", str(caches), "--no-fsync"]) == 0
    per_image = open_store(caches)
    m = json.loads((caches / "vggt_cache_manifest.json").read_text())
    assert m["lossy"]["features"]["codec"] == "int8" and m["lossy"]["features"]["rel_l2"] <= 0.01
    for key in lossy.keys():
        rec, want = per_image.record(key), lossy.record(key)
        assert torch.equal(rec.features, want.features) and rec.features.dtype == torch.bfloat16
        assert rec.meta["lossy"]["features"]["max_abs"] == want.bounds["features"]["max_abs"]
        plain = torch.load(caches / (key + ".vggt_cache.pt"), weights_only=True)
        assert plain["featstore"]["meta"]["lossy"]["features"]["codec"] == "int8"  # visible to any reader
    # the dequantized caches back into zstd shards: still marked lossy; re-encoding a shard store works too
    back = tmp_path / "back"
    assert main(["export", str(caches), "--format", "shards", "--out", str(back), "--no-fsync"]) == 0
    assert json.loads((back / "manifest.json").read_text())["lossy"]["features"]["codec"] == "int8"
    again = tmp_path / "again"
    assert main(["export", str(stores / "zstd"), "--format", "shards", "--codec", "int8", "--out", str(again),
                 "--no-fsync"]) == 0
    assert all(header_codecs(open_store(again), k) == ["int8"] for k in lossy.keys())
    for path in (caches, back, again):
        rc, rep = run_verify(path, tmp_path)
        assert rc == 0, rep["problems"]
    assert main(["export", str(stores / "zstd"), "--format", "shards", "--out", str(stores / "zstd")]) == 2


@pytest.mark.slow
def test_verify_recompute_compares_within_the_stored_bound(stores, tmp_path):
    rc, rep = run_verify(stores / "int8", tmp_path, "--recompute", "3", "--model", "tiny")
    assert rc == 0 and rep["recompute"]["checked"] == 3, rep["problems"]
    store = tmp_path / "store"
    shutil.copytree(stores / "int8", store)
    st = open_store(store)
    key = st.keys()[0]
    rec = st.record(key)
    off = rec.features.float() + 8 * rec.bounds["features"]["max_abs"]  # beyond its bound
    w = ShardWriter(store / SHARDS_DIR, "vggt", 0, 60, fsync=False)
    w.write(key, encode_record(Record(key, rec.path, {"features": off.to(torch.bfloat16)}, rec.meta), codec="int8"))
    w.close_shard()
    merge_shard_store(store)
    rc, rep = run_verify(store, tmp_path, "--recompute", "12", "--model", "tiny")
    assert rc == 1 and problem_keys(rep, "recompute") == {key}


def shared_in_worker(sample: dict) -> dict:
    """collate_fn, run inside the DataLoader worker: which of the sample's tensors are already shared memory
    (torch's, or a slot of the worker's recycled pool, which pickles by reference)."""
    slot = sample.slot if isinstance(sample, SharedSample) else None
    return {k: v.is_shared() or (slot is not None and slot.holds(v)) for k, v in sample.items()
            if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("codec,dequantize", [("zstd", True), ("raw", True), ("int8", True), ("int8", False)])
def test_worker_samples_are_born_in_shared_memory(stores, codec, dequantize):
    # torch copies every tensor a worker returns into shared memory unless it already is: decoded tensors are
    # allocated in a recycled shared slot (raw ones are views of a shared read buffer), so crossing to the main
    # process copies nothing
    dl = torch.utils.data.DataLoader(stream(stores / codec, dequantize=dequantize), batch_size=None, num_workers=1,
                                     collate_fn=shared_in_worker)
    flags = list(dl)
    assert len(flags) == 12 and all(f and all(f.values()) for f in flags), flags[0]
    assert all(set(f) == ({"features", "features_scales"} if not dequantize else {"features"}) for f in flags)


def with_arena_count(sample: dict) -> tuple[dict, int]:
    """collate_fn, run inside the DataLoader worker: the sample and how many arenas the worker's pool holds."""
    return sample, len(worker_pool().arenas)


@pytest.mark.parametrize("codec,dequantize", [("int8", False), ("zstd", True), ("raw", True)])
def test_worker_slots_are_recycled_without_overwriting_held_samples(stores, monkeypatch, codec, dequantize):
    monkeypatch.setattr(sharedpool, "ARENA_BYTES", 1)  # 2 slots per arena: many arena switches and reuses
    st = open_store(stores / codec)
    want = {k: st.record(k, dequantize=dequantize).tensors for k in st.keys()}
    ds = stream(stores / codec, dequantize=dequantize, shuffle_buffer=4)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True,
                                     collate_fn=with_arena_count)
    held = [s for s, _ in dl]  # epoch 0 kept: its slots stay pinned while later epochs decode
    arenas = []
    for epoch in range(1, 6):
        ds.set_epoch(epoch)
        for sample, count in dl:  # dropped at once: their slots are reused
            assert all(torch.equal(sample[n], t) for n, t in want[sample["key"]].items())
            arenas.append(count)
    assert len(held) == 12 and all(torch.equal(s[n], t) for s in held for n, t in want[s["key"]].items())
    # each worker pins 3 arenas for epoch 0 and needs about 2 more in flight; without reuse, 3 more every epoch
    assert max(arenas) <= 7, arenas


def test_batched_stream_from_recycled_slots(stores):
    st = open_store(stores / "int8")
    dl = torch.utils.data.DataLoader(stream(stores / "int8", dequantize=False), batch_size=5, num_workers=2)
    batches = list(dl)
    assert sum(len(b["key"]) for b in batches) == 12
    for b in batches:
        for i, key in enumerate(b["key"]):
            rec = st.record(key, dequantize=False)
            assert torch.equal(b["features"][i], rec.features)
            assert torch.equal(b["features_scales"][i], rec.tensors["features_scales"])


def storages_in_worker(sample: dict) -> int:
    """collate_fn, run inside the DataLoader worker: how many distinct storages the sample's tensors use."""
    return len({v.untyped_storage().data_ptr() for v in sample.values() if isinstance(v, torch.Tensor)})


def test_int8_values_and_scales_cross_as_one_storage(stores):
    # each storage a worker hands over costs a passed file descriptor: values and scales share one
    dl = torch.utils.data.DataLoader(stream(stores / "int8", dequantize=False), batch_size=None, num_workers=1,
                                     collate_fn=storages_in_worker)
    assert list(dl) == [1] * 12
