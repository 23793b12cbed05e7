"""Tar shards, the one import for shard code: names and index entries (:mod:`~featstore.formats.shardinfo`),
the writer (:mod:`~featstore.formats.shardwriter`), the walker and readers (:mod:`~featstore.formats.shardwalk`)
and salvage of a dead writer's shard (:mod:`~featstore.formats.shardsalvage`).

Shards are plain POSIX tar files named like webdataset shards, ``<prefix>-<rank>-<n>.tar``, holding one
member ``<encoded key>.fsr`` per record (see :mod:`featstore.formats.keys`). A shard becomes visible under
its final name only once it is complete and fsynced, so readers never see a torn shard.
"""

from __future__ import annotations

from featstore.formats.shardinfo import (BLOCK, RECORD_SIZE, ClosedShard, ShardEntry, ShardInfo, complete_shards,
                                         entry_from_record_bytes, list_shards, parse_shard_name)
from featstore.formats.shardsalvage import salvage_shard
from featstore.formats.shardwalk import (BrokenShardError, HashingReader, TarMember, entries_of_stream,
                                         iter_shard_records, read_record_meta, read_record_meta_at, scan_shard,
                                         scan_stored_shard, walk_shard)
from featstore.formats.shardwriter import ShardWriter

__all__ = ["BLOCK", "RECORD_SIZE", "BrokenShardError", "ClosedShard", "HashingReader", "ShardEntry", "ShardInfo",
           "ShardWriter", "TarMember", "complete_shards", "entries_of_stream", "entry_from_record_bytes", "iter_shard_records",
           "list_shards", "parse_shard_name", "read_record_meta", "read_record_meta_at", "salvage_shard", "scan_shard",
           "scan_stored_shard", "walk_shard"]
