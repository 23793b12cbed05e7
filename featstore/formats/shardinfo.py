"""What a shard is, as every shard module sees it: its name pattern, the index entry of one record
(:class:`ShardEntry`), a closed shard's summary (:class:`ShardInfo`, :class:`ClosedShard`) and the listing."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from featstore.errors import RecordError
from featstore.formats.layout import SHARD_RE
from featstore.formats.record import decode_header

BLOCK = 512
RECORD_SIZE = 20 * BLOCK  # tar archives end padded to a multiple of this


@dataclass(frozen=True)
class ShardEntry:
    """Where one record lives: member data offset and length inside a shard, and what its header says."""

    key: str
    offset: int
    length: int
    crc32: int  # crc32 of the whole stored record bytes
    tensors: tuple[tuple[str, str, tuple[int, ...]], ...]  # (name, dtype, shape) per tensor
    source: tuple[int, int]  # (size, mtime_ns) of the source image when the record was built


@dataclass(frozen=True)
class ShardInfo:
    """A closed shard: its file name, record count, size and sha256."""

    name: str
    records: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ClosedShard:
    """What :class:`ShardWriter` hands its ``post`` hook as each shard closes: the shard, the index entries of
    its records (in offset order) and the local file under its final name."""

    info: ShardInfo
    entries: list[ShardEntry]
    path: Path



def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """Return (prefix, rank, n) for a shard file name, or None."""
    m = SHARD_RE.match(name)
    return (m["prefix"], int(m["rank"]), int(m["n"])) if m else None


def complete_shards(listing: Mapping[str, int]) -> dict[str, int]:
    """THE shard listing rule: the complete shards of a folder listing (name or path -> bytes), by base name;
    only shard names count (a temporary file never parses as one)."""
    return {n.rsplit("/", 1)[-1]: size for n, size in listing.items() if parse_shard_name(n.rsplit("/", 1)[-1])}


def list_shards(shards_dir: Path) -> list[str]:
    """Names of the complete shards in the local folder ``shards_dir``, sorted."""
    if not shards_dir.is_dir():
        return []
    return sorted(complete_shards({e.name: 0 for e in os.scandir(shards_dir) if e.is_file()}))


def entry_from_record_bytes(key: str, offset: int, data: bytes | memoryview) -> ShardEntry:
    """Build the index entry for record bytes stored at ``offset``."""
    header, specs, _ = decode_header(data)
    if header["key"] != key:
        raise RecordError(f"member for key {key!r} holds a record for {header['key']!r}")
    src = (header.get("meta") or {}).get("source") or {}
    return ShardEntry(key, offset, len(data), zlib.crc32(data) & 0xFFFFFFFF,
                      tuple((s.name, s.dtype, s.shape) for s in specs),
                      (int(src.get("size", -1)), int(src.get("mtime_ns", -1))))
