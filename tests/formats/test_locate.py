"""locate_store: what store lives at a path (the one answer open_store, stream, verify, export and merge use)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from featstore.errors import StoreError
from featstore.formats.layout import PARTS_DIR, PER_IMAGE_MANIFEST, PER_IMAGE_STATE_DIR, SHARD_MANIFEST, STORE_DIR
from featstore.formats.locate import LEGACY, PER_IMAGE, SHARDS, locate_store

OLD = Path(__file__).resolve().parents[1] / "data" / "stores"


def test_shard_store_folder_manifest_file_and_data_root_agree(tmp_path):
    shutil.copytree(OLD / "shards_zstd", tmp_path / "data" / STORE_DIR)
    store = tmp_path / "data" / STORE_DIR
    found = [locate_store(p) for p in (store, store / SHARD_MANIFEST, tmp_path / "data", f"file://{store}")]
    assert {(f.kind, Path(f.root), f.manifest_path) for f in found} == {(SHARDS, store, store / SHARD_MANIFEST)}
    assert found[0].layout == "shards" and found[0].storage.local_path() == store and not found[0].is_remote
    assert found[0].data_root == "/tmp/read-old/data"  # the manifest's


def test_per_image_and_legacy_caches(tmp_path):
    mirrored = tmp_path / "mirrored"
    shutil.copytree(OLD / "per_image", mirrored)
    loc = locate_store(mirrored)
    assert loc.kind == PER_IMAGE and loc.layout == "per-image" and loc.manifest_path == mirrored / PER_IMAGE_MANIFEST
    assert loc.data_root == "/tmp/read-old/data"  # a mirrored cache root: the images are where the manifest says
    beside = tmp_path / "beside"
    shutil.copytree(OLD / "per_image", beside)
    manifest = (beside / PER_IMAGE_MANIFEST).read_text().replace(f'"cache_root": "{_cache_root()}"', '"cache_root": null')
    (beside / PER_IMAGE_MANIFEST).write_text(manifest)
    assert locate_store(beside).data_root == str(beside)  # caches beside the images: where the manifest is now
    (beside / PER_IMAGE_MANIFEST).unlink()
    legacy = locate_store(beside)
    assert legacy.kind == LEGACY and legacy.manifest is None and legacy.document() == {
        "layout": "per-image", "data_root": str(beside.resolve())}


def _cache_root() -> str:
    import json

    return json.loads((OLD / "per_image" / PER_IMAGE_MANIFEST).read_text())["cache_root"]


def test_nothing_there_is_one_actionable_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        locate_store(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no featstore manifest under"):
        locate_store(tmp_path / "empty")
    with pytest.raises(StoreError, match="is not a featstore store"):
        locate_store(tmp_path / "empty", unmerged=True)


def test_unmerged_build_output(tmp_path):
    (tmp_path / "shards_out" / PARTS_DIR).mkdir(parents=True)
    loc = locate_store(tmp_path / "shards_out", unmerged=True)
    assert loc.kind == SHARDS and loc.manifest is None
    with pytest.raises(StoreError):
        locate_store(tmp_path / "shards_out")  # a reader needs the merged store
    (tmp_path / "caches" / PER_IMAGE_STATE_DIR).mkdir(parents=True)
    assert locate_store(tmp_path / "caches", unmerged=True).kind == PER_IMAGE
