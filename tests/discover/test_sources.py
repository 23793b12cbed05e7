"""featstore.discover.sources with real files in tmp_path: annotation formats, path resolution, scans, de-duplication."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featstore.discover.sources import (AnnotationError, Discovery, ImageItem, ImageResolver, discover_images,
                               discover_recorded, find_annotation_files, iter_annotation_records,
                               read_annotation_records, record_image_refs, resolve_image_ref)

from tests.featstore_helpers import copy_sample


def touch(path: Path, data: bytes = b"img") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def keys(d: Discovery) -> list[str]:
    return [i.key for i in d.items]


# ---------------------------------------------------------------- record fields

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


def test_missing_annotation_file_is_an_error(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        discover_images(tmp_path, annotations=[tmp_path / "nope.jsonl"])


def test_data_root_must_exist(tmp_path):
    with pytest.raises(AnnotationError, match="data root is not a directory"):
        discover_images(tmp_path / "absent")


# ---------------------------------------------------------------- resolution order

def test_resolution_order_data_path_then_root_then_annotation_folder(tmp_path):
    root = tmp_path / "root"
    touch(root / "sub" / "both.jpg")          # under data_path: wins over root/both.jpg
    touch(root / "both.jpg")
    touch(root / "only_root.jpg")             # found under the data root
    touch(tmp_path / "anns" / "near.jpg")     # found beside the annotation file only
    ann = write_jsonl(tmp_path / "anns" / "a.jsonl",
                      [{"images": ["both.jpg", "only_root.jpg", "near.jpg", "gone.jpg"]}])
    d = discover_images(root, annotations=[ann], data_path="sub")
    assert keys(d) == [(tmp_path / "anns" / "near.jpg").as_posix(), "only_root.jpg", "sub/both.jpg"]
    assert d.missing == ["sub/gone.jpg"]
    assert d.looked_in == [str(root), str(root / "sub"), str(tmp_path / "anns")]


def test_record_data_path_overrides_argument(tmp_path):
    touch(tmp_path / "rec" / "a.jpg")
    touch(tmp_path / "arg" / "a.jpg")
    ann = write_jsonl(tmp_path / "a.jsonl", [{"data_path": "rec", "images": ["a.jpg"]},
                                              {"images": ["a.jpg"]}])
    assert keys(discover_images(tmp_path, annotations=[ann], data_path="arg")) == ["arg/a.jpg", "rec/a.jpg"]


def test_absolute_paths_inside_and_outside_root(tmp_path):
    root = tmp_path / "root"
    inside = touch(root / "in.jpg")
    outside = touch(tmp_path / "elsewhere" / "out.jpg")
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": [str(inside), str(outside)]}])
    d = discover_images(root, annotations=[ann])
    assert keys(d) == sorted([outside.as_posix(), "in.jpg"])


def test_missing_images_are_collected_not_fatal(tmp_path):
    touch(tmp_path / "ok.jpg")
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": ["ok.jpg", "lost/1.jpg", "lost/2.jpg", "lost/1.jpg"]}])
    d = discover_images(tmp_path, annotations=[ann])
    assert keys(d) == ["ok.jpg"]
    assert d.missing == ["lost/1.jpg", "lost/2.jpg"]


def test_directory_reference_is_missing_not_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    ann = write_jsonl(tmp_path / "a.jsonl", [{"image": "dir.jpg"}])
    d = discover_images(tmp_path, annotations=[ann])
    assert d.items == [] and d.missing == ["dir.jpg"]


# ---------------------------------------------------------------- de-duplication and names

def test_dedupe_same_file_via_two_spellings_and_symlink(tmp_path):
    real = touch(tmp_path / "ep" / "f.jpg")
    os.symlink(real, tmp_path / "alias.jpg")
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": ["ep/f.jpg", "./ep/../ep/f.jpg", "alias.jpg",
                                                         str(real)]}])
    d = discover_images(tmp_path, annotations=[ann])
    assert keys(d) == ["alias.jpg"]  # one item for one real file: the smallest key wins, deterministically
    assert d.items[0].path.resolve() == real.resolve()


def test_two_annotation_files_overlap_and_sorting(tmp_path):
    for name in ["b.jpg", "a.jpg", "c.jpg"]:
        touch(tmp_path / name)
    a1 = write_jsonl(tmp_path / "one.jsonl", [{"images": ["c.jpg", "a.jpg"]}])
    a2 = tmp_path / "two.json"
    a2.write_text(json.dumps([{"image": "a.jpg"}, {"image": "b.jpg"}]))
    d = discover_images(tmp_path, annotations=[a1, a2])
    assert keys(d) == ["a.jpg", "b.jpg", "c.jpg"]
    assert d.sources == [str(a1), str(a2)]


def test_names_with_dots_spaces_and_non_ascii(tmp_path):
    names = ["frame.000.jpg", "my frame 1.png", "café/帧_01.JPG", "ep.v2/a..b.jpeg"]
    for n in names:
        touch(tmp_path / n)
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": names}])
    assert keys(discover_images(tmp_path, annotations=[ann])) == sorted(names)
    assert keys(discover_images(tmp_path)) == sorted(names)  # the scan finds the same


# ---------------------------------------------------------------- annotation directories and auto rule

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


def test_empty_annotation_directory_does_not_fall_back_to_scan(tmp_path):
    touch(tmp_path / "a.jpg")
    (tmp_path / "anns").mkdir()
    d = discover_images(tmp_path, annotations=[tmp_path / "anns"])
    assert d.items == [] and d.sources == []


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


def test_malformed_lines_are_skipped_and_counted_by_discovery(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    ann = tmp_path / "train.jsonl"
    ann.write_text('{"image": "a.jpg"}\n{"image": "b.jpg"\n{"image": "b.jpg"}\n')
    d = discover_images(tmp_path, annotations=[ann])
    assert keys(d) == ["a.jpg", "b.jpg"]
    assert [(m.file, m.line) for m in d.malformed] == [(str(ann), 2)]
    assert d.source_stats[0].malformed_lines == 1 and d.source_stats[0].records == 2
    with pytest.raises(AnnotationError, match=r"train\.jsonl:2:"):
        discover_images(tmp_path, annotations=[ann], strict=True)


def test_resolve_image_ref_rules(tmp_path):
    root = tmp_path / "root"
    touch(root / "sub" / "both.jpg")
    touch(root / "both.jpg")
    touch(tmp_path / "anns" / "near.jpg")
    outside = touch(tmp_path / "far" / "o.jpg")
    ann = tmp_path / "anns" / "a.jsonl"
    assert resolve_image_ref("both.jpg", root) == ("both.jpg", root / "both.jpg")
    assert resolve_image_ref("both.jpg", root, data_path="sub") == ("sub/both.jpg", root / "sub" / "both.jpg")
    assert resolve_image_ref("near.jpg", root) is None
    assert resolve_image_ref("near.jpg", root, annotation_file=ann) == (
        (tmp_path / "anns" / "near.jpg").as_posix(), tmp_path / "anns" / "near.jpg")
    assert resolve_image_ref(str(root / "both.jpg"), root) == ("both.jpg", root / "both.jpg")
    assert resolve_image_ref(str(outside), root) == (outside.as_posix(), outside)
    assert resolve_image_ref("gone.jpg", root, data_path="sub", annotation_file=ann) is None
    r = ImageResolver(root, data_path="sub").resolve("both.jpg")
    assert r is not None and r.key == "sub/both.jpg" and r.real == str((root / "sub" / "both.jpg").resolve())


def test_missing_images_name_their_annotation_file_and_line(tmp_path):
    touch(tmp_path / "ok.jpg")
    a = write_jsonl(tmp_path / "R2R" / "train.jsonl", [{"images": ["ok.jpg"]}, {"images": ["lost/1.jpg", "ok.jpg"]},
                                                      {"image": "lost/1.jpg"}])
    b = tmp_path / "annotations.json"
    b.write_text(json.dumps([{"image": "ok.jpg"}, {"history_images": ["lost/2.jpg"], "current_image": "ok.jpg"}]))
    d = discover_images(tmp_path, annotations=[b, a])
    assert d.missing == ["lost/1.jpg", "lost/2.jpg"]
    assert [(m.key, m.path, m.file, m.line, m.references) for m in d.missing_refs] == [
        ("lost/1.jpg", str(tmp_path / "lost" / "1.jpg"), str(a), 2, 2),
        ("lost/2.jpg", str(tmp_path / "lost" / "2.jpg"), str(b), 1, 1)]
    assert d.missing_refs[0].to_json() == {"key": "lost/1.jpg", "path": str(tmp_path / "lost" / "1.jpg"),
                                           "annotation": str(a), "line": 2, "references": 2}
    assert [(s.file, s.records, s.images, s.missing) for s in d.source_stats] == [(str(b), 2, 1, 1),
                                                                                 (str(a), 3, 1, 1)]


def test_aliases_map_other_spellings_to_the_stored_key(tmp_path):
    real = touch(tmp_path / "ep" / "f.jpg")
    os.symlink(real, tmp_path / "alias.jpg")
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": ["ep/f.jpg", "alias.jpg"]}])
    d = discover_images(tmp_path, annotations=[ann])
    assert keys(d) == ["alias.jpg"] and d.aliases == {"ep/f.jpg": "alias.jpg"}


def test_recorded_discovery_repeats_under_a_moved_root(tmp_path):
    root = tmp_path / "root"
    for name in ["R2R/a.jpg", "seed/imgs/b.jpg", "unused/c.jpg"]:
        touch(root / name)
    (root / "R2R" / "annotations.json").write_text(json.dumps([{"image": "R2R/a.jpg"}]))
    write_jsonl(root / "seed" / "train.jsonl", [{"data_path": "seed", "images": ["imgs/b.jpg", "imgs/x.jpg"]}])
    d = discover_images(root, find_annotations=True)
    rec = json.loads(json.dumps(d.to_record(root)))
    assert [a["file"] for a in rec["annotations"]] == ["R2R/annotations.json", "seed/train.jsonl"]
    assert rec["auto"] and not rec["scan"] and rec["images"] == 2 and rec["missing"] == 1
    assert [(a["images"], a["missing"]) for a in rec["annotations"]] == [(1, 0), (1, 1)]
    os.rename(root, tmp_path / "moved")
    again = discover_recorded(tmp_path / "moved", rec)
    assert keys(again) == keys(d) == ["R2R/a.jpg", "seed/imgs/b.jpg"] and again.missing == ["seed/imgs/x.jpg"]
    scan = discover_images(tmp_path / "moved")
    assert discover_recorded(tmp_path / "moved", scan.to_record(tmp_path / "moved")).items == scan.items
    (tmp_path / "moved" / "R2R" / "annotations.json").unlink()
    with pytest.raises(AnnotationError, match="no longer exists"):
        discover_recorded(tmp_path / "moved", rec)


# ---------------------------------------------------------------- image list

def test_image_list(tmp_path):
    touch(tmp_path / "a b.jpg")
    touch(tmp_path / "d" / "c.png")
    lst = tmp_path / "lists" / "images.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\na b.jpg\n\n  d/c.png  \nnot/here.jpg\r\n", encoding="utf-8")
    d = discover_images(tmp_path, image_list=lst)
    assert keys(d) == ["a b.jpg", "d/c.png"]
    assert d.missing == ["not/here.jpg"]
    assert d.sources == [str(lst)]


def test_image_list_and_annotations_combine(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    (tmp_path / "list.txt").write_text("b.jpg\na.jpg\n")
    ann = write_jsonl(tmp_path / "x.jsonl", [{"image": "a.jpg"}])
    assert keys(discover_images(tmp_path, annotations=[ann], image_list=tmp_path / "list.txt")) == \
        ["a.jpg", "b.jpg"]


def test_unreadable_image_list(tmp_path):
    with pytest.raises(AnnotationError, match="cannot read image list"):
        discover_images(tmp_path, image_list=tmp_path / "none.txt")


# ---------------------------------------------------------------- directory scan

def test_scan_extensions_case_and_skips(tmp_path):
    wanted = ["a.jpg", "b.JPEG", "c.Png", "d.webp", "e.BMP", "sub/deeper/f.jpg", "x.jpg/inside.png"]
    for n in wanted:
        touch(tmp_path / n)
    (tmp_path / "y.png").mkdir()                          # a folder named like an image
    touch(tmp_path / "a.jpg.vggt_cache.pt")               # our per-image output
    touch(tmp_path / "vggt_featstore" / "shards" / "s.png")  # our store folder
    touch(tmp_path / ".tmp.a.jpg")                        # hidden temp file
    touch(tmp_path / ".hidden" / "h.jpg")                 # hidden folder
    touch(tmp_path / "notes.txt")
    touch(tmp_path / "noext")
    touch(tmp_path / "g.gif")
    os.symlink(tmp_path / "missing.jpg", tmp_path / "dangling.jpg")
    d = discover_images(tmp_path)
    assert keys(d) == sorted(wanted)
    assert d.sources == [f"scan:{tmp_path}"] and d.looked_in == [str(tmp_path)]


def test_scan_survives_symlink_loops_and_dedupes_links(tmp_path):
    touch(tmp_path / "a" / "1.jpg")
    os.symlink(tmp_path, tmp_path / "a" / "loop")        # a loop back to the root
    os.symlink(tmp_path / "a", tmp_path / "a_alias")     # a second way into a
    os.symlink(tmp_path / "a" / "1.jpg", tmp_path / "link.jpg")
    d = discover_images(tmp_path)
    assert keys(d) == ["a/1.jpg"]


def test_scan_follows_symlinked_folder_outside_root(tmp_path):
    root = tmp_path / "root"
    touch(root / "local.jpg")
    touch(tmp_path / "mnt" / "frames" / "f.png")
    os.symlink(tmp_path / "mnt", root / "mounted")
    os.symlink(root, tmp_path / "mnt" / "back")          # loop through the outside folder
    d = discover_images(root)
    assert keys(d) == ["local.jpg", "mounted/frames/f.png"]
    assert d.items[1].path == root / "mounted" / "frames" / "f.png"


def test_data_root_given_through_a_symlink(tmp_path):
    touch(tmp_path / "real" / "x.jpg")
    os.symlink(tmp_path / "real", tmp_path / "link")
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": ["x.jpg", str(tmp_path / "real" / "x.jpg")]}])
    assert keys(discover_images(tmp_path / "link", annotations=[ann])) == ["x.jpg"]
    assert keys(discover_images(tmp_path / "link")) == ["x.jpg"]


def test_scan_empty_root(tmp_path):
    d = discover_images(tmp_path)
    assert d.items == [] and d.missing == [] and d.looked_in == [str(tmp_path)]


# ---------------------------------------------------------------- the shipped sample set

def test_sample_set_annotations_and_scan_agree(tmp_path):
    root = copy_sample(tmp_path / "sample")
    anns = find_annotation_files(root)
    assert [p.name for p in anns] == ["annotations.json", "train.jsonl"]
    from_jsonl = discover_images(root, annotations=[root / "train.jsonl"])
    from_json = discover_images(root, annotations=[root / "annotations.json"])
    scanned = discover_images(root)
    assert keys(from_jsonl) == keys(from_json) == keys(scanned)
    assert len(scanned.items) == 12 and from_jsonl.missing == from_json.missing == []
    assert any(" " in k or not k.isascii() for k in keys(scanned))
    assert any(Path(k).name.count(".") > 1 for k in keys(scanned))
    assert all(len(read_annotation_records(p)) >= 3 for p in anns)
