"""featstore.discover.images: the images of a per-image build (annotations, image lists, scans), de-duplicated, with missing frames."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featstore.discover.annotations import find_annotation_files, read_annotation_records
from featstore.discover.images import ImageItem, discover_images, discover_recorded
from featstore.errors import AnnotationError

from helpers import copy_sample

from helpers import keys, touch, write_jsonl


def test_missing_annotation_file_is_an_error(tmp_path):
    with pytest.raises(AnnotationError, match="annotation file not found"):
        discover_images(tmp_path, annotations=[tmp_path / "nope.jsonl"])


def test_data_root_must_exist(tmp_path):
    with pytest.raises(AnnotationError, match="data root is not a directory"):
        discover_images(tmp_path / "absent")


def test_missing_images_are_collected_not_fatal(tmp_path):
    touch(tmp_path / "ok.jpg")
    ann = write_jsonl(tmp_path / "a.jsonl", [{"images": ["ok.jpg", "lost/1.jpg", "lost/2.jpg", "lost/1.jpg"]}])
    d = discover_images(tmp_path, annotations=[ann])
    assert keys(d) == ["ok.jpg"]
    assert d.missing_keys == ["lost/1.jpg", "lost/2.jpg"]


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


def test_empty_annotation_directory_does_not_fall_back_to_scan(tmp_path):
    touch(tmp_path / "a.jpg")
    (tmp_path / "anns").mkdir()
    d = discover_images(tmp_path, annotations=[tmp_path / "anns"])
    assert d.items == [] and d.sources == []


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


def test_missing_images_name_their_annotation_file_and_line(tmp_path):
    touch(tmp_path / "ok.jpg")
    a = write_jsonl(tmp_path / "R2R" / "train.jsonl", [{"images": ["ok.jpg"]}, {"images": ["lost/1.jpg", "ok.jpg"]},
                                                      {"image": "lost/1.jpg"}])
    b = tmp_path / "annotations.json"
    b.write_text(json.dumps([{"image": "ok.jpg"}, {"history_images": ["lost/2.jpg"], "current_image": "ok.jpg"}]))
    d = discover_images(tmp_path, annotations=[b, a])
    assert d.missing_keys == ["lost/1.jpg", "lost/2.jpg"]
    assert [(m.key, m.path, m.file, m.line, m.references) for m in d.missing] == [
        ("lost/1.jpg", str(tmp_path / "lost" / "1.jpg"), str(a), 2, 2),
        ("lost/2.jpg", str(tmp_path / "lost" / "2.jpg"), str(b), 1, 1)]
    assert d.missing[0].to_json() == {"key": "lost/1.jpg", "path": str(tmp_path / "lost" / "1.jpg"),
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
    rec = json.loads(json.dumps(d.manifest_entry))
    assert [a["file"] for a in rec["annotations"]] == ["R2R/annotations.json", "seed/train.jsonl"]
    assert rec["auto"] and not rec["scan"] and rec["images"] == 2 and rec["missing"] == 1
    assert [(a["images"], a["missing"]) for a in rec["annotations"]] == [(1, 0), (1, 1)]
    os.rename(root, tmp_path / "moved")
    again = discover_recorded(tmp_path / "moved", rec)
    assert keys(again) == keys(d) == ["R2R/a.jpg", "seed/imgs/b.jpg"] and again.missing_keys == ["seed/imgs/x.jpg"]
    scan = discover_images(tmp_path / "moved")
    assert discover_recorded(tmp_path / "moved", scan.manifest_entry).items == scan.items
    (tmp_path / "moved" / "R2R" / "annotations.json").unlink()
    with pytest.raises(AnnotationError, match="no longer exists"):
        discover_recorded(tmp_path / "moved", rec)


def test_image_list(tmp_path):
    touch(tmp_path / "a b.jpg")
    touch(tmp_path / "d" / "c.png")
    lst = tmp_path / "lists" / "images.txt"
    lst.parent.mkdir()
    lst.write_text("# comment\na b.jpg\n\n  d/c.png  \nnot/here.jpg\r\n", encoding="utf-8")
    d = discover_images(tmp_path, image_list=lst)
    assert keys(d) == ["a b.jpg", "d/c.png"]
    assert d.missing_keys == ["not/here.jpg"]
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
