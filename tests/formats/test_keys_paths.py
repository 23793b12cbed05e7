"""Key <-> path in both directions (formats.keys): the per-image cache layout readers and writers share, and
the strict checks every writer applies (no '..', no absolute key, no link out of the root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from featstore.errors import RecordError
from featstore.formats.keys import CacheLayout, cache_file_beside, image_path_of, key_for_path
from helpers import build_args, make_images, run_inproc


def test_key_to_cache_file_and_back(tmp_path):
    beside = CacheLayout(tmp_path / "data")
    mirrored = CacheLayout(tmp_path / "data", tmp_path / "out")
    key = "ep1/frame.000.jpg"
    assert beside.path(key) == tmp_path / "data" / "ep1" / "frame.000.jpg.vggt_cache.pt"
    assert mirrored.path(key) == tmp_path / "out" / "ep1" / "frame.000.jpg.vggt_cache.pt"
    for layout in (beside, mirrored):
        assert layout.destination(key) == layout.path(key)
        assert layout.key_of(layout.path(key)) == key
    assert beside.key_of(tmp_path / "data" / "ep1" / "frame.000.jpg") is None  # the image, not a cache
    assert beside.path("/abs/x.jpg") == Path("/abs/x.jpg.vggt_cache.pt")  # an older store's image outside the root
    with pytest.raises(RecordError, match="outside the data root"):
        mirrored.path("/abs/x.jpg")
    assert cache_file_beside(tmp_path / "a.png") == tmp_path / "a.png.vggt_cache.pt"


def test_key_to_image_and_back(tmp_path):
    root = tmp_path / "data"
    assert image_path_of("ep1/a.jpg", root) == str(root / "ep1" / "a.jpg")
    assert image_path_of("/elsewhere/b.jpg", root) == "/elsewhere/b.jpg"
    for key in ("ep1/a.jpg", "/elsewhere/b.jpg"):
        assert key_for_path(image_path_of(key, root), root) == key


@pytest.mark.parametrize("key", ["../evil.jpg", "a/../../evil.jpg", "/abs/evil.jpg", "", "a//b.jpg"])
def test_destination_refuses_keys_that_leave_the_root(tmp_path, key):
    for layout in (CacheLayout(tmp_path / "data"), CacheLayout(tmp_path / "data", tmp_path / "out")):
        with pytest.raises(RecordError, match="refusing key"):
            layout.destination(key)


def test_destination_refuses_links_out_of_the_root_only(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    (root / "real").mkdir(parents=True)
    outside.mkdir()
    os.symlink(outside, root / "mounted")
    os.symlink(root / "real", root / "alias")          # a link that stays inside the root is fine
    os.symlink(tmp_path / "x", root / "real" / "b.jpg.vggt_cache.pt")
    layout = CacheLayout(root)
    with pytest.raises(RecordError, match="resolves through a link to .*outside.*--out DIR"):
        layout.destination("mounted/a.jpg")
    assert layout.destination("alias/a.jpg") == root / "alias" / "a.jpg.vggt_cache.pt"
    with pytest.raises(RecordError, match="is a symbolic link"):
        layout.destination("real/b.jpg")
    # the root itself given through a link
    os.symlink(root, tmp_path / "link")
    assert CacheLayout(tmp_path / "link").destination("real/a.jpg") == tmp_path / "link" / "real" / "a.jpg.vggt_cache.pt"
    mirrored = CacheLayout(root, tmp_path / "out")
    (tmp_path / "out").mkdir()
    os.symlink(outside, tmp_path / "out" / "mounted")
    with pytest.raises(RecordError, match="remove the link from the output folder"):
        mirrored.destination("mounted/a.jpg")


def test_per_image_build_refuses_a_folder_linked_out_of_the_data_root(tmp_path):
    """A per-image build writes only under its root, as export does: one [ERROR] line naming the key and the
    fix, exit 2, before the model loads, nothing written."""
    make_images(tmp_path / "data", 2)
    make_images(tmp_path / "outside", 2, prefix="cam")
    os.symlink(tmp_path / "outside" / "cam0", tmp_path / "data" / "mounted")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for resume in ("--skip-existing", "--no-skip-existing"):
        r = run_inproc(*build_args(tmp_path / "data", "--format", "per-image", resume))
        assert r.returncode == 2, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]
        assert len(errors) == 1 and "mounted/frame.000.png" in errors[0] and "--out DIR" in errors[0], r.stderr
        assert "Traceback" not in r.stderr
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
