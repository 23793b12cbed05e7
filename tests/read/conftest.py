"""Stores the reader tests share: one image store of 12 one-record shards, one of 3 shards, per-image caches."""

from __future__ import annotations

import pytest

from helpers import build, copy_images


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    data = copy_images(root / "data")
    build(data, "--out", str(root / "many"), "--shard-size", "20KB")  # 12 shards of 1 record
    build(data, "--out", str(root / "few"), "--shard-size", "1500KB")  # 3 shards of 4 records
    build(data, "--format", "per-image")  # beside the images
    return root
