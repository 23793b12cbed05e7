"""featstore merge: parts built with different settings are refused naming the setting; a merge again keeps
the store's counts (parts with another codec merge: it is encoding only); the typed manifest reads and writes every field as before."""

from __future__ import annotations

import json

from featstore.formats.manifest import JSON_ORDER, SETTING_FIELDS, BuildSettings, Manifest, new_manifest
from helpers import build_args, make_images, run_inproc


def test_merge_refuses_parts_with_another_image_size_then_merges_the_rebuilt_part(tmp_path):
    keys = make_images(tmp_path / "d", 4, per_dir=1)  # two images for each part (crc32 of the key)
    store = tmp_path / "store"
    for part, size in (("0", "518"), ("1", "28")):  # --no-skip-existing: part 1 skips the resume check
        r = run_inproc(*build_args(tmp_path / "d", "--out", str(store), "--num-parts", "2", "--part", part,
                                   "--image-size", size, "--no-skip-existing"))
        assert r.returncode == 0, r.stderr
        assert json.loads((store / "parts" / f"rank-0000{part}.json").read_text())["counts"]["processed"] == 2
    parts = sorted(p.name for p in (store / "parts").iterdir())
    r = run_inproc("merge", str(store))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]
    assert len(errors) == 1 and "different settings (--image-size: 518 in rank-00000, 28 in rank-00001 (preprocess.target_size))" in errors[0]
    assert "Traceback" not in r.stderr
    # nothing written: no index or manifest, the parts stay for the merge after the fix
    assert not (store / "index.fsi").exists() and not (store / "manifest.json").exists()
    assert sorted(p.name for p in (store / "parts").iterdir()) == parts

    r = run_inproc(*build_args(tmp_path / "d", "--out", str(store), "--num-parts", "2", "--part", "1",
                               "--no-skip-existing"))
    assert r.returncode == 0, r.stderr
    assert run_inproc("merge", str(store)).returncode == 0
    first = json.loads((store / "manifest.json").read_text())
    assert first["preprocess"]["target_size"] == 518 and first["complete"] and first["processed_images"] == len(keys) == 4
    assert first["parts"] == [0, 1] and first["counts"]["processed"] == 4
    # merging again (nothing new) keeps what the store knows: totals, counts, parts
    assert run_inproc("merge", str(store)).returncode == 0
    assert json.loads((store / "manifest.json").read_text()) == first


def test_manifest_round_trips_every_field_and_keeps_other_tools_fields():
    doc = new_manifest(layout="per-image", data_root="/data", model_path="/ckpt")
    assert list(doc) == list(JSON_ORDER) and set(SETTING_FIELDS) < set(JSON_ORDER)
    doc.update(total_images=5, processed_images=3, counts=dict(doc["counts"], failed=1, missing=1),
               layers=[23], note_from_another_tool={"x": 1})
    m = Manifest.from_json(doc)
    assert m.layout == "per-image" and m.settings().layers == [23] and m.is_complete()
    assert m.to_json() == doc and list(m.to_json()) == list(doc)
    m.counts["missing"] = 0
    assert not m.is_complete()  # one image neither stored nor listed
    legacy = {"total_images": 2, "processed_images": 2, "vggt_model_path": "m", "data_root": "/d",
              "cache_format": "<image_path>.vggt_cache.pt"}
    assert Manifest.from_json(legacy).layout == "per-image" and Manifest.from_json(legacy).is_complete()
    assert not Manifest.from_json(dict(legacy, total_images=0, processed_images=0)).is_complete()
    nulls = Manifest.from_json(dict(legacy, counts=None, model=None, compute=None))  # a hand-edited document
    assert nulls.is_complete() and nulls.counts["failed"] == 0 and nulls.compute is None
    assert nulls.settings().differences(BuildSettings(model={"fingerprint": "f"})) == []


def test_merge_joins_parts_written_with_different_codecs(tmp_path):
    make_images(tmp_path / "d", 4, per_dir=1)
    store = tmp_path / "store"
    for part, codec in (("0", "zstd"), ("1", "raw")):
        r = run_inproc(*build_args(tmp_path / "d", "--out", str(store), "--num-parts", "2", "--part", part,
                                   "--codec", codec))
        assert r.returncode == 0, r.stderr
    r = run_inproc("merge", str(store))
    assert r.returncode == 0, r.stderr
    m = json.loads((store / "manifest.json").read_text())
    assert m["complete"] and m["processed_images"] == 4
    assert run_inproc("verify", str(store)).returncode == 0
