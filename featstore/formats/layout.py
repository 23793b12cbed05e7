"""Every name featstore gives a file or folder on disk, in one place.

A shard store is a folder (``vggt_featstore/`` under the data root by default)::

    manifest.json            the store's description (formats.manifest); written last
    index.fsi                key -> (shard, offset, length) (formats.index)
    aliases.fsi              sample id -> sample key, for stores keyed by annotation ids (formats.aliases)
    shards/<prefix>-<rank:05d>-<n:06d>.tar   records, one tar member "<encoded key>.fsr" each
    build.json               the settings a resume must match
    build_stats/rank-<gid:05d>.json          each build process's throughput time series (formats.buildstats)
    failures.jsonl, missing.jsonl            ledgers of failed and missing inputs
    parts/                   per-rank or per-part sub-stores before their merge
    .featstore.lock, .featstore.lock-<rank>  the build's and each rank's lock

A per-image store writes ``<image_path>.vggt_cache.pt`` beside each image (or mirrored under a cache
root), ``vggt_cache_manifest.json`` and the ``vggt_cache_*.jsonl`` ledgers at the data root, the throughput
series in ``vggt_cache_build_stats/`` at the cache root, and keeps its build state in ``.featstore/`` under the
cache root.
"""

from __future__ import annotations

import re

STORE_DIR = "vggt_featstore"  # the default output folder under the data root

# shard stores
SHARD_MANIFEST = "manifest.json"
INDEX_NAME = "index.fsi"
ALIAS_INDEX = "aliases.fsi"
SHARDS_DIR = "shards"
PARTS_DIR = "parts"
BUILD_CONFIG = "build.json"
BUILD_STATS_DIR = "build_stats"  # rank-<gid:05d>.json: records and stage seconds over time (formats.buildstats)
FAILURES_LEDGER = "failures.jsonl"
MISSING_LEDGER = "missing.jsonl"  # annotated images that do not exist: {"key", "path", "annotation", "line"}
SHARD_FORMAT = "featstore-shards"
RECORD_EXT = "fsr"  # featstore record: one tar member per record, "<encoded key>.fsr"
SHARD_RE = re.compile(r"^(?P<prefix>.+)-(?P<rank>\d{5})-(?P<n>\d{6})\.tar$")
DEFAULT_SHARD_BYTES = 1_000_000_000  # "1GB" as --shard-size takes it

# per-image stores
PER_IMAGE_SUFFIX = ".vggt_cache.pt"
PER_IMAGE_FORMAT = "<image_path>" + PER_IMAGE_SUFFIX
PER_IMAGE_MANIFEST = "vggt_cache_manifest.json"
PER_IMAGE_FAILURES_LEDGER = "vggt_cache_failures.jsonl"
PER_IMAGE_MISSING_LEDGER = "vggt_cache_missing.jsonl"
PER_IMAGE_STATE_DIR = ".featstore"
PER_IMAGE_BUILD_STATS_DIR = "vggt_cache_build_stats"

# locks
LOCK_NAME = ".featstore.lock"
RANK_LOCK_PREFIX = LOCK_NAME + "-"  # a non-zero rank's lock: ".featstore.lock-<rank name>"

# featstore's own files at a data root: never build inputs
OWN_FILE_NAMES = frozenset({PER_IMAGE_FAILURES_LEDGER, PER_IMAGE_MISSING_LEDGER, PER_IMAGE_MANIFEST})


def shard_name(prefix: str, rank: int, n: int) -> str:
    """The file name of shard `n` of `rank` (webdataset's ``<prefix>-<rank>-<n>.tar`` naming)."""
    return f"{prefix}-{rank:05d}-{n:06d}.tar"


def build_stats_name(layout: str, gid: int) -> str:
    """The throughput series file of build process ``gid`` in a store of ``layout`` ("shards" or "per-image")."""
    folder = BUILD_STATS_DIR if layout == "shards" else PER_IMAGE_BUILD_STATS_DIR
    return f"{folder}/rank-{gid:05d}.json"


def rank_lock_name(rank_name: str) -> str:
    """The lock file a non-zero rank holds in the store folder."""
    return RANK_LOCK_PREFIX + rank_name


def is_lock_name(name: str) -> bool:
    """Whether `name` is the build lock or a rank's lock."""
    return name == LOCK_NAME or name.startswith(RANK_LOCK_PREFIX)
