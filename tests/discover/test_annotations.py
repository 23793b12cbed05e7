"""featstore.discover.annotations: annotation files found recursively (never featstore's outputs), their records with file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featstore.discover.annotations import (find_annotation_files, iter_annotation_records, read_annotation_records,
                                            record_image_refs)
from featstore.discover.images import ImageItem, discover_images
from featstore.errors import AnnotationError

from helpers import keys, touch, write_jsonl


def test_record_image_refs_all_fields():
    assert record_image_refs({"images": ["a.jpg", "b.jpg"]}) == ["a.jpg", "b.jpg"]
    assert record_image_refs({"images": "a.jpg"}) == ["a.jpg"]
    assert record_image_refs({"image": "c.png"}) == ["c.png"]
    assert record_image_refs({"history_images": ["h1.jpg", "h2.jpg"], "current_image": "cur.jpg"}) == \
        ["h1.jpg", "h2.jpg", "cur.jpg"]
    assert record_image_refs({"images": ["a.jpg", None, 3, {"x": 1}]}) == ["a.jpg"]
    assert record_image_refs({"conversations": []}) == []
    assert record_image_refs(["not", "a", "dict"]) == []


def test_jsonl_all_record_kinds(tmp_path):
    for name in ["a.jpg", "b.jpg", "c.png", "h1.jpg", "h2.jpg", "cur.jpg"]:
        touch(tmp_path / "imgs" / name)
    ann = write_jsonl(tmp_path / "train.jsonl", [
        {"id": 0, "images": ["imgs/a.jpg", "imgs/b.jpg"], "conversations": []},
        {"id": 1, "images": "imgs/c.png"},
        {"id": 2, "image": "imgs/a.jpg"},
        {"id": 3, "history_images": ["imgs/h1.jpg", "imgs/h2.jpg"], "current_image": "imgs/cur.jpg"},
        {"id": 4, "conversations": [{"from": "human", "value": "no image here"}]},
    ])
    d = discover_images(tmp_path, annotations=[ann])
    assert keys(d) == ["imgs/a.jpg", "imgs/b.jpg", "imgs/c.png", "imgs/cur.jpg", "imgs/h1.jpg", "imgs/h2.jpg"]
    assert all(isinstance(i, ImageItem) and i.path.is_file() for i in d.items)
    assert d.items[0].path == tmp_path / "imgs" / "a.jpg"
    assert d.missing == [] and d.sources == [str(ann)]


def test_blank_lines_and_a_single_path_argument(tmp_path):
    touch(tmp_path / "x.jpg")
    ann = tmp_path / "a.jsonl"
    ann.write_text('\n{"image": "x.jpg"}\n\n   \n', encoding="utf-8")
    assert keys(discover_images(tmp_path, annotations=ann)) == ["x.jpg"]
    assert keys(discover_images(str(tmp_path), annotations=str(ann))) == ["x.jpg"]


@pytest.mark.parametrize("layout", ["list", "data", "dict_of_lists", "single"])
def test_json_layouts(tmp_path, layout):
    touch(tmp_path / "f" / "1.jpg")
    touch(tmp_path / "f" / "2.jpg")
    records = [{"id": "e1", "history_images": ["f/1.jpg"], "current_image": "f/2.jpg"}]
    doc = {"list": records, "data": {"data": records}, "dict_of_lists": {"train": records[:1], "meta": "x"},
           "single": records[0]}[layout]
    ann = tmp_path / "annotations.json"
    ann.write_text(json.dumps(doc), encoding="utf-8")
    assert keys(discover_images(tmp_path, annotations=[ann])) == ["f/1.jpg", "f/2.jpg"]


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    ann = tmp_path / "bad.jsonl"
    ann.write_text('{"image": "a.jpg"}\n{"image": broken\n', encoding="utf-8")
    with pytest.raises(AnnotationError, match=r"bad\.jsonl:2: not valid JSON"):
        discover_images(tmp_path, annotations=[ann], strict=True)


def test_annotation_directory_uses_files_that_parse_as_records(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    anns = tmp_path / "anns"
    write_jsonl(anns / "train.jsonl", [{"image": "a.jpg"}])
    (anns / "val.json").write_text(json.dumps([{"images": ["b.jpg"]}]))
    (anns / "manifest.json").write_text(json.dumps({"total_images": 3}))  # not records: ignored
    (anns / "broken.jsonl").write_text("{nope\n")                         # does not parse: ignored
    (anns / "notes.txt").write_text("a.jpg\n")
    d = discover_images(tmp_path, annotations=[anns])
    assert keys(d) == ["a.jpg", "b.jpg"]
    assert d.sources == [str(anns / "train.jsonl"), str(anns / "val.json")]


def test_find_annotation_files_recursive_skipping_hidden_and_featstore_output(tmp_path):
    assert find_annotation_files(tmp_path) == []
    wanted = ["train.jsonl", "val.JSONL", "annotations.json", "R2R/annotations.json", "RxR/train.jsonl",
              "seed/deep/er/x.jsonl"]
    for name in wanted:
        write_jsonl(tmp_path / name, [])
    (tmp_path / "other.json").write_text("[]")                    # only annotations.json among .json files
    write_jsonl(tmp_path / ".hidden" / "h.jsonl", [])             # hidden folder
    write_jsonl(tmp_path / "R2R" / ".h.jsonl", [])                # hidden file
    write_jsonl(tmp_path / "vggt_featstore" / "failures.jsonl", [])  # featstore's default output folder
    write_jsonl(tmp_path / "vggt_cache_failures.jsonl", [])       # per-image ledgers, wherever they are
    write_jsonl(tmp_path / "R2R" / "vggt_cache_missing.jsonl", [])
    (tmp_path / "mystore" / "index.fsi").parent.mkdir()          # a store under another --out
    (tmp_path / "mystore" / "index.fsi").write_bytes(b"x")
    write_jsonl(tmp_path / "mystore" / "failures.jsonl", [])
    (tmp_path / "building" / "shards").mkdir(parents=True)       # a store before its first merge
    (tmp_path / "building" / "build.json").write_text("{}")
    write_jsonl(tmp_path / "building" / "missing.jsonl", [])
    write_jsonl(tmp_path / "elsewhere" / "out.jsonl", [])        # excluded by the caller (a build's --out)
    os.symlink(tmp_path, tmp_path / "R2R" / "loop")              # a loop ends
    found = find_annotation_files(tmp_path, exclude=[tmp_path / "elsewhere"])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == sorted(wanted)
    assert find_annotation_files(tmp_path / "absent") == []


def test_own_ledger_is_never_an_annotation_source(tmp_path):
    """Bug: a per-image build's vggt_cache_failures.jsonl at the data root was the next run's only source."""
    touch(tmp_path / "ep" / "a.jpg")
    touch(tmp_path / "ep" / "b.jpg")
    (tmp_path / "vggt_cache_failures.jsonl").write_text(json.dumps({"key": "x.jpg", "error": "bad"}) + "\n")
    (tmp_path / "vggt_cache_missing.jsonl").write_text(json.dumps({"key": "y.jpg", "path": "y.jpg"}) + "\n")
    d = discover_images(tmp_path, find_annotations=True)
    assert d.scanned and keys(d) == ["ep/a.jpg", "ep/b.jpg"]
    write_jsonl(tmp_path / "anns" / "train.jsonl", [{"images": ["ep/a.jpg"]}])
    d = discover_images(tmp_path, find_annotations=True)
    assert d.auto and not d.scanned and keys(d) == ["ep/a.jpg"]
    assert d.sources == [str(tmp_path / "anns" / "train.jsonl")]


def test_annotation_records_carry_file_and_line(tmp_path):
    jl = tmp_path / "a.jsonl"
    jl.write_bytes(b'{"image": "1.jpg"}\n\n{"image": broken\n[{"image": "2.jpg"}, {"image": "3.jpg"}]\n'
                   b'42\n\xff\xfe not utf-8\n{"images": ["4.jpg"]}\n')
    js = tmp_path / "annotations.json"
    js.write_text(json.dumps({"data": [{"image": "5.jpg"}, {"image": "6.jpg"}]}))
    bad_json = tmp_path / "sub" / "annotations.json"
    bad_json.parent.mkdir()
    bad_json.write_text('[\n{"image": "7.jpg"},\n{oops}\n]')
    malformed = []
    recs = list(iter_annotation_records([jl, js, bad_json], malformed=malformed))
    assert [(r.file.name, r.line, r.record.get("image") or r.record.get("images")) for r in recs] == [
        ("a.jsonl", 1, "1.jpg"), ("a.jsonl", 4, "2.jpg"), ("a.jsonl", 4, "3.jpg"), ("a.jsonl", 7, ["4.jpg"]),
        ("annotations.json", 0, "5.jpg"), ("annotations.json", 1, "6.jpg")]
    assert [(Path(m.file).name, m.line) for m in malformed] == [("a.jsonl", 3), ("a.jsonl", 5), ("a.jsonl", 6),
                                                                  ("annotations.json", 3)]
    assert "not valid JSON" in malformed[0].error and "not a record" in malformed[1].error
    assert "not UTF-8" in malformed[2].error and "file skipped" in malformed[3].error
    assert str(malformed[0]).startswith(f"{jl}:3: ")
    with pytest.raises(AnnotationError, match=rf"{jl}:3: not valid JSON.*--strict-annotations"):
        list(iter_annotation_records(jl, strict=True))
