"""``featstore merge``: join the part files of a job-array build into one index and manifest."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from featstore.cli.args import add_storage_options_argument, out_location, storage_options_of

def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore merge``."""
    p = sub.add_parser("merge", help="join the parts of a job-array build into one index and manifest",
                       description="Merge the part files that `featstore build --num-parts K --part i` jobs leave "
                                   "into one index and manifest. Safe to re-run.")
    p.add_argument("store", type=out_location, help="the shard store folder or URL (--out of the builds), or the "
                                                     "per-image root")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args: argparse.Namespace) -> int:
    from featstore.errors import StoreError
    from featstore.formats.layout import PARTS_DIR, PER_IMAGE_MANIFEST, PER_IMAGE_STATE_DIR, SHARD_MANIFEST, SHARDS_DIR
    from featstore.build.merge import merge_per_image_store, merge_shard_store

    log = logging.getLogger("featstore")
    if isinstance(args.store, str):  # a URL: a remote shard store
        return _merge_remote(args.store, args)
    store: Path = args.store
    if not any((store / p).exists() for p in (SHARDS_DIR, PARTS_DIR, SHARD_MANIFEST, PER_IMAGE_STATE_DIR)):
        log.error("%s is not a featstore store: expected %s/, %s/ or %s there (the --out of `featstore build`, "
                  "or the per-image root)", store, SHARDS_DIR, PARTS_DIR, SHARD_MANIFEST)
        return 2
    try:
        if (store / PER_IMAGE_STATE_DIR).is_dir():
            m = merge_per_image_store(store, store / PER_IMAGE_MANIFEST)
        else:
            m = merge_shard_store(store)
    except StoreError as e:
        log.error("%s", e)
        return 2
    log.info("merged: %d records of %d images (complete: %s)", m["processed_images"], m["total_images"], m["complete"])
    return 0


def _merge_remote(url: str, args: argparse.Namespace) -> int:
    from featstore.errors import StoreError
    from featstore.storage.backends import parse_location
    from featstore.formats.layout import PARTS_DIR
    from featstore.formats.shardstore import list_store_shards
    from featstore.build.merge import merge_shard_store

    log = logging.getLogger("featstore")
    try:
        store = parse_location(url, storage_options_of(args))
        if not (list_store_shards(store) or store.list(PARTS_DIR)):
            log.error("%s is not a featstore store: expected shards/ or parts/ there (the --out of `featstore "
                      "build`)", store.display)
            return 2
        m = merge_shard_store(store)
    except (StoreError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("merged: %d records of %d images (complete: %s)", m["processed_images"], m["total_images"], m["complete"])
    return 0
