"""ShardWriter: a context manager that closes (or, on an error, drops) the open shard and hands each closed
shard with its index entries to its ``post`` hook."""

from __future__ import annotations

import tarfile
import threading

import pytest
import torch
import webdataset as wds

from featstore.formats.record import Record, decode_record, encode_record
from featstore.formats.shards import ClosedShard, ShardWriter, list_shards, scan_shard


def record_bytes(i: int) -> tuple[str, bytes]:
    key = f"ep{i // 4}/frame.{i:03d}.jpg"
    return key, encode_record(Record(key, key, {"features": torch.full((1, 256, 64), float(i))}), codec="raw")


def test_post_gets_each_shard_as_it_closes(tmp_path):
    closed: list[ClosedShard] = []
    records = [record_bytes(i) for i in range(7)]
    size = len(records[0][1]) * 7 // 2  # three records to a shard (tar headers are < 2 KB of a 64 KB record)
    with ShardWriter(tmp_path, "vggt", 2, 5, size, fsync=False, post=closed.append) as w:
        for n, (key, data) in enumerate(records):
            w.write(key, data)
            # a shard is handed over when it closes, never before
            assert len(closed) == n // 3
    assert [s.info.name for s in closed] == ["vggt-00002-000005.tar", "vggt-00002-000006.tar", "vggt-00002-000007.tar"]
    assert list_shards(tmp_path) == [s.info.name for s in closed]
    assert [s.info.records for s in closed] == [3, 3, 1]
    for s in closed:
        assert s.path == tmp_path / s.info.name and s.info.bytes == s.path.stat().st_size
        assert s.entries == scan_shard(s.path)  # the entries the hook gets are the shard's own
    stored = [decode_record(x["fsr"]).key for x in wds.WebDataset([str(s.path) for s in closed], shardshuffle=False)]
    assert stored == [k for k, _ in records]
    # the writer keeps no index entries of closed shards (only the open shard's, none once it is closed)
    assert not [name for name, v in vars(w).items() if isinstance(v, (list, dict, tuple)) and v]


def test_an_error_in_the_block_drops_only_the_open_shard(tmp_path):
    closed: list[ClosedShard] = []
    records = [record_bytes(i) for i in range(4)]
    size = len(records[0][1]) * 7 // 2
    with pytest.raises(RuntimeError, match="model failed"):
        with ShardWriter(tmp_path, "vggt", 0, 0, size, fsync=False, post=closed.append) as w:
            for key, data in records:
                w.write(key, data)
            raise RuntimeError("model failed")
    assert [p.name for p in tmp_path.iterdir()] == ["vggt-00000-000000.tar"]  # no temporary file left
    assert [s.info.records for s in closed] == [3]
    with tarfile.open(tmp_path / "vggt-00000-000000.tar") as tar:
        assert len(tar.getmembers()) == 3


def test_a_failing_hook_stops_the_writer_with_the_shard_closed(tmp_path):
    def upload(shard: ClosedShard) -> None:
        raise OSError(f"upload of {shard.info.name} failed")

    key, data = record_bytes(0)
    with pytest.raises(OSError, match="upload of vggt-00000-000000.tar failed"):
        with ShardWriter(tmp_path, "vggt", 0, 0, fsync=False, post=upload) as w:
            w.write(key, data)
    assert [p.name for p in tmp_path.iterdir()] == ["vggt-00000-000000.tar"]


def test_shard_sha256_is_the_file_sha256_with_precomputed_entries_and_reused_buffers(tmp_path):
    from featstore.formats.shards import entry_from_record_bytes
    from featstore.runtime.fsutil import file_sha256

    closed: list[ClosedShard] = []
    buf = bytearray()
    with ShardWriter(tmp_path, "vggt", 0, 0, fsync=False, post=closed.append) as w:
        for i in range(5):
            key, data = record_bytes(i)
            buf[:] = data  # one buffer, overwritten by the next record once write() returns (hashed off-thread)
            w.write(key, memoryview(buf), entry_from_record_bytes(key, 0, data) if i % 2 else None)
    (s,) = closed
    assert s.info.sha256 == file_sha256(s.path) and s.entries == scan_shard(s.path)
    assert not [t for t in threading.enumerate() if t.name == "featstore-shard-sha256"]
