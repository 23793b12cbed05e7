"""featstore verify on real stores with planted faults: each is found, the record named, exit 1."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from featstore.formats.layout import INDEX_NAME, SHARDS_DIR
from featstore.formats.index import Index, write_index
from featstore.formats.perimage import read_pt, write_pt
from featstore.formats.record import encode_record
from featstore.formats.shards import ShardEntry, ShardWriter
from featstore.read import open_store
from featstore.build.merge import merge_shard_store
from helpers import build, copy_images, problem_keys, run_verify


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One data root with a shard store (one record per shard) and a mirrored per-image store."""
    root = tmp_path_factory.mktemp("verify")
    data = copy_images(root / "data")
    build(data, "--out", str(root / "store"), "--shard-size", "20KB")
    build(data, "--format", "per-image", "--out", str(root / "caches"))
    return root


@pytest.fixture
def store(built, tmp_path):
    """A private copy of the shard store (its manifest still names the shared data root)."""
    dst = tmp_path / "store"
    shutil.copytree(built / "store", dst)
    return dst


@pytest.fixture
def caches(built, tmp_path):
    dst = tmp_path / "caches"
    shutil.copytree(built / "caches", dst)
    m = json.loads((dst / "vggt_cache_manifest.json").read_text())
    m["cache_root"] = str(dst)
    (dst / "vggt_cache_manifest.json").write_text(json.dumps(m))
    return dst


def first_entry(store: Path):
    ix = Index(store / INDEX_NAME)
    return sorted(ix.entries(), key=lambda e: e.key)[0]


def test_clean_stores_pass(built, store, caches, tmp_path):
    rc, rep = run_verify(store, tmp_path, "--data-root", str(built / "data"))
    assert rc == 0, rep["problems"]
    assert rep["records_checked"] == 12 and rep["counts"]["listed_images"] == 12
    rc, rep = run_verify(caches, tmp_path)
    assert rc == 0, rep["problems"]
    assert rep["records_checked"] == 12


def test_flipped_byte_in_record(store, tmp_path):
    e = first_entry(store)
    shard = store / SHARDS_DIR / e.shard
    with open(shard, "r+b") as f:
        f.seek(e.offset + e.length - 100)  # inside the compressed tensor data
        b = f.read(1)
        f.seek(e.offset + e.length - 100)
        f.write(bytes([b[0] ^ 0x40]))
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1
    assert e.key in problem_keys(rep, "corrupt")
    assert e.shard in problem_keys(rep, "shard")  # sha256 differs from the manifest


def test_flipped_byte_found_by_sample(store, tmp_path):
    e = first_entry(store)
    with open(store / SHARDS_DIR / e.shard, "r+b") as f:
        f.seek(e.offset + e.length - 50)
        b = f.read(1)
        f.seek(e.offset + e.length - 50)
        f.write(bytes([b[0] ^ 0x01]))
    rc, rep = run_verify(store, tmp_path, "--sample", "12")
    assert rc == 1 and e.key in problem_keys(rep, "index") | problem_keys(rep, "corrupt")


def test_truncated_shard(store, tmp_path):
    e = first_entry(store)
    os.truncate(store / SHARDS_DIR / e.shard, e.offset + 1000)
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1
    assert e.key in problem_keys(rep, "shard")
    assert e.shard in problem_keys(rep, "shard")


def test_deleted_per_image_file(built, caches, tmp_path):
    victim = "episodes/episode_000/frame.001.jpg"
    (caches / (victim + ".vggt_cache.pt")).unlink()
    rc, rep = run_verify(caches, tmp_path, "--data-root", str(built / "data"))
    assert rc == 1
    assert problem_keys(rep, "missing") == {victim}
    assert problem_keys(rep, "count")  # the manifest says 12, 11 files exist


def test_nan_in_per_image_record(caches, tmp_path):
    key = "episodes/episode_000/frame.002.jpg"
    p = caches / (key + ".vggt_cache.pt")
    rec = read_pt(p)
    rec.tensors["features"][0, 3, 7] = float("nan")
    write_pt(p, rec)  # re-encoded through the codec: checksums match, values do not
    rc, rep = run_verify(caches, tmp_path)
    assert rc == 1 and problem_keys(rep, "nonfinite") == {key}


def test_nan_in_shard_record_supersedes(store, tmp_path):
    st = open_store(store)
    key = sorted(st.keys())[3]
    rec = st.record(key)
    rec.tensors["features"][0, 0, 0] = float("inf")
    w = ShardWriter(store / SHARDS_DIR, "vggt", 0, 100, fsync=False)
    w.write(key, encode_record(rec))
    w.close_shard()
    merge_shard_store(store)
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "nonfinite") == {key}


def test_superseded_records_are_information(store, tmp_path):
    st = open_store(store)
    key = sorted(st.keys())[5]
    closed: list = []
    with ShardWriter(store / SHARDS_DIR, "vggt", 0, 100, fsync=False, post=closed.append) as w:
        w.write(key, encode_record(st.record(key)))
    # Keep the old shard (merge would drop a fully superseded shard): rebuild index + manifest by hand.
    m = json.loads((store / "manifest.json").read_text())
    ix = Index(store / INDEX_NAME)
    shards = list(ix.shards) + [closed[0].info.name]
    entries = [(ix.shards.index(e.shard), ShardEntry(e.key, e.offset, e.length, e.crc32, e.tensors, e.source))
               for e in ix.entries() if e.key != key]
    entries += [(len(shards) - 1, closed[0].entries[0])]
    write_index(store / INDEX_NAME, shards, entries)
    info = closed[0].info
    m["shards"].append({"name": info.name, "records": 1, "bytes": info.bytes, "sha256": info.sha256})
    old = ix.get(key).shard
    for s in m["shards"]:
        if s["name"] == old:
            s["records"] = 0
    (store / "manifest.json").write_text(json.dumps(m))
    rc, rep = run_verify(store, tmp_path)
    assert rc == 0, rep["problems"]
    assert rep["info"]["superseded records (a newer copy is indexed)"] == 1


def test_image_changed_after_build(built, store, tmp_path):
    key = "episodes/episode 001/rgb_002.png"
    img = built / "data" / key
    st = os.stat(img)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    try:
        rc, rep = run_verify(store, tmp_path)
    finally:
        os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert rc == 1 and problem_keys(rep, "stale") == {key}
    assert any("--rebuild-stale" in p["fix"] for p in rep["problems"])


def test_manifest_count_edited(store, tmp_path):
    m = json.loads((store / "manifest.json").read_text())
    m["processed_images"] += 1
    (store / "manifest.json").write_text(json.dumps(m))
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and "manifest.json" in problem_keys(rep, "count")


def test_stray_temp_file(store, tmp_path):
    stray = store / SHARDS_DIR / ".vggt-00000-000099.tar.tmp-host-1-deadbeef"
    stray.write_bytes(b"partial")
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "stray") == {str(stray)}


def test_index_entry_wrong_offset(store, tmp_path):
    ix = Index(store / INDEX_NAME)
    victim = sorted(ix.keys())[2]
    entries = []
    for e in ix.entries():
        off = e.offset + 512 if e.key == victim else e.offset
        entries.append((ix.shards.index(e.shard), ShardEntry(e.key, off, e.length, e.crc32, e.tensors, e.source)))
    write_index(store / INDEX_NAME, ix.shards, entries)
    m = json.loads((store / "manifest.json").read_text())
    m["index"] = None
    (store / "manifest.json").write_text(json.dumps(m))
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "index") == {victim}


def test_legacy_caches_checked_as_far_as_possible(tmp_path):
    data = copy_images(tmp_path / "data")
    for img in sorted(data.rglob("*.png")):
        torch.save({"features": torch.randn(1, 16, 2048), "path": str(img)}, str(img) + ".vggt_cache.pt")
    rc, rep = run_verify(data, tmp_path)
    assert rc == 1 and len(problem_keys(rep, "missing")) == 8  # the jpgs have no cache
    assert rep["info"]["legacy caches (no metadata: checksum not checkable)"] == 4
    assert any("no vggt_cache_manifest.json" in n for n in rep["notes"])


def test_recompute_matches_model(store, tmp_path):
    rc, rep = run_verify(store, tmp_path, "--recompute", "2", "--model", "tiny")
    assert rc == 0, rep["problems"]
    assert rep["recompute"]["checked"] == 2 and rep["recompute"]["worst_error"] <= 1e-3


def test_could_not_run_exits_2(tmp_path):
    from featstore.cli.main import main

    assert main(["verify", str(tmp_path / "nope"), "--no-progress"]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty"), "--no-progress"]) == 2


# --- fault kinds planted one by one: each test fails if its check is removed --------------------------------
def plant(store: Path, rec, copies: int = 1) -> None:
    """Write ``rec`` into a new shard (``copies`` times) and merge: the index then points at the planted copy."""
    w = ShardWriter(store / SHARDS_DIR, "vggt", 0, 100, fsync=False)
    for _ in range(copies):
        w.write(rec.key, encode_record(rec))
    w.close_shard()
    merge_shard_store(store)


def stored_record(store: Path, i: int):
    st = open_store(store)
    return st.record(sorted(st.keys())[i])


def test_provenance_mismatch_in_shard_record(store, tmp_path):
    rec = stored_record(store, 1)
    rec.meta["model"] = "f" * 64  # made by another model than the manifest's
    plant(store, rec)
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "provenance") == {rec.key}, rep["problems"]
    assert {p["kind"] for p in rep["problems"]} == {"provenance"}


def test_provenance_of_a_per_image_file_holding_another_key(caches, tmp_path):
    files = sorted(caches.rglob("*.vggt_cache.pt"))
    shutil.copy(files[0], files[1])
    key = str(files[1].relative_to(caches))[: -len(".vggt_cache.pt")]
    rc, rep = run_verify(caches, tmp_path)
    assert rc == 1 and key in problem_keys(rep, "provenance"), rep["problems"]
    assert any("holds the record of" in p["message"] for p in rep["problems"] if p["kind"] == "provenance")


def test_layout_mismatch_dtype_in_shard_record(store, tmp_path):
    rec = stored_record(store, 2)
    rec.tensors["features"] = rec.tensors["features"].to(torch.float16)  # the manifest says float32
    plant(store, rec)
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "layout") == {rec.key}, rep["problems"]


def test_layout_mismatch_shape_in_per_image_file(caches, tmp_path):
    key = "episodes/episode_000/frame.003.jpg"
    p = caches / (key + ".vggt_cache.pt")
    rec = read_pt(p)
    rec.tensors["features"] = rec.tensors["features"][:, :-1]  # one token short: not among feature_shapes
    write_pt(p, rec)
    rc, rep = run_verify(caches, tmp_path)
    assert rc == 1 and problem_keys(rep, "layout") == {key}, rep["problems"]


def test_orphan_record_whose_image_is_gone(built, store, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built / "data", data)
    victim = "episodes/episode_000/frame.001.jpg"
    (data / victim).unlink()
    # --sample: the listing comparison is off, so only the record's own check can name the orphan.
    rc, rep = run_verify(store, tmp_path, "--data-root", str(data), "--sample", "12")
    assert rc == 1 and problem_keys(rep, "orphan") == {victim}, rep["problems"]
    rc, rep = run_verify(store, tmp_path, "--data-root", str(data))
    assert rc == 1 and problem_keys(rep, "orphan") == {victim}
    assert len([p for p in rep["problems"] if p["kind"] == "orphan"]) == 1  # named once, not by both checks


def test_duplicate_key_in_one_shard(store, tmp_path):
    rec = stored_record(store, 4)
    plant(store, rec, copies=2)
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "duplicate") == {rec.key}, rep["problems"]


def test_failing_recompute_names_the_record(store, tmp_path):
    rc, rep = run_verify(store, tmp_path, "--recompute", "1", "--model", "tiny")
    assert rc == 0, rep["problems"]
    st = open_store(store)
    rec = st.record(rep["recompute"]["worst_key"])  # the record --seed 0 picks
    rec.tensors["features"] = rec.tensors["features"] * 1.05  # finite, right shape and dtype, wrong values
    plant(store, rec)
    rc, rep = run_verify(store, tmp_path)
    assert rc == 0, rep["problems"]  # nothing but the model can tell
    rc, rep = run_verify(store, tmp_path, "--recompute", "1", "--model", "tiny")
    assert rc == 1 and problem_keys(rep, "recompute") == {rec.key}, rep["problems"]
    assert rep["recompute"]["worst_key"] == rec.key and rep["recompute"]["worst_error"] > 1e-2


def test_rank_locks_are_stray(store, caches, tmp_path):
    from featstore.formats.layout import LOCK_NAME, rank_lock_name

    lock = store / rank_lock_name("build-1")
    lock.write_text("{}")
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "stray") == {str(lock)}, rep["problems"]
    (caches / LOCK_NAME).write_text("{}")
    rc, rep = run_verify(caches, tmp_path)
    assert rc == 1 and problem_keys(rep, "stray") == {str(caches / LOCK_NAME)}, rep["problems"]
