"""``featstore export``: convert a store between shards and per-image caches (or re-encode shards)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from featstore.build.options import build_default
from featstore.cli.args import CODEC_CHOICES, add_storage_options_argument, format_size, parse_size, storage_options_of
from featstore.cli.help import HelpFormatter, command_module
from featstore.errors import FeatstoreError
from featstore.formats.layout import DEFAULT_SHARD_BYTES
from featstore.storage import is_remote, redact

def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """Define ``featstore export``."""
    p = sub.add_parser(
        "export", help="convert a store between shards and per-image caches",
        formatter_class=HelpFormatter,
        description="featstore export STORE --format per-image [--out DIR]: write <image>.vggt_cache.pt files "
                    "beside the images (or mirrored under --out) from a shard store, bit for bit. "
                    "featstore export DATA_ROOT --format shards --out DIR [--codec C]: pack per-image caches "
                    "(including legacy ones with only 'features' and 'path') into shards, or re-encode a shard "
                    "store with another codec. Lossy (int8) records are exported dequantized, marked lossy "
                    "with their error bound. Exit 0 when every record was "
                    "exported, 1 when some were refused or unreadable, 2 when the export could not run.")
    p.add_argument("source", help="a shard store folder, or for --format per-image its URL (s3://bucket/prefix, "
                                  "any fsspec URL); or a data root holding per-image caches (for --format shards)")
    p.add_argument("--format", required=True, choices=("per-image", "shards"), help="the layout to write")
    p.add_argument("--out", type=Path, help="per-image: mirror caches under this folder instead of beside the "
                                            "images; shards: the new store folder (required)")
    p.add_argument("--shard-size", type=parse_size, default=format_size(DEFAULT_SHARD_BYTES),
                   help="target shard size (shards only)")
    p.add_argument("--shard-prefix", default=build_default("shard_prefix"), help="shard file name prefix (shards only)")
    p.add_argument("--codec", choices=CODEC_CHOICES, default=build_default("codec"),
                   help="shards only: codec of every tensor (zstd lossless, raw uncompressed, int8 lossy with its "
                        "error stored per record); re-encodes a shard store or packs per-image caches")
    p.add_argument("--no-fsync", dest="fsync", action="store_false", help="skip fsync after writes")
    add_storage_options_argument(p)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    export = command_module("featstore.export")
    log = logging.getLogger("featstore")
    if args.format == "shards" and is_remote(args.source):
        log.error("--format shards reads a local store or data root, not %s; export the remote store with "
                  "--format per-image, or copy it to local disk first", redact(args.source))
        return 2
    if args.format == "shards" and args.out is None:
        log.error("--format shards needs --out DIR (the new shard store folder)")
        return 2
    try:
        if args.format == "per-image":
            res = export.export_to_per_image(args.source, args.out, fsync=args.fsync,
                                             storage_options=storage_options_of(args))
        else:
            res = export.export_to_shards(Path(args.source), args.out, shard_size=args.shard_size,
                                          prefix=args.shard_prefix, fsync=args.fsync, codec=args.codec)
    except (FeatstoreError, OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    log.info("exported to %s: %d written, %d unchanged, %d refused, %d unreadable", res.out, res.written,
             res.unchanged, len(res.refused), len(res.failed))
    if res.refused:
        log.error("refused %d keys that would land outside %s, e.g. %s", len(res.refused), res.out, res.refused[:3])
    return 0 if res.ok else 1
