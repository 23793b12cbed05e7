"""Reading stores on object storage: open_store / stream / DataLoader workers against a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featstore.errors import StoreError
from featstore.storage import parse_location
from featstore.read import open_store, stream
from s3server import SECRET, new_bucket, s3_server
from helpers import REPO_ROOT, build, copy_images


def upload_store(local: Path, url: str, options: dict) -> None:
    """Copy a finished local shard store to ``url``, shards first and the manifest last (as a build does)."""
    dest = parse_location(url, options)
    names = sorted(p.relative_to(local).as_posix() for p in (local / "shards").glob("*.tar"))
    for name in names + ["index.fsi", "manifest.json"]:
        dest.publish_file(name, local / name)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """A local store (a few shards of several records) and the same store uploaded to a fresh bucket."""
    root = tmp_path_factory.mktemp("remote-read")
    data = copy_images(root / "data")
    build(data, "--out", str(root / "store"), "--shard-size", "1500KB")
    server = s3_server()
    url = f"s3://{new_bucket(server)}/stores/few"
    upload_store(root / "store", url, server.storage_options())
    return root / "store", url, server


def test_open_store_s3_matches_local_with_one_ranged_get_per_record(remote):
    local_path, url, server = remote
    local = open_store(local_path)
    bucket = url.split("/")[2]
    mark = server.mark()
    store = open_store(url, storage_options=server.storage_options())
    opening = server.since(mark, bucket)
    assert sum(r.method == "GET" and r.path.endswith("/index.fsi") for r in opening) == 1
    assert store.keys() == local.keys() and len(store) == 12 and store.layout == "shards"
    assert store.root == url and SECRET not in repr(store.storage)
    for k in local.keys():
        mark = server.mark()
        got = store[k]
        reqs = server.since(mark, bucket)
        assert len(reqs) == 1 and reqs[0].method == "GET" and reqs[0].range is not None, reqs
        assert "/shards/" in reqs[0].path
        assert torch.equal(got, local[k])
        rec, want = store.record(k), local.record(k)
        assert rec.meta == want.meta and all(torch.equal(rec.tensors[n], want.tensors[n]) for n in want.tensors)
    mark = server.mark()
    assert "nope.jpg" not in store and store.get("nope.jpg") is None
    assert server.since(mark, bucket) == []  # misses are answered by the cached index alone


def test_stream_s3_same_records_as_local_across_chunk_boundaries(remote):
    local_path, url, server = remote
    want = {s["key"]: s["features"] for s in stream(local_path, shuffle=False)}
    for chunk, read_ahead in ((8 << 20, 2), (100_000, 3), (77_777, 0)):
        ds = stream(url, shuffle=False, storage_options=server.storage_options(), read_ahead=read_ahead)
        ds.chunk_bytes = chunk
        got = list(ds)
        assert [s["key"] for s in got] == list(want)
        assert all(torch.equal(s["features"], want[s["key"]]) for s in got)


def test_stream_s3_reads_whole_shards_in_few_requests(remote):
    local_path, url, server = remote
    bucket = url.split("/")[2]
    n_shards = len(list((local_path / "shards").glob("*.tar")))
    assert 1 < n_shards < 12
    ds = stream(url, shuffle=True, seed=3, storage_options=server.storage_options())
    mark = server.mark()
    assert len(list(ds)) == 12
    gets = [r for r in server.since(mark, bucket) if r.method == "GET"]
    assert len(gets) == n_shards and all(r.range is not None and "/shards/" in r.path for r in gets)  # one per shard


def test_stream_s3_dataloader_workers_each_record_once(remote):
    local_path, url, server = remote
    ds = stream(url, seed=1, epoch=4, shuffle_buffer=2, storage_options=server.storage_options())
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = [s["key"] for s in dl]
    assert sorted(keys) == open_store(local_path).keys()


def test_remote_store_errors_are_actionable_and_redacted(remote):
    _, url, server = remote
    missing = url.rsplit("/", 1)[0] + "/no-such-store"
    with pytest.raises(StoreError) as e:
        open_store(missing, storage_options=server.storage_options())
    assert "no featstore manifest at" in str(e.value) and missing in str(e.value) and SECRET not in str(e.value)
    with pytest.raises(StoreError):
        stream(missing, storage_options=server.storage_options())


@pytest.mark.slow
def test_local_use_imports_no_fsspec_and_env_credentials_reach_s3(remote):
    """One fresh process: a local store is served without importing fsspec; then the standard AWS
    environment alone (no storage_options) reaches the remote store."""
    local_path, url, server = remote
    code = ("import sys, featstore\n"
            "s = featstore.open_store(sys.argv[1]); s[s.keys()[0]]\n"
            "assert len(list(featstore.stream(sys.argv[1]))) == 12\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'botocore', 'aiobotocore')]\n"
            "assert not bad, bad\n"
            "r = featstore.open_store(sys.argv[2]); r[r.keys()[0]]\n"
            "print(len(r), len(list(featstore.stream(sys.argv[2], shuffle=False))))\n")
    env = {**os.environ, **server.env(), "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([sys.executable, "-c", code, str(local_path), url], capture_output=True, text=True, env=env,
                       cwd=REPO_ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["12", "12"] and SECRET not in r.stdout + r.stderr


def cli(*args: str) -> int:
    from featstore.cli.main import main

    return main(list(args))


def test_verify_s3_clean_and_corrupted(remote, tmp_path, capsys):
    local_path, url, server = remote
    opts = json.dumps(server.storage_options())
    rc = cli("verify", url, "--storage-options", opts, "--json", str(tmp_path / "ok.json"), "--no-progress",
             "--workers", "2")
    report = json.loads((tmp_path / "ok.json").read_text())
    assert rc == 0 and report["ok"] and report["problems"] == [], report
    assert report["counts"]["records_found"] == 12 and report["counts"]["shards_on_disk"] > 1

    # A second copy with one flipped byte inside a record's payload.
    bad_url = f"s3://{new_bucket(server)}/bad"
    upload_store(local_path, bad_url, server.storage_options())
    store = open_store(local_path)
    victim = store.index.get(store.keys()[5])
    shard = f"shards/{victim.shard}"
    data = bytearray((local_path / shard).read_bytes())
    data[victim.offset + victim.length // 2] ^= 0xFF
    parse_location(bad_url, server.storage_options()).publish_bytes(shard, bytes(data))
    rc = cli("verify", bad_url, "--storage-options", opts, "--json", str(tmp_path / "bad.json"), "--no-progress",
             "--workers", "1")
    report = json.loads((tmp_path / "bad.json").read_text())
    kinds = {(p["kind"], p["key"]) for p in report["problems"]}
    assert rc == 1 and ("shard", victim.shard) in kinds  # sha256 differs from the manifest
    assert any(k == victim.key for _, k in kinds)  # the damaged record itself is named
    out = capsys.readouterr()
    for text in (out.out, out.err, (tmp_path / "ok.json").read_text(), (tmp_path / "bad.json").read_text()):
        assert SECRET not in text


def test_export_s3_to_per_image_is_bit_exact_with_local(remote, tmp_path):
    local_path, url, server = remote
    assert cli("export", str(local_path), "--format", "per-image", "--out", str(tmp_path / "from-local")) == 0
    assert cli("export", url, "--format", "per-image", "--out", str(tmp_path / "from-s3"),
               "--storage-options", json.dumps(server.storage_options())) == 0
    a = {p.relative_to(tmp_path / "from-local"): p.read_bytes() for p in (tmp_path / "from-local").rglob("*.pt")}
    b = {p.relative_to(tmp_path / "from-s3"): p.read_bytes() for p in (tmp_path / "from-s3").rglob("*.pt")}
    assert len(a) == 12 and a == b
    assert SECRET not in (tmp_path / "from-s3" / "vggt_cache_manifest.json").read_text()


def test_bad_storage_options_are_one_error_line_without_the_value(remote, tmp_path, capsys):
    _, url, _ = remote
    assert cli("verify", url, "--storage-options", '{"secret": "cli-secret-31337"', "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--storage-options" in err and "cli-secret-31337" not in err and "Traceback" not in err


@pytest.mark.slow
def test_torchrun_two_ranks_two_workers_stream_s3_each_record_once(remote, tmp_path):
    """Real torchrun, 2 gloo ranks x 2 DataLoader workers, credentials and endpoint from the environment."""
    local_path, url, server = remote
    env = {**os.environ, **server.env(), "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO_ROOT / "tests" / "ddp_worker.py"), url, str(tmp_path), "7", "2"]
    r = subprocess.run(cmd, env=env, timeout=180, cwd=REPO_ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    union = ranks[0]["keys"] + ranks[1]["keys"]
    assert sorted(union) == open_store(local_path).keys()  # every record exactly once
    assert all(r["keys"] and len(r["keys"]) == r["len"] for r in ranks)
    assert SECRET not in r.stdout + r.stderr


@pytest.mark.slow
def test_loader_bench_object_storage_section_runs():
    """benchmarks/loader_bench.py --s3-local end to end (a smoke run, not a measurement)."""
    r = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "loader_bench.py"), "--quick", "--codecs", "zstd",
                        "--s3-local"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "5a. open_store from s3://" in r.stdout and "S3 requests per random-access record: 1.0" in r.stdout
    assert SECRET not in r.stdout + r.stderr
