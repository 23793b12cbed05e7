"""aliases.fsi of sample stores: a record answers to its frame digest and to every id of a deduplicated record."""

from __future__ import annotations

from pathlib import Path

import torch

import featstore
from featstore.formats.aliases import alias_keys
from featstore.formats.keys import frames_key
from featstore.formats.manifest import new_manifest, write_manifest
from featstore.formats.record import Record, encode_record
from featstore.formats.shards import ClosedShard, ShardWriter
from featstore.formats.shardstore import finalize_shard_store
from featstore.storage import LocalStorage


def sample_record(key: str, frames: list[str], ids: list[str] | None, value: float) -> Record:
    meta = {"context": "sample", "frames": frames, "reference_frame": "first"}
    if ids is not None:
        meta["ids"] = ids
    return Record(key, frames[-1], {"features": torch.full((1, 4, 8), value)}, meta)


def write_store(out: Path, records: list[Record]) -> None:
    closed: list[ClosedShard] = []
    with ShardWriter(out / "shards", "vggt", 0, 0, fsync=False, post=closed.append) as w:
        for rec in records:
            w.write(rec.key, encode_record(rec))
    fin = finalize_shard_store(LocalStorage(out), {c.info.name: c.entries for c in closed}, sample_context=True)
    m = new_manifest(layout="shards", data_root=str(out), model_path="tiny",
                     context={"mode": "sample", "reference_frame": "first"}, shards=fin.shards, index=fin.index)
    write_manifest(out / "manifest.json", m)


def test_alias_keys_of_a_sample_record():
    frames = ["ep/0.jpg", "ep/1.jpg"]
    digest = frames_key(frames)
    assert alias_keys(digest, {"context": "sample", "frames": frames}) == []
    assert alias_keys("q1", {"context": "sample", "frames": frames}) == [digest]
    assert alias_keys(digest, {"context": "joint", "frames": frames, "ids": ["q1", "q2"]}) == ["q1", "q2"]
    assert alias_keys("q1", {"context": "sample", "frames": frames, "ids": ["q1", "q2"]}) == [digest, "q2"]
    assert alias_keys("a.jpg", {"context": "image", "ids": ["x"]}) == []  # image records have no aliases


def test_every_id_of_a_deduplicated_record_finds_it(tmp_path):
    scene, other = ["s/0.jpg", "s/1.jpg", "s/2.jpg"], ["t/0.jpg", "t/1.jpg"]
    write_store(tmp_path, [sample_record(frames_key(scene), scene, ["q1", "q2", "q3"], 1.0),
                           sample_record("solo", other, ["solo"], 2.0)])
    store = featstore.open_store(tmp_path)
    assert sorted(store.keys()) == sorted([frames_key(scene), "solo"])
    for i in ("q1", "q2", "q3"):
        assert torch.equal(store.get_sample(id=i), torch.full((1, 4, 8), 1.0)), i
    assert torch.equal(store.get_sample([str(tmp_path / f) for f in scene]), torch.full((1, 4, 8), 1.0))
    assert torch.equal(store.get_sample(id="solo"), torch.full((1, 4, 8), 2.0))
    assert torch.equal(store.get_sample([str(tmp_path / f) for f in other]), torch.full((1, 4, 8), 2.0))
    assert store.get_sample(id="q4") is None
