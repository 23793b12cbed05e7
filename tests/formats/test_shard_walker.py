"""The one tar walker (formats.shards.walk_shard) and the readers built on it: the shard scan, the scan of a
stored shard (merge), and salvage of a dead writer's unfinished shard. Real tar files, real records."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from featstore.errors import StoreError
from featstore.formats.keys import member_name
from featstore.formats.record import Record, decode_record, encode_record
from featstore.formats.shards import (BrokenShardError, HashingReader, ShardWriter, entries_of_stream, salvage_shard,
                                      scan_shard, scan_stored_shard, walk_shard)
from featstore.runtime.fsutil import file_sha256 as sha256_file
from featstore.storage import LocalStorage
from featstore.runtime.fsutil import temp_name_for


def write_shard(folder, keys):
    """A real shard of one small record per key; returns (path, the writer's entries)."""
    closed = []
    with ShardWriter(folder, "vggt", 0, 0, fsync=False, post=closed.append) as w:
        for i, key in enumerate(keys):
            t = torch.arange(12 * 16, dtype=torch.float32).reshape(1, 12, 16) * (i + 1)
            w.write(key, encode_record(Record(key, key, {"features": t}, {"model": "m"})))
    return closed[0].path, closed[0].entries


KEYS = ["a/0.png", "a/1.png", "b/2.jpg"]


def test_walk_yields_each_member_once_and_hashes_the_same_pass(tmp_path):
    path, written = write_shard(tmp_path, KEYS)
    with open(path, "rb") as f:
        hr = HashingReader(f)
        members = list(walk_shard(hr, str(path)))
        hr.drain()
    assert [m.name for m in members] == [member_name(k) for k in KEYS]
    assert [(m.offset, len(m.data)) for m in members] == [(e.offset, e.length) for e in written]
    assert [decode_record(m.data).key for m in members] == KEYS
    assert hr.hexdigest() == sha256_file(path) and hr.pos == path.stat().st_size
    assert scan_shard(path) == written


def test_scan_of_a_stored_shard_equals_the_writers_entries(tmp_path):
    shards = tmp_path / "shards"
    path, written = write_shard(shards, KEYS)
    assert scan_stored_shard(LocalStorage(tmp_path), path.name) == written


def test_a_shard_cut_inside_a_member_is_broken_and_named(tmp_path):
    path, written = write_shard(tmp_path, KEYS)
    os.truncate(path, written[1].offset + 10)
    with pytest.raises(BrokenShardError) as err:
        scan_shard(path)
    assert str(path) in str(err.value) and err.value.reason
    for hashed in (False, True):  # a seekable file, and a stream (what verify and remote shards walk)
        with open(path, "rb") as f:
            walked = []
            with pytest.raises(BrokenShardError):
                for m in walk_shard(HashingReader(f) if hashed else f, str(path)):
                    walked.append(m.name)
        assert walked == [member_name(KEYS[0])]  # the whole first member came out before the break


def test_unexpected_member_is_refused(tmp_path):
    import io
    import tarfile

    path = tmp_path / "vggt-00000-000000.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with open(path, "rb") as f, pytest.raises(StoreError, match="unexpected member 'notes.txt'"):
        entries_of_stream(f, str(path))


def test_salvage_keeps_the_whole_records_of_an_unfinished_shard(tmp_path):
    path, written = write_shard(tmp_path / "done", KEYS)
    tmp = temp_name_for(tmp_path / path.name)
    shutil.copy(path, tmp)
    os.truncate(tmp, written[2].offset + 100)  # the writer died inside the third record
    assert salvage_shard(tmp, fsync=False) == (path.name, 2)
    kept = tmp_path / path.name
    assert not tmp.exists() and scan_shard(kept) == written[:2]
    assert kept.stat().st_size % 10240 == 0  # ended like a tar file tarfile closes
