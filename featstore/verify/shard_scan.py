"""Checking one shard (runs in a worker process): the whole shard in one sequential pass on the formats tar
walker, whose bytes also feed the sha256, or only the sampled records' byte ranges (``--sample``)."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

from featstore.formats.keys import key_from_member
from featstore.formats.layout import SHARDS_DIR
from featstore.formats.record import crc32_of
from featstore.formats.shards import BrokenShardError, HashingReader, TarMember, walk_shard
from featstore.storage import Storage
from featstore.verify.checks import Expectations, check_record_bytes
from featstore.verify.fixes import rebuild_shard
from featstore.verify.report import CheckedBatch, Finding


class Indexed(NamedTuple):
    """Where the index says a record of this shard is."""

    offset: int
    length: int
    crc32: int


@dataclass
class ShardScan(CheckedBatch):
    """What the check of one shard found: findings, plus what only the parent can judge, knowing every key."""

    shard: str = ""
    seen: list[str] = field(default_factory=list)  # keys found where this shard's index entries point
    unindexed: list[tuple[str, int]] = field(default_factory=list)  # (key, data offset) not indexed in this shard
    broken: bool = False  # the tar structure could not be read to its end
    sha256: str | None = None  # of the whole file (full scans only)
    bytes: int | None = None


def scan_shard_file(storage: Storage, shard: str, indexed: dict[str, Indexed], ex: Expectations) -> ShardScan:
    """Check every member of one shard, its tar structure and (the same bytes) its sha256 in one pass."""
    scan = ShardScan(shard=shard)
    members: Counter = Counter()
    fix = rebuild_shard(shard, ex.rebuild)
    with storage.open_sequential(f"{SHARDS_DIR}/{shard}") as f:  # remote: chunked GETs with read-ahead
        reader = HashingReader(f)
        try:
            for m in walk_shard(reader, shard):
                _check_member(scan, m, indexed, members, ex)
            reader.drain()
        except (BrokenShardError, OSError) as e:
            reason = e.reason if isinstance(e, BrokenShardError) else str(e)
            scan.broken = True
            scan.findings.append(Finding("shard", shard, f"tar structure is broken ({reason}); shard may be "
                                                         f"truncated", fix))
            with contextlib.suppress(OSError):
                reader.drain()  # the sha256 is of the whole file still
    scan.sha256, scan.bytes = reader.hexdigest(), reader.pos
    return scan


def _check_member(scan: ShardScan, m: TarMember, indexed: dict[str, Indexed], members: Counter,
                  ex: Expectations) -> None:
    """Check one tar member against this shard's index entries, then its record."""
    fix = rebuild_shard(scan.shard, ex.rebuild)
    key = key_from_member(m.name)
    if key is None:
        scan.findings.append(Finding("shard", f"{scan.shard}:{m.name}", "unexpected tar member", fix))
        return
    members[key] += 1
    if members[key] == 2:
        scan.findings.append(Finding("duplicate", key, f"stored twice in shard {scan.shard}", fix))
    entry = indexed.get(key)
    if entry is None:
        scan.unindexed.append((key, m.offset))
        return
    if entry.offset != m.offset:
        return  # another copy of a key the index places elsewhere in this shard: the parent names the entry
    scan.seen.append(key)
    scan.records += 1
    crc = crc32_of(m.data)
    if entry.length != len(m.data) or entry.crc32 != crc:
        scan.findings.append(Finding("index", key, f"index length/crc32 ({entry.length}, {entry.crc32:08x}) differ "
                                                   f"from the stored bytes ({len(m.data)}, {crc:08x}) in {scan.shard}",
                                     fix))
    found, info = check_record_bytes(key, m.data, ex, fix, f"in shard {scan.shard} at offset {m.offset}")
    scan.findings += found
    scan.info.update(info)


def check_entries(storage: Storage, shard: str, entries: list[tuple[str, Indexed]], ex: Expectations) -> ShardScan:
    """Check sampled records of one shard by reading only their bytes (``--sample``)."""
    scan = ShardScan(shard=shard, seen=[key for key, _ in entries], records=len(entries))
    fix = f"re-run `{ex.rebuild} --no-skip-existing`, or run `featstore verify` without --sample for details"
    try:
        for key, at in entries:
            data = storage.read_range(f"{SHARDS_DIR}/{shard}", at.offset, at.length)
            crc = crc32_of(data)
            if len(data) != at.length or crc != at.crc32:
                scan.findings.append(Finding("index", key, f"bytes at offset {at.offset} of {shard} do not match the "
                                                           f"index entry (length {len(data)}/{at.length}, crc32 "
                                                           f"{crc:08x}/{at.crc32:08x})", fix))
                continue
            found, info = check_record_bytes(key, data, ex, fix, f"in shard {shard}")
            scan.findings += found
            scan.info.update(info)
    finally:
        storage.close()
    return scan
