"""featstore.discover.scan and the one walk (runtime.walk): extensions, hidden entries, links, loops, output folders."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featstore.discover.images import discover_images

from helpers import keys, touch, write_jsonl


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


def test_one_walk_policy_for_images_and_annotation_files(tmp_path):
    """Both scans see the same folders: plain ones first, links afterwards, each real folder once, hidden
    entries and featstore's output folders never."""
    from featstore.discover.annotations import find_annotation_files

    for folder in ("data/ep", "data/.hidden", "data/vggt_featstore", "data/store", "outside/more"):
        touch(tmp_path / folder / "f.jpg")
        write_jsonl(tmp_path / folder / "train.jsonl", [{"image": "f.jpg"}])
    touch(tmp_path / "data" / "store" / "index.fsi")
    os.symlink(tmp_path / "data" / "ep", tmp_path / "data" / "a_link")  # sorts before "ep": plain path wins
    os.symlink(tmp_path / "outside", tmp_path / "data" / "out")
    os.symlink(tmp_path / "data", tmp_path / "data" / "ep" / "loop")
    images = keys(discover_images(tmp_path / "data"))
    annotations = [p.relative_to(tmp_path / "data").as_posix() for p in find_annotation_files(tmp_path / "data")]
    assert images == ["ep/f.jpg", "out/more/f.jpg"]
    assert annotations == ["ep/train.jsonl", "out/more/train.jsonl"]


def test_walk_order_is_name_order_depth_first(tmp_path):
    from featstore.runtime.walk import walk_files

    for name in ("b/2.x", "a/z/1.x", "a/0.x", "top.x", "c/.h.x", "c/skip.y"):
        touch(tmp_path / name)
    got = [os.path.relpath(f.path, tmp_path) for f in walk_files(tmp_path, lambda n: n.endswith(".x"))]
    assert got == ["top.x", "a/0.x", "a/z/1.x", "b/2.x"]
    assert [f.real for f in walk_files(tmp_path, lambda n: n == "top.x")] == [str(tmp_path / "top.x")]
