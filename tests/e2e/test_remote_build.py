"""Building stores on object storage (`featstore build --out s3://...`) against a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from featstore.cli.main import main
from featstore.errors import LockError
from featstore.storage import parse_location
from featstore.build.locks import StorageLock
from featstore.read import open_store, stream
from s3server import ACCESS_KEY, SECRET, new_bucket, s3_server
from helpers import REPO_ROOT, copy_images

TINY = ["--model", "tiny", "--device", "cpu", "--no-progress", "--num-workers", "0", "--writer-threads", "1",
        "--no-fsync", "--batch-size", "4"]


def build_cli(data: Path, out: str, *extra: str) -> int:
    return main(["build", "--data-root", str(data), "--out", out, *TINY, *extra])


def objects(url: str, options: dict) -> dict[str, bytes]:
    """Every object under ``url`` (recursively): relative name -> bytes."""
    st = parse_location(url, options)
    fs, root = st.fs, st.root
    fs.invalidate_cache()
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return copy_images(tmp_path_factory.mktemp("remote-images") / "data")


@pytest.fixture(scope="module")
def local_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-build")
    data = copy_images(root / "data")
    assert build_cli(data, str(root / "local"), "--shard-size", "1500KB") == 0
    return data, root / "local"


@pytest.mark.slow
def test_build_to_s3_matches_local_publishes_last_and_resumes(local_build, monkeypatch, tmp_path):
    data, local = local_build
    server = s3_server()
    bucket = new_bucket(server)
    url = f"s3://{bucket}/stores/a"
    opts = json.dumps(server.storage_options())
    monkeypatch.setenv("FEATSTORE_STAGING_DIR", str(tmp_path / "staging"))
    mark = server.mark()
    assert build_cli(data, url, "--shard-size", "1500KB", "--storage-options", opts) == 0
    puts = [r.path.split("/stores/a/", 1)[1] for r in server.since(mark, bucket) if r.method in ("PUT", "POST")]
    shard_puts = [i for i, p in enumerate(puts) if p.startswith("shards/")]
    assert shard_puts and puts.index("index.fsi") > max(shard_puts)  # index after every shard
    assert puts.index("manifest.json") > puts.index("index.fsi")  # manifest last
    names = set(objects(url, server.storage_options()))
    assert {"index.fsi", "manifest.json", "build.json"} <= names
    assert not any(n.startswith("parts/") or ".featstore.lock" in n or ".tmp-" in n for n in names), names
    assert not any((tmp_path / "staging").rglob("*.tar"))  # staging emptied

    remote, want = open_store(url, storage_options=server.storage_options()), open_store(local)
    assert remote.keys() == want.keys() and len(remote) == 12
    for k in want.keys():
        a, b = remote.record(k), want.record(k)
        assert a.meta == b.meta and all(torch.equal(a.tensors[n], b.tensors[n]) for n in b.tensors)
    assert main(["verify", url, "--storage-options", opts, "--no-progress", "--workers", "1"]) == 0

    # Resume: nothing left to build, no shard uploaded again.
    mark = server.mark()
    assert build_cli(data, url, "--shard-size", "1500KB", "--storage-options", opts) == 0
    again = [r.path for r in server.since(mark, bucket) if r.method == "PUT" and "/shards/" in r.path]
    assert again == []
    assert open_store(url, storage_options=server.storage_options()).keys() == want.keys()


def test_second_builder_is_refused_by_a_conditional_write(images, capsys):
    data = images
    server = s3_server()
    url = f"s3://{new_bucket(server)}/s"
    st = parse_location(url, server.storage_options())
    first = StorageLock(st)
    first.acquire()
    with pytest.raises(LockError, match="another featstore job is writing"):
        StorageLock(st).acquire()
    first.release()
    assert not st.exists(".featstore.lock")
    # A live builder on another host holds the lock: the CLI exits 2 and names the lock object.
    st.publish_bytes(".featstore.lock", json.dumps({"host": "node-7", "pid": 4242, "started": "x"}).encode())
    assert build_cli(data, url, "--storage-options", json.dumps(server.storage_options())) == 2
    err = capsys.readouterr().err
    assert "node-7" in err and f"{url}/.featstore.lock" in err and SECRET not in err
    assert not any(n.startswith("shards/") for n in objects(url, server.storage_options()))


@pytest.mark.slow
def test_two_parts_without_a_shared_folder_merge_into_one_remote_store(local_build, monkeypatch, tmp_path):
    data, local = local_build
    server = s3_server()
    url = f"s3://{new_bucket(server)}/parts-store"
    opts = json.dumps(server.storage_options())
    for part in (0, 1):  # each part on its "own machine": its own staging folder
        monkeypatch.setenv("FEATSTORE_STAGING_DIR", str(tmp_path / f"node{part}"))
        assert build_cli(data, url, "--num-parts", "2", "--part", str(part), "--shard-size", "1500KB",
                         "--storage-options", opts) == 0
    names = objects(url, server.storage_options())
    assert {"parts/rank-00000.json", "parts/rank-00001.json"} <= set(names)
    assert all(SECRET.encode() not in blob and ACCESS_KEY.encode() not in blob for blob in names.values())
    assert main(["merge", url, "--storage-options", opts]) == 0
    store = open_store(url, storage_options=server.storage_options())
    assert store.keys() == open_store(local).keys()
    assert store.manifest["complete"] and store.manifest["parts"] == [0, 1]
    assert sorted(s["key"] for s in stream(url, storage_options=server.storage_options())) == store.keys()
    assert not any(n.startswith("parts/") for n in objects(url, server.storage_options()))
    assert main(["verify", url, "--storage-options", opts, "--no-progress", "--workers", "1"]) == 0


@pytest.mark.slow
def test_secrets_never_reach_any_object_log_or_output(local_build, monkeypatch, tmp_path, capfd):
    data, _ = local_build
    server = s3_server()
    url = f"s3://{new_bucket(server)}/secret-check"
    opts_file = tmp_path / "opts.json"
    opts_file.write_text(json.dumps(server.storage_options()))
    monkeypatch.setenv("FEATSTORE_STAGING_DIR", str(tmp_path / "staging"))
    assert build_cli(data, url, "--shard-size", "1500KB", "--storage-options", f"@{opts_file}") == 0
    report = tmp_path / "report.json"
    assert main(["verify", url, "--storage-options", f"@{opts_file}", "--json", str(report), "--no-progress"]) == 0
    out = tmp_path / "exported"
    assert main(["export", url, "--format", "per-image", "--out", str(out), "--storage-options", f"@{opts_file}"]) == 0
    captured = capfd.readouterr()
    texts = {"stdout": captured.out.encode(), "stderr": captured.err.encode(), "report": report.read_bytes()}
    texts.update(objects(url, server.storage_options()))
    texts.update({str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    texts.update({str(p): p.read_bytes() for p in (tmp_path / "staging").rglob("*") if p.is_file()})
    assert len(texts) > 10
    for name, blob in texts.items():
        assert SECRET.encode() not in blob, name
        assert ACCESS_KEY.encode() not in blob, name


@pytest.mark.slow
def test_sigkill_mid_upload_then_resume_every_record_once(local_build, tmp_path):
    """A real SIGKILL while a shard's multipart upload is in flight: no object appears, resume completes."""
    data, local = local_build
    server = s3_server()
    bucket = new_bucket(server)
    url = f"s3://{bucket}/killed"
    options = dict(server.storage_options(), default_block_size=256 << 10)  # multipart parts of 256 KiB
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "FEATSTORE_STAGING_DIR": str(tmp_path / "staging")}
    args = [sys.executable, "-m", "featstore", "build", "--data-root", str(data), "--out", url, *TINY,
            "--shard-size", "1500KB", "--storage-options", json.dumps(options)]
    server.slow_part_uploads = 0.5
    mark = server.mark()
    proc = subprocess.Popen(args, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not any("partNumber=2" in r.query for r in server.since(mark, bucket)):
            assert time.time() < deadline and proc.poll() is None, "the build never reached a multipart upload"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        server.slow_part_uploads = 0.0
        if proc.poll() is None:
            proc.kill()
    uploading = [r.path for r in server.since(mark, bucket) if "partNumber=2" in r.query][0]
    shard = uploading.split(f"/{bucket}/killed/", 1)[1]
    names = objects(url, server.storage_options())
    assert shard not in names and "manifest.json" not in names and "index.fsi" not in names
    for name, blob in names.items():  # whatever is there is complete
        if name.startswith("shards/"):
            assert blob.endswith(b"\0" * 1024)

    fs = parse_location(url, server.storage_options()).fs
    assert any(u["Key"] == f"killed/{shard}" for u in fs.list_multipart_uploads(bucket))  # unfinished, invisible

    r = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "aborted 1 unfinished shard uploads" in r.stderr
    assert fs.list_multipart_uploads(bucket) == []
    store = open_store(url, storage_options=server.storage_options())
    assert store.keys() == open_store(local).keys()
    assert sorted(s["key"] for s in stream(url, storage_options=server.storage_options())) == store.keys()
    assert main(["verify", url, "--storage-options", json.dumps(server.storage_options()), "--no-progress",
                 "--workers", "1"]) == 0


def test_url_output_needs_the_shard_layout(images, capsys):
    data = images
    server = s3_server()
    url = f"s3://{new_bucket(server)}/pi"
    assert build_cli(data, url, "--format", "per-image", "--storage-options", json.dumps(server.storage_options())) == 2
    err = capsys.readouterr().err
    assert "needs --format shards" in err and "Traceback" not in err
    assert objects(url, server.storage_options()) == {}
