"""Which images a build reads (issue 8): its own outputs are never sources, annotation files are found
recursively and recorded in the manifest, missing images and malformed lines are listed with file and line."""

from __future__ import annotations

import json
from pathlib import Path

from featstore.formats.index import Index
from featstore.formats.manifest import read_manifest
from helpers import build_args, make_images, run_inproc, write_jsonl


def stored_keys(data: Path) -> list[str]:
    return sorted(str(p.relative_to(data))[: -len(".vggt_cache.pt")] for p in data.rglob("*.vggt_cache.pt"))


def test_per_image_rerun_never_reads_its_own_ledger(tmp_path):
    """Bug: run 2 took run 1's vggt_cache_failures.jsonl as its annotation file and found no images (exit 1)."""
    data = tmp_path / "d"
    keys = make_images(data, 5)
    (data / "broken.png").write_text("not an image")  # a failure, so the ledger has a line in it
    args = build_args(data, "--format", "per-image", "--allow-failures", "1")
    r = run_inproc(*args)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["key"] for x in (data / "vggt_cache_failures.jsonl").read_text().splitlines()] == ["broken.png"]
    r = run_inproc(*args)
    assert r.returncode == 0, r.stderr
    assert "vggt_cache_failures.jsonl" not in r.stderr.split("Summary")[0] and "No images found" not in r.stderr
    assert "skipped 5" in r.stderr and "processed 0" in r.stderr, r.stderr
    assert stored_keys(data) == keys


def test_per_image_rerun_with_annotations_below_the_top_level(tmp_path):
    data = tmp_path / "d"
    keys = make_images(data, 6)
    write_jsonl(data / "R2R" / "train.jsonl", [{"images": keys[:4]}])
    args = build_args(data, "--format", "per-image")
    assert run_inproc(*args).returncode == 0
    r = run_inproc(*args)
    assert r.returncode == 0 and "skipped 4" in r.stderr and "processed 0" in r.stderr, r.stderr
    assert stored_keys(data) == keys[:4]


def test_annotation_files_in_subfolders_choose_the_images(tmp_path):
    """Bug: annotations below the top level were ignored and every image under the root was built."""
    data = tmp_path / "d"
    keys = make_images(data, 10)
    (data / "R2R").mkdir()
    (data / "R2R" / "annotations.json").write_text(json.dumps([{"images": keys[:3]}, {"image": keys[3]}]))
    write_jsonl(data / "RxR" / "sub" / "train.jsonl", [{"history_images": keys[3:5], "current_image": keys[5]}])
    r = run_inproc(*build_args(data, "--out", str(tmp_path / "store")))
    assert r.returncode == 0, r.stderr
    assert "using 2 source file(s) found under the data root:" in r.stderr
    assert "R2R/annotations.json: 2 records, 4 images" in r.stderr
    assert "RxR/sub/train.jsonl: 1 records, 3 images" in r.stderr
    assert sorted(Index(tmp_path / "store" / "index.fsi").keys()) == keys[:6]
    src = read_manifest(tmp_path / "store" / "manifest.json")["sources"]
    assert src["auto"] and not src["scan"] and src["images"] == 6
    assert [(a["file"], a["records"], a["images"]) for a in src["annotations"]] == [
        ("R2R/annotations.json", 2, 4), ("RxR/sub/train.jsonl", 1, 3)]


def test_a_store_under_the_data_root_is_never_a_source(tmp_path):
    data = tmp_path / "d"
    keys = make_images(data, 4)
    out = data / "stores" / "mine"
    assert run_inproc(*build_args(data, "--out", str(out))).returncode == 0
    (out / "notes.jsonl").write_text(json.dumps({"image": keys[0]}) + "\n")  # inside the store: ignored
    (out / "extra.png").write_bytes((data / keys[0]).read_bytes())
    r = run_inproc(*build_args(data, "--out", str(out)))
    assert r.returncode == 0 and "scanning it for images" in r.stderr and "skipped 4" in r.stderr, r.stderr
    assert sorted(Index(out / "index.fsi").keys()) == keys


def test_missing_images_are_listed_with_file_and_line(tmp_path):
    data = tmp_path / "d"
    keys = make_images(data, 3)
    ann = data / "seed" / "train.jsonl"
    write_jsonl(ann, [{"images": keys}, {"images": ["gone/1.png", keys[0]]}, {"image": "gone/2.png"}])
    r = run_inproc(*build_args(data))
    assert r.returncode == 0, r.stderr
    assert "2 images named by the sources do not exist (first: " in r.stderr and "seed/train.jsonl:2" in r.stderr
    out = data / "vggt_featstore"
    m = read_manifest(out / "manifest.json")
    assert m["counts"]["missing"] == 2 and m["missing_ledger"] == "missing.jsonl"
    ledger = [json.loads(x) for x in (out / "missing.jsonl").read_text().splitlines()]
    assert [(x["key"], x["annotation"], x["line"]) for x in ledger] == [("gone/1.png", str(ann), 2),
                                                                      ("gone/2.png", str(ann), 3)]
    assert ledger[0]["path"] == str(data / "gone" / "1.png")
    r = run_inproc(*build_args(data, "--format", "per-image"))
    assert r.returncode == 0, r.stderr
    assert len((data / "vggt_cache_missing.jsonl").read_text().splitlines()) == 2
    # Once the images exist, the ledger goes away.
    for name in ("gone/1.png", "gone/2.png"):
        (data / name).parent.mkdir(exist_ok=True)
        (data / name).write_bytes((data / keys[0]).read_bytes())
    assert run_inproc(*build_args(data)).returncode == 0
    assert not (out / "missing.jsonl").exists() and read_manifest(out / "manifest.json")["missing_ledger"] is None


def test_malformed_lines_are_skipped_and_counted_or_fatal_when_strict(tmp_path):
    data = tmp_path / "d"
    keys = make_images(data, 3)
    ann = data / "train.jsonl"
    ann.write_text(json.dumps({"images": keys[:2]}) + "\n{not json\n" + json.dumps({"image": keys[2]}) + "\n")
    out = tmp_path / "store"
    r = run_inproc(*build_args(data, "--out", str(out), "--strict-annotations"))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]
    assert len(errors) == 1 and f"{ann}:2: not valid JSON" in errors[0], r.stderr
    assert not out.exists()
    r = run_inproc(*build_args(data, "--out", str(out)))
    assert r.returncode == 0, r.stderr
    assert f"[WARN] {ann}:2: not valid JSON" in r.stderr and "line skipped" in r.stderr
    m = read_manifest(out / "manifest.json")
    assert m["counts"]["malformed_annotation_lines"] == 1 and m["sources"]["annotations"][0]["malformed_lines"] == 1
    assert m["processed_images"] == 3
