"""End-to-end builds on CPU with the tiny model: real images, real tar shards, real processes."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds

from featstore.formats.index import Index
from featstore.formats.keys import key_from_member
from featstore.formats.manifest import read_manifest
from featstore.formats.perimage import read_pt
from featstore.formats.record import decode_record
from featstore.formats.shards import list_shards
from helpers import REPO, build_args, make_images, run_cli, run_inproc, write_jsonl
from helpers import copy_sample



def store_records(out: Path) -> dict[str, object]:
    """Every record the index points to, decoded and checksum-verified."""
    ix = Index(out / "index.fsi")
    recs = {}
    for e in ix.entries():
        with open(out / "shards" / e.shard, "rb") as f:
            data = os.pread(f.fileno(), e.length, e.offset)
            assert len(data) == e.length, f"shard {e.shard} is truncated"
            recs[e.key] = decode_record(data)
    return recs


def direct_features(path: Path, mode: str = "crop") -> torch.Tensor:
    """What the model computes online for one image (layer -2, patch tokens)."""
    from featstore import load_vggt, preprocess_image

    model = load_vggt("tiny")
    img = preprocess_image(path, mode)
    with torch.inference_mode():
        out = model(img[None, None], layers=(-2,))
    (layer,) = out
    return out[layer][0, :, model.patch_start_idx:]


def test_build_scan_shards_matches_direct_model_call(tmp_path):
    keys = make_images(tmp_path / "data", 10)
    r = run_inproc(*build_args(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    assert "[INFO] Processing 10 images..." in r.stderr
    assert "[SUCCESS] Processed 10 images" in r.stderr
    out = tmp_path / "data" / "vggt_featstore"
    m = read_manifest(out / "manifest.json")
    assert (m["total_images"], m["processed_images"], m["counts"]["failed"], m["complete"]) == (10, 10, 0, True)
    assert m["model"]["fingerprint"] and m["dtype"] == "float32" and m["layers"] == [0]
    recs = store_records(out)
    assert sorted(recs) == keys
    for k in (keys[0], keys[1]):  # one of each image shape
        want = direct_features(tmp_path / "data" / k)
        got = recs[k].features
        assert got.shape == (1, *want.shape[1:]) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert recs[k].meta["source"]["size"] == (tmp_path / "data" / k).stat().st_size
    # The shard list in the manifest matches the files, with real sha256 values.
    assert [s["name"] for s in m["shards"]] == list_shards(out / "shards")


def test_shards_readable_by_tarfile_and_webdataset(tmp_path):
    keys = make_images(tmp_path / "d", 9)
    assert run_inproc(*build_args(tmp_path / "d", "--shard-size", "60KB")).returncode == 0
    shards = list_shards(tmp_path / "d" / "vggt_featstore" / "shards")
    assert len(shards) > 1, "shard-size rollover did not happen"
    urls = [str(tmp_path / "d" / "vggt_featstore" / "shards" / s) for s in shards]
    seen = []
    for u in urls:
        with tarfile.open(u) as t:
            seen += [key_from_member(n) for n in t.getnames()]
    assert sorted(seen) == keys
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert sorted(decode_record(s["fsr"]).key for s in samples) == keys
    assert all(set(s) >= {"__key__", "fsr"} for s in samples)


def test_build_jsonl_and_json_sources(tmp_path):
    root = tmp_path / "d"
    keys = make_images(root, 8)
    write_jsonl(root / "train.jsonl", [{"images": keys[:3]}, {"image": keys[3]},
                                       {"history_images": keys[4:6], "current_image": keys[6]},
                                       {"images": ["ep9/missing.png"]}])
    r = run_inproc(*build_args(root, "--annotations", str(root / "train.jsonl")))
    assert r.returncode == 0, r.stderr
    m = read_manifest(root / "vggt_featstore" / "manifest.json")
    assert m["processed_images"] == 7 and m["counts"]["missing"] == 1
    (root / "ann").mkdir()
    (root / "ann" / "annotations.json").write_text(json.dumps([{"images": [f"../{keys[7]}"]}]))
    r = run_inproc(*build_args(root, "--annotations", str(root / "ann" / "annotations.json"), "--out", str(tmp_path / "o2")))
    assert r.returncode == 0, r.stderr
    assert sorted(store_records(tmp_path / "o2")) == [keys[7]]


def test_build_sample_set_both_formats(tmp_path):
    data = copy_sample(tmp_path / "sample")
    r = run_inproc(*build_args(data, "--format", "per-image"))
    assert r.returncode == 0, r.stderr
    m = read_manifest(data / "vggt_cache_manifest.json")
    for k in ("total_images", "processed_images", "vggt_model_path", "data_root", "cache_format"):
        assert k in m
    assert m["cache_format"] == "<image_path>.vggt_cache.pt" and m["processed_images"] == m["total_images"] > 0
    caches = sorted(data.rglob("*.vggt_cache.pt"))
    assert len(caches) == m["total_images"]
    obj = torch.load(caches[0], weights_only=True)
    assert obj["features"].shape[0] == 1 and obj["features"].shape[-1] == 128 and isinstance(obj["path"], str)
    assert read_pt(caches[0]).features.equal(obj["features"])
    # Each file holds its own image's tensor only, not the batch it was computed in.
    assert caches[0].stat().st_size < obj["features"].nbytes + 64 * 1024
    r = run_inproc(*build_args(data))
    assert r.returncode == 0, r.stderr
    shards = store_records(data / "vggt_featstore")
    assert len(shards) == len(caches)
    for c in caches:
        rec = read_pt(c)
        assert torch.equal(shards[rec.key].features, rec.features)


def test_resume_is_noop_and_rebuilds_missing(tmp_path):
    make_images(tmp_path / "d", 6)
    assert run_inproc(*build_args(tmp_path / "d")).returncode == 0
    r = run_inproc(*build_args(tmp_path / "d"))
    assert r.returncode == 0 and "skipped 6" in r.stderr and "processed 0" in r.stderr
    assert "model not loaded" in r.stderr
    # Other settings are refused rather than mixed into the store.
    r = run_inproc(*build_args(tmp_path / "d", "--dtype", "bfloat16"))
    assert r.returncode == 2 and "built with other settings" in r.stderr and "dtype" in r.stderr, r.stderr
    out = tmp_path / "d" / "vggt_featstore"
    before = store_records(out)
    for s in list_shards(out / "shards"):
        (out / "shards" / s).unlink()
    r = run_inproc(*build_args(tmp_path / "d"))
    assert r.returncode == 0 and "processed 6" in r.stderr
    after = store_records(out)
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k].features, before[k].features) for k in before)


def test_rebuild_stale_and_no_skip_existing(tmp_path):
    keys = make_images(tmp_path / "d", 5)
    assert run_inproc(*build_args(tmp_path / "d")).returncode == 0
    p = tmp_path / "d" / keys[2]
    from PIL import Image

    Image.new("RGB", (70, 56), (200, 10, 10)).save(p)
    os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    r = run_inproc(*build_args(tmp_path / "d", "--rebuild-stale"))
    assert r.returncode == 0 and "stale rebuilt 1" in r.stderr and "processed 1" in r.stderr, r.stderr
    recs = store_records(tmp_path / "d" / "vggt_featstore")
    torch.testing.assert_close(recs[keys[2]].features, direct_features(p), atol=1e-5, rtol=0)
    r = run_inproc(*build_args(tmp_path / "d", "--no-skip-existing"))
    assert r.returncode == 0 and "processed 5" in r.stderr
    out = tmp_path / "d" / "vggt_featstore"
    assert len(Index(out / "index.fsi")) == 5
    # Fully superseded shards were removed; every remaining shard holds only live records.
    assert sum(s["records"] for s in read_manifest(out / "manifest.json")["shards"]) == 5


def test_bad_images_are_recorded_not_fatal(tmp_path):
    keys = make_images(tmp_path / "d", 4)
    (tmp_path / "d" / "zero.jpg").write_bytes(b"")
    (tmp_path / "d" / "text.png").write_text("not an image")
    good = (tmp_path / "d" / keys[0]).read_bytes()
    (tmp_path / "d" / "trunc.png").write_bytes(good[: len(good) // 3])
    r = run_inproc(*build_args(tmp_path / "d"))
    assert r.returncode == 1, r.stderr
    out = tmp_path / "d" / "vggt_featstore"
    ledger = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["key"] for f in ledger) == ["text.png", "trunc.png", "zero.jpg"]
    assert all(f["error"] for f in ledger)
    m = read_manifest(out / "manifest.json")
    assert m["counts"]["failed"] == 3 and m["processed_images"] == 4
    r = run_inproc(*build_args(tmp_path / "d", "--allow-failures", "3"))
    assert r.returncode == 0, r.stderr


def test_missing_model_and_no_images(tmp_path):
    make_images(tmp_path / "d", 1)
    r = run_inproc("build", "--data-root", str(tmp_path / "d"), "--model", str(tmp_path / "nope"), "--device", "cpu")
    assert r.returncode == 2
    assert f"[ERROR] --model {tmp_path / 'nope'} not found" in r.stderr
    (tmp_path / "empty").mkdir()
    r = run_inproc(*build_args(tmp_path / "empty"))
    assert r.returncode == 1 and "[WARN] No images found!" in r.stderr and str(tmp_path / "empty") in r.stderr


def test_environment_defaults(tmp_path):
    make_images(tmp_path / "d", 3)
    env = {"VGGT_MODEL_PATH": "tiny", "DATA_ROOT": str(tmp_path / "d"), "BATCH_SIZE": "2", "DEVICE": "cuda:0",
           "SKIP_EXISTING": "true"}
    r = run_inproc("build", "--no-progress", "--num-workers", "0", "--format", "per-image", env=env)
    assert r.returncode == 0, r.stderr
    if not torch.cuda.is_available():
        assert "falling back to cpu" in r.stderr
    assert len(list((tmp_path / "d").rglob("*.vggt_cache.pt"))) == 3


def test_several_layers_and_all_tokens(tmp_path):
    keys = make_images(tmp_path / "d", 2)
    r = run_inproc(*build_args(tmp_path / "d", "--layers=-1,0", "--tokens", "all", "--dtype", "bfloat16"))
    assert r.returncode == 0, r.stderr
    rec = store_records(tmp_path / "d" / "vggt_featstore")[keys[0]]
    assert list(rec.tensors) == ["features", "layer_0"] and rec.meta["layers"] == {"features": 1, "layer_0": 0}
    h, w = rec.meta["image_size"]
    assert rec.features.dtype == torch.bfloat16 and rec.features.shape[1] == 5 + (h // 14) * (w // 14)


@pytest.mark.slow  # real torchrun processes (about 6 s)
def test_torchrun_two_ranks(tmp_path):
    keys = make_images(tmp_path / "d", 11)
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "featstore", *build_args(tmp_path / "d")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "d" / "vggt_featstore"
    shards = list_shards(out / "shards")
    assert {s.split("-")[1] for s in shards} == {"00000", "00001"}, shards
    m = read_manifest(out / "manifest.json")
    assert m["world_size"] == 2 and m["processed_images"] == 11 and m["complete"]
    assert sorted(store_records(out)) == keys
    assert not (out / "parts").exists()


def test_job_array_parts_then_merge(tmp_path):
    keys = make_images(tmp_path / "d", 7)
    for part in ("0", "1"):
        r = run_inproc(*build_args(tmp_path / "d", "--num-parts", "2", "--part", part))
        assert r.returncode == 0, r.stderr
    r = run_inproc("merge", str(tmp_path / "d" / "vggt_featstore"))
    assert r.returncode == 0, r.stderr
    r = run_inproc("merge", str(tmp_path / "not-a-store"))
    assert r.returncode == 2 and "is not a featstore store" in r.stderr and not (tmp_path / "not-a-store").exists()
    assert sorted(store_records(tmp_path / "d" / "vggt_featstore")) == keys


@pytest.mark.slow  # chaos: SIGKILL at each point, then resume (about 5 s each, real processes)
@pytest.mark.parametrize("point", ["record-appended:3", "shard-before-rename:1", "shard-after-rename:2",
                                   "part-index-written", "merge-before-index", "merge-before-manifest",
                                   "merge-before-cleanup", "atomic-before-rename:3"])
def test_sigkill_then_resume_shards(tmp_path, point):
    keys = make_images(tmp_path / "d", 9)
    args = build_args(tmp_path / "d", "--shard-size", "60KB")
    r = run_cli(*args, env={"FEATSTORE_KILL_AT": point})
    assert r.returncode == -9, f"expected SIGKILL at {point}: {r.returncode} {r.stderr[-2000:]}"
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "d" / "vggt_featstore"
    recs = store_records(out)
    assert sorted(recs) == keys
    # No torn or duplicate data: every member of every shard decodes, and each key is stored once.
    members = []
    for s in list_shards(out / "shards"):
        members += [decode_record(x["fsr"]).key for x in wds.WebDataset(str(out / "shards" / s), shardshuffle=False)]
    assert sorted(members) == keys
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]
    m = read_manifest(out / "manifest.json")
    assert m["processed_images"] == 9 and m["complete"]


@pytest.mark.slow  # chaos: SIGKILL, then resume (real processes)
@pytest.mark.parametrize("point", ["per-image-written:2", "atomic-before-rename:3"])
def test_sigkill_then_resume_per_image(tmp_path, point):
    keys = make_images(tmp_path / "d", 6)
    args = build_args(tmp_path / "d", "--format", "per-image")
    assert run_cli(*args, env={"FEATSTORE_KILL_AT": point}).returncode == -9
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    caches = sorted(str(p.relative_to(tmp_path / "d"))[: -len(".vggt_cache.pt")]
                    for p in (tmp_path / "d").rglob("*.vggt_cache.pt"))
    assert caches == keys
    for k in keys:
        read_pt(tmp_path / "d" / f"{k}.vggt_cache.pt")
    assert not [p for p in (tmp_path / "d").rglob(".*") if ".tmp-" in p.name]
