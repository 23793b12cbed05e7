"""featstore.discover.references: image references resolved to keys and files (data_path, root, annotation folder)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featstore.discover.images import discover_images
from featstore.discover.references import ImageResolver, resolve_image_ref

from helpers import keys, touch, write_jsonl


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
    assert d.missing_keys == ["sub/gone.jpg"]
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


def test_directory_reference_is_missing_not_an_image(tmp_path):
    (tmp_path / "dir.jpg").mkdir()
    ann = write_jsonl(tmp_path / "a.jsonl", [{"image": "dir.jpg"}])
    d = discover_images(tmp_path, annotations=[ann])
    assert d.items == [] and d.missing_keys == ["dir.jpg"]
