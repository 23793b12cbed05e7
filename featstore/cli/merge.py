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
    from featstore.formats.layout import PER_IMAGE_MANIFEST
    from featstore.formats.locate import locate_store
    from featstore.build.merge import merge_per_image_store, merge_shard_store

    log = logging.getLogger("featstore")
    try:
        loc = locate_store(args.store, storage_options_of(args), unmerged=True)
        if loc.layout == "per-image":
            m = merge_per_image_store(Path(loc.root), Path(loc.root) / PER_IMAGE_MANIFEST)
        else:
            m = merge_shard_store(loc.storage)
    except (StoreError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("merged: %d records of %d images (complete: %s)", m["processed_images"], m["total_images"], m["complete"])
    return 0
