"""What discovery's folder scans skip and take: featstore's own output folders are never sources, and image
files are known by their extension. The walk itself (links, hidden entries) is ``runtime.walk.walk_files``."""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

from featstore.formats.layout import BUILD_CONFIG, INDEX_NAME, SHARDS_DIR, STORE_DIR
from featstore.runtime.walk import WalkedFile, walk_files

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})


def is_image_name(name: str) -> bool:
    """An image file name: one of :data:`IMAGE_EXTENSIONS` in any letter case, not hidden."""
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS and not name.startswith(".")


def is_output_folder(name: str, names: set[str]) -> bool:
    """A folder featstore writes (``vggt_featstore/``, or any folder holding a shard store: ``index.fsi``, or
    ``build.json`` beside ``shards/``): its contents are never sources."""
    return name == STORE_DIR or INDEX_NAME in names or (BUILD_CONFIG in names and SHARDS_DIR in names)


def scan_files(top: str | os.PathLike[str], accept: Callable[[str], bool],
               exclude: Iterable[str] = ()) -> Iterator[WalkedFile]:
    """The files under ``top`` that ``accept`` takes, featstore's output folders and ``exclude`` skipped (the
    one walk policy of ``runtime.walk``)."""
    return walk_files(top, accept, exclude=exclude, prune=is_output_folder)


def scan_images(top: str | os.PathLike[str], exclude: Iterable[str] = ()) -> Iterator[WalkedFile]:
    """Every image file under ``top`` (jpg, jpeg, png, webp, bmp in any letter case)."""
    return scan_files(top, is_image_name, exclude)
