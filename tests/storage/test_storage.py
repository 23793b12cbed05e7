"""featstore.storage on local folders and on a real S3-protocol server (moto, see tests/s3server.py)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from featstore.errors import StoreError
import featstore.storage as st
from s3server import SECRET, S3Server, new_bucket, s3_server

REPO = Path(__file__).resolve().parents[2]
PAYLOAD = bytes(range(256)) * 1000  # 256,000 bytes with a position-dependent pattern


@pytest.fixture
def s3() -> S3Server:
    return s3_server()


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> st.Storage:
    """The same contract on both backends: an empty store root."""
    if request.param == "local":
        return st.parse_location(tmp_path / "store")
    server = s3_server()
    return st.parse_location(f"s3://{new_bucket(server)}/some/prefix", server.storage_options())


def test_parse_location_kinds(tmp_path, s3):
    assert isinstance(st.parse_location(tmp_path), st.LocalStorage)
    assert isinstance(st.parse_location(str(tmp_path)), st.LocalStorage)
    f = st.parse_location(f"file://{tmp_path}")
    assert isinstance(f, st.LocalStorage) and f.local_path() == tmp_path
    r = st.parse_location("s3://bucket/a/b/", s3.storage_options())
    assert isinstance(r, st.FsspecStorage) and not r.is_local and r.atomic_create
    assert r.root == "bucket/a/b" and r.describe("x/y.tar") == "s3://bucket/a/b/x/y.tar"
    m = st.parse_location("memory://featstore-test-root")
    assert isinstance(m, st.FsspecStorage) and not m.atomic_create
    assert st.parse_location(r) is r
    assert not st.is_remote(tmp_path) and not st.is_remote(f"file://{tmp_path}") and st.is_remote("gs://b/p")


def test_unknown_protocol_is_an_actionable_error():
    s = st.parse_location("nosuchproto://bucket/x")
    with pytest.raises(StoreError, match="not a location fsspec knows"):
        s.exists("index.fsi")


def test_publish_read_range_list_exists(storage):
    storage.publish_bytes("shards/a.tar", PAYLOAD)
    storage.publish_bytes("index.fsi", b"idx")
    assert storage.exists("shards/a.tar") and not storage.exists("shards/b.tar")
    assert storage.size("shards/a.tar") == len(PAYLOAD)
    assert storage.read_bytes("index.fsi") == b"idx"
    assert storage.read_range("shards/a.tar", 1000, 4321) == PAYLOAD[1000:5321]
    assert storage.read_range("shards/a.tar", len(PAYLOAD) - 10, 10) == PAYLOAD[-10:]
    assert storage.list("shards") == {"shards/a.tar": len(PAYLOAD)}
    assert storage.list("") == {"index.fsi": 3}  # one level only
    assert storage.list("nothing-here") == {}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("missing.json")
    with pytest.raises(FileNotFoundError):
        storage.size("missing.json")
    storage.publish_bytes("index.fsi", b"new")  # replace
    assert storage.read_bytes("index.fsi") == b"new"
    sub = storage.sub("shards")
    assert sub.read_range("a.tar", 5, 7) == PAYLOAD[5:12] and sub.list() == {"a.tar": len(PAYLOAD)}


@pytest.mark.parametrize("read_ahead", [0, 3])
def test_iter_range_chunks(storage, read_ahead):
    storage.publish_bytes("s.tar", PAYLOAD)
    chunks = list(storage.iter_range("s.tar", chunk_bytes=10_000, read_ahead=read_ahead))
    assert b"".join(chunks) == PAYLOAD and max(map(len, chunks)) <= 10_000
    part = b"".join(storage.iter_range("s.tar", 12_345, 200_001, chunk_bytes=7_000, read_ahead=read_ahead))
    assert part == PAYLOAD[12_345:200_001]
    it = storage.iter_range("s.tar", chunk_bytes=1000, read_ahead=read_ahead)
    assert next(it) == PAYLOAD[:1000]
    it.close()  # abandoning a read-ahead generator must not hang or leak errors


def test_open_publish_is_all_or_nothing(storage):
    with storage.open_publish("manifest.json") as f:
        f.write(b'{"a": 1}')
    assert storage.read_bytes("manifest.json") == b'{"a": 1}'
    with pytest.raises(RuntimeError):
        with storage.open_publish("manifest.json") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert storage.read_bytes("manifest.json") == b'{"a": 1}'
    with pytest.raises(RuntimeError):
        with storage.open_publish("other.json") as f:
            f.write(b"half")
            raise RuntimeError("writer died")
    assert not storage.exists("other.json") and set(storage.list()) == {"manifest.json"}


def test_publish_file(storage, tmp_path):
    src = tmp_path / "local.tar"
    src.write_bytes(PAYLOAD)
    storage.publish_file("shards/x.tar", src)
    assert storage.read_bytes("shards/x.tar") == PAYLOAD and src.exists()
    storage.publish_file("shards/y.tar", src, move=True)
    assert storage.read_bytes("shards/y.tar") == PAYLOAD and not src.exists()


def test_create_exclusive_and_delete(storage):
    assert storage.create_exclusive(".featstore.lock", b"first")
    assert not storage.create_exclusive(".featstore.lock", b"second")
    assert storage.read_bytes(".featstore.lock") == b"first"
    storage.delete(".featstore.lock")
    storage.delete(".featstore.lock")  # already gone: no error
    assert not storage.exists(".featstore.lock")
    assert storage.create_exclusive(".featstore.lock", b"third")


def test_s3_ranged_read_is_one_get_with_a_range(s3):
    bucket = new_bucket(s3)
    s = st.parse_location(f"s3://{bucket}/store", s3.storage_options())
    s.publish_bytes("shards/a.tar", PAYLOAD)
    mark = s3.mark()
    assert s.read_range("shards/a.tar", 4096, 777) == PAYLOAD[4096:4873]
    reqs = s3.since(mark, bucket)
    assert [(r.method, r.path, r.range) for r in reqs] == [("GET", f"/{bucket}/store/shards/a.tar", "bytes=4096-4872")]


def test_s3_create_exclusive_sends_if_none_match(s3):
    bucket = new_bucket(s3)
    s = st.parse_location(f"s3://{bucket}/store", s3.storage_options())
    mark = s3.mark()
    assert s.create_exclusive("lock", b"x") and not s.create_exclusive("lock", b"y")
    puts = [r for r in s3.since(mark, bucket) if r.method == "PUT"]
    assert len(puts) == 2 and all(r.if_none_match == "*" for r in puts)


def test_s3_large_upload_is_multipart_and_complete(s3, tmp_path):
    bucket = new_bucket(s3)
    s = st.parse_location(f"s3://{bucket}/store", s3.storage_options())
    big = tmp_path / "big.tar"
    data = os.urandom(11 << 20)
    big.write_bytes(data)
    mark = s3.mark()
    s.publish_file("shards/big.tar", big, chunk_bytes=5 << 20)
    reqs = s3.since(mark, bucket)
    assert any(r.method == "POST" and "uploads" in r.query for r in reqs)  # CreateMultipartUpload
    assert sum(r.method == "PUT" and "partNumber" in r.query for r in reqs) == 3
    assert s.size("shards/big.tar") == len(data) and s.read_bytes("shards/big.tar") == data


def test_s3_storage_pickles_without_its_connection(s3):
    bucket = new_bucket(s3)
    s = st.parse_location(f"s3://{bucket}/p", s3.storage_options())
    s.publish_bytes("k", b"value")
    clone = pickle.loads(pickle.dumps(s))
    assert clone._fs is None and clone.read_bytes("k") == b"value"


def test_s3_errors_are_redacted_store_errors(s3):
    opts = s3.storage_options()
    opts["client_kwargs"] = dict(opts["client_kwargs"], endpoint_url="http://127.0.0.1:9")  # nothing listens
    opts["config_kwargs"] = {"connect_timeout": 1, "retries": {"max_attempts": 1}}
    s = st.parse_location(f"s3://{SECRET}-bucket/x", opts)  # even a secret-looking bucket name is hidden
    with pytest.raises(StoreError) as e:
        s.read_bytes("index.fsi")
    assert SECRET not in str(e.value) and "cannot read" in str(e.value)


def test_local_use_never_imports_fsspec(tmp_path):
    code = (
        "import sys, pathlib; import featstore.storage as st\n"
        f"s = st.parse_location({str(tmp_path)!r})\n"
        "s.publish_bytes('shards/a.tar', b'0123456789'); assert s.read_range('shards/a.tar', 2, 3) == b'234'\n"
        "assert s.list('shards') == {'shards/a.tar': 10} and s.create_exclusive('l', b'x')\n"
        "assert b''.join(s.iter_range('shards/a.tar', chunk_bytes=4)) == b'0123456789'\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('fsspec', 's3fs', 'botocore', 'aiobotocore')]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr


def test_s3_reads_never_trust_a_stale_listing(s3):
    """Another writer (here: a second client, as another process would be) adds objects after this
    process listed the prefix: exists, size, read and list must see them."""
    bucket = new_bucket(s3)
    url = f"s3://{bucket}/p"
    mine = st.parse_location(url, s3.storage_options())
    assert mine.list("") == {} and not mine.exists("manifest.json")
    mine.fs.find(mine.root)  # fills s3fs's listing cache
    other = st.parse_location(url, dict(s3.storage_options(), skip_instance_cache=True))
    assert other.fs is not mine.fs
    other.publish_bytes("manifest.json", b"{}")
    assert mine.exists("manifest.json") and mine.size("manifest.json") == 2
    assert mine.read_bytes("manifest.json") == b"{}" and mine.list("") == {"manifest.json": 2}
