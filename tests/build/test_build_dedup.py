"""Deduplicated samples (both context modes): samples with the same ordered frames and reference frame are
computed and stored once, every annotation id maps to that record (aliases.fsi), local and remote stores."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import make_images, run_inproc, write_jsonl
from featstore import open_store
from featstore.formats.manifest import read_manifest


def scannet_like(root) -> list[str]:
    """Many questions on one scene (one frame list), and another frame list asked twice, once without an id."""
    keys = make_images(root, 3, per_dir=3, size=(56, 56))  # square: every frame one size
    write_jsonl(root / "train.jsonl", [
        *({"id": f"q{i}", "images": keys, "question": f"where is object {i}?"} for i in range(3)),
        {"id": "q3", "images": keys[:2]}, {"images": keys[:2]}])
    return keys


def args(root, out, context, *extra):
    return ["build", "--data-root", str(root), "--out", str(out), "--model", "tiny", "--device", "cpu",
            "--no-progress", "--num-workers", "0", "--image-size", "56", "--context", context, *extra]


@pytest.mark.parametrize("context", ["sample", "joint"])
def test_samples_with_the_same_frames_are_stored_once_and_every_id_finds_the_record(tmp_path, context):
    keys = scannet_like(tmp_path / "d")
    r = run_inproc(*args(tmp_path / "d", tmp_path / "s", context))
    assert r.returncode == 0, r.stderr
    assert "2 records for 5 samples" in r.stderr
    store = open_store(tmp_path / "s")
    assert len(store) == 2 and read_manifest(tmp_path / "s" / "manifest.json")["processed_images"] == 2
    scene = store.get_sample(keys)
    for i in range(3):
        assert torch.equal(store.get_sample(id=f"q{i}"), scene)
    assert torch.equal(store.get_sample(id="q3"), store.get_sample(keys[:2]))
    assert store.get_sample(id="nope") is None
    assert scene.shape[0] == (3 if context == "joint" else 1)
    assert run_inproc("verify", str(tmp_path / "s")).returncode == 0


@pytest.mark.slow
def test_a_remote_sample_store_writes_its_alias_index(tmp_path, monkeypatch):
    from s3server import new_bucket, s3_server

    keys = scannet_like(tmp_path / "d")
    server = s3_server()
    url = f"s3://{new_bucket(server)}/store"
    opts = json.dumps(server.storage_options())
    monkeypatch.setenv("FEATSTORE_STAGING_DIR", str(tmp_path / "staging"))
    r = run_inproc(*args(tmp_path / "d", url, "joint", "--storage-options", opts, "--no-fsync"))
    assert r.returncode == 0, r.stderr
    store = open_store(url, storage_options=server.storage_options())
    assert torch.equal(store.get_sample(id="q1"), store.get_sample(keys))
    assert torch.equal(store.get_sample(id="q3"), store.get_sample(keys[:2]))
