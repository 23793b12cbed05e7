"""One rule for build settings (formats.manifest.BuildSettings): a setting that changes the stored numbers binds a
store on resume and on merge alike; the codec may differ record by record; old stores read with historic defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featstore.formats.index import Index
from featstore.formats.manifest import BuildSettings
from featstore.formats.record import decode_header, decode_record
from helpers import build_args, make_images, run_inproc


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def built(tmp_path):
    """A store of 4 images, then 2 more images added to the data root (so a resume has work to do)."""
    data, store = tmp_path / "d", tmp_path / "store"
    make_images(data, 4)
    r = run_inproc(*build_args(data, "--out", str(store)))
    assert r.returncode == 0, r.stderr
    make_images(data, 2, prefix="new")
    return data, store


@pytest.mark.parametrize("flags, named, stored, requested", [
    (("--apply-exif",), "--apply-exif", "false", "true"),
    (("--preprocess", "pad"), "--preprocess", 'crop', 'pad'),
    (("--image-size", "28"), "--image-size", "518", "28"),
    (("--tokens", "all"), "--tokens", 'patch', 'all'),
])
def test_resume_with_a_setting_that_changes_the_numbers_is_refused_and_writes_nothing(built, flags, named, stored,
                                                                                       requested):
    data, store = built
    before = snapshot(store)
    r = run_inproc(*build_args(data, "--out", str(store), *flags))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]
    assert len(errors) == 1, r.stderr
    assert f"{named}: the store's records have {stored}, this run {requested}" in errors[0]
    assert "another --out" in errors[0] and "--no-skip-existing" in errors[0] and "Traceback" not in r.stderr
    assert snapshot(store) == before


def test_resume_with_another_codec_is_accepted_and_each_record_keeps_its_codec(built):
    data, store = built
    r = run_inproc(*build_args(data, "--out", str(store), "--codec", "raw"))
    assert r.returncode == 0, r.stderr
    ix = Index(store / "index.fsi")
    codecs = {}
    for e in ix.entries():
        with open(store / "shards" / e.shard, "rb") as f:
            f.seek(e.offset)
            data_ = f.read(e.length)
        codecs[e.key] = {s.name: s.codec for s in decode_header(data_)[1]}["features"]
        assert decode_record(data_).key == e.key
    assert {k for k, c in codecs.items() if c == "raw"} == {k for k in codecs if k.startswith("new")}
    assert {c for k, c in codecs.items() if not k.startswith("new")} == {"zstd"}
    assert json.loads((store / "manifest.json").read_text())["codec"] == "raw"  # the latest run's


def test_hash_inputs_may_differ_and_each_record_keeps_its_fingerprint(built):
    data, store = built
    r = run_inproc(*build_args(data, "--out", str(store), "--hash-inputs"))
    assert r.returncode == 0, r.stderr
    assert run_inproc("verify", str(store)).returncode == 0


def test_differences_name_the_flag_and_only_settings_that_change_the_numbers():
    a = BuildSettings(vggt_model_path="/node1/vggt", model={"fingerprint": "f1", "name": "vggt"}, layers=[22],
                      preprocess={"mode": "crop", "apply_exif": False, "target_size": 518}, dtype="bfloat16",
                      codec="zstd", source_fingerprint="stat")
    same = BuildSettings(vggt_model_path="/node2/vggt", model={"fingerprint": "f1", "name": None}, layers=[22],
                         preprocess={"mode": "crop", "apply_exif": False}, dtype=None, codec="int8",
                         source_fingerprint="sha256")  # an older part: unknowns; codec and hashing are free
    assert a.differences(same) == []
    other = BuildSettings(model={"fingerprint": "f2"}, layers=[21], preprocess={"mode": "pad", "target_size": 644},
                          dtype="float32")
    assert [d.flag for d in a.differences(other)] == ["--model", "--layers", "--preprocess", "--image-size",
                                                      "--dtype"]
    assert a.differences(other)[0].stored == "f1" and a.differences(other)[0].requested == "f2"


def test_old_manifests_read_with_their_historic_defaults():
    old = BuildSettings.of({"preprocess": {"mode": "crop"}, "layers": [22]})  # before target_size / apply_exif
    assert old.preprocess == {"mode": "crop", "apply_exif": False, "target_size": 518, "multiple": 14}
    assert old.context == {"mode": "image"}
    assert [d.flag for d in old.differences(BuildSettings.of({"preprocess": {"mode": "crop", "target_size": 644}}))
            ] == ["--image-size"]
    assert BuildSettings.of({"preprocess": {"mode": "janusvln"}}).preprocess["multiple"] == 28
    assert BuildSettings.of({}).preprocess["mode"] is None  # nothing recorded (an older script's caches): unknown
