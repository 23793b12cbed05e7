"""The local shard cache of remote stores (stream(url, cache_dir=..., cache_limit=...)) against a real S3 server."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from featstore.formats.locate import locate_store
from featstore.read import open_store, stream
from featstore.read.cache import ShardCache, cache_limit_bytes
from featstore.storage import parse_location
from featstore.errors import StoreError
from s3server import new_bucket, s3_server
from helpers import REPO_ROOT

OLD = Path(__file__).resolve().parents[1] / "data" / "stores"


def upload(local: Path, url: str, options: dict, strip_sha: bool = False) -> None:
    """Publish a local shard store at ``url``: shards, index, then the manifest (optionally without shard sha256s)."""
    dest = parse_location(url, options)
    for p in sorted((local / "shards").glob("*.tar")):
        dest.publish_file(f"shards/{p.name}", p)
    dest.publish_file("index.fsi", local / "index.fsi")
    m = json.loads((local / "manifest.json").read_text())
    if strip_sha:
        m["shards"] = [{k: v for k, v in s.items() if k != "sha256"} for s in m["shards"]]
    dest.publish_bytes("manifest.json", json.dumps(m).encode())


@pytest.fixture
def remote(tmp_path):
    server = s3_server()
    bucket = new_bucket(server)
    url = f"s3://{bucket}/store"
    upload(OLD / "shards_zstd", url, server.storage_options())
    return url, bucket, server


def shard_gets(server, mark, bucket):
    return [r for r in server.since(mark, bucket) if r.method == "GET" and "/shards/" in r.path]


def features(ds) -> dict[str, torch.Tensor]:
    return {s["key"]: s["features"] for s in ds}


def test_second_epoch_reads_no_shard_from_the_bucket(remote, tmp_path):
    url, bucket, server = remote
    want = {k: open_store(OLD / "shards_zstd")[k] for k in open_store(OLD / "shards_zstd").keys()}
    ds = stream(url, seed=1, storage_options=server.storage_options(), cache_dir=tmp_path / "cache")
    mark = server.mark()
    first = features(ds.loader(num_workers=2))
    assert len(shard_gets(server, mark, bucket)) == 3  # each shard downloaded once, whole
    ds.set_epoch(1)
    mark = server.mark()
    second = features(ds.loader(num_workers=2))
    assert shard_gets(server, mark, bucket) == []
    assert first.keys() == second.keys() == want.keys()
    assert all(torch.equal(first[k], want[k]) and torch.equal(second[k], want[k]) for k in want)
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.tar")) == sorted(
        f"sha256-{s['sha256']}.tar" for s in json.loads((OLD / "shards_zstd" / "manifest.json").read_text())["shards"])


@pytest.mark.slow
def test_two_processes_share_one_cache(remote, tmp_path):
    url, bucket, server = remote
    script = ("import json, sys, hashlib; from featstore.read import stream\n"
              "ds = stream(sys.argv[1], seed=int(sys.argv[2]), storage_options=json.loads(sys.argv[3]), "
              "cache_dir=sys.argv[4])\n"
              "print(json.dumps({s['key']: hashlib.sha256(s['features'].view(-1).view(__import__('torch').uint8)"
              ".numpy().tobytes()).hexdigest() for s in ds}))\n")
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{REPO_ROOT / 'tests'}")
    mark = server.mark()
    procs = [subprocess.Popen([sys.executable, "-c", script, url, str(seed), json.dumps(server.storage_options()),
                               str(tmp_path / "cache")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    a, b = (json.loads(o[0]) for o in outs)
    assert a == b and len(a) == 12
    gets = shard_gets(server, mark, bucket)
    assert sorted(r.path.rsplit("/", 1)[-1] for r in gets) == [f"vggt-00000-00000{i}.tar" for i in range(3)]


def test_a_corrupt_cached_shard_is_detected_and_fetched_again(remote, tmp_path, caplog):
    url, bucket, server = remote
    cache = tmp_path / "cache"
    want = features(stream(OLD / "shards_zstd", seed=1))
    features(stream(url, seed=1, storage_options=server.storage_options(), cache_dir=cache))
    victim = sorted(cache.glob("*.tar"))[0]
    data = bytearray(victim.read_bytes())
    data[2000] ^= 0xFF  # inside the first record's payload: same size, wrong bytes
    victim.write_bytes(bytes(data))
    mark = server.mark()
    with caplog.at_level(logging.WARNING, logger="featstore"):
        got = features(stream(url, seed=1, storage_options=server.storage_options(), cache_dir=cache))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert len(shard_gets(server, mark, bucket)) == 1  # only the corrupt shard, once
    assert sum("is corrupt" in r.getMessage() for r in caplog.records) == 1
    assert victim.read_bytes() != bytes(data)  # replaced by a good copy


def test_eviction_keeps_the_cache_under_its_limit(remote, tmp_path):
    url, bucket, server = remote
    cache = tmp_path / "cache"
    got = features(stream(url, seed=1, storage_options=server.storage_options(), cache_dir=cache,
                          cache_limit="45KB"))  # room for two of the three shards (20480 + 20480 + 10240 bytes)
    assert len(got) == 12
    sizes = [p.stat().st_size for p in cache.glob("*.tar")]
    assert sum(sizes) <= 45_000 and len(sizes) == 2


def test_a_shard_a_reader_holds_is_never_evicted(remote, tmp_path):
    url, _, server = remote
    loc = locate_store(url, server.storage_options())
    cache = ShardCache(tmp_path / "cache", None, loc.manifest, url)
    (tmp_path / "cache").mkdir()
    held = cache.open("vggt-00000-000000.tar", loc.storage)
    other = cache.open("vggt-00000-000001.tar", loc.storage)
    assert held is not None and other is not None
    other.close()
    cache.limit = 1
    cache.evict()
    assert held.path.is_file() and not other.path.exists()
    held.close()
    cache.evict()
    assert not held.path.exists()


def test_a_rebuilt_store_never_serves_old_bytes(tmp_path):
    server = s3_server()
    bucket = new_bucket(server)
    url = f"s3://{bucket}/store"
    opts = server.storage_options()
    for strip in (False, True):  # with the manifest's sha256 of each shard, and without
        cache = tmp_path / f"cache-{strip}"
        upload(OLD / "shards_zstd", url, opts, strip_sha=strip)
        assert features(stream(url, seed=1, storage_options=opts, cache_dir=cache)).keys()
        upload(OLD / "shards_int8", url, opts, strip_sha=strip)  # same URL and shard names, other bytes
        parse_location(url, opts).delete("shards/vggt-00000-000002.tar")
        want = features(stream(OLD / "shards_int8", seed=1))
        mark = server.mark()
        got = features(stream(url, seed=1, storage_options=opts, cache_dir=cache))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert len(shard_gets(server, mark, bucket)) == 2


def test_cache_settings_are_checked(remote, tmp_path, monkeypatch):
    url, _, server = remote
    assert cache_limit_bytes("200GB") == 200 * 10**9 and cache_limit_bytes("1.5KiB") == 1536
    with pytest.raises(StoreError, match="not a size"):
        stream(url, storage_options=server.storage_options(), cache_dir=tmp_path, cache_limit="lots")
    monkeypatch.setenv("FEATSTORE_CACHE_DIR", str(tmp_path / "env-cache"))
    ds = stream(url, storage_options=server.storage_options())
    assert ds.reading.cache is not None and len(features(ds)) == 12
    assert len(list((tmp_path / "env-cache").glob("*.tar"))) == 3
    assert stream(OLD / "shards_zstd").reading.cache is None  # a local store needs no cache
