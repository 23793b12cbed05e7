"""Salvage: the whole records of a dead writer's unfinished shard kept, the rest cut, the archive ended."""

from __future__ import annotations

import os
from pathlib import Path

from featstore.errors import RecordError
from featstore.formats.keys import key_from_member
from featstore.formats.record import decode_record
from featstore.formats.shardinfo import BLOCK, RECORD_SIZE, parse_shard_name
from featstore.formats.shardwalk import BrokenShardError, walk_shard
from featstore.runtime.fsutil import TMP_MARKER, fsync_dir


def _complete_prefix(path: Path) -> tuple[int, int]:
    """(bytes, records) of the leading members of an unfinished shard that are whole and decode."""
    end = count = 0
    try:
        with open(path, "rb") as f:
            for m in walk_shard(f, str(path)):
                if key_from_member(m.name) != decode_record(m.data, verify=True).key:
                    break
                end, count = m.offset + len(m.data) + (-len(m.data) % BLOCK), count + 1
    except (BrokenShardError, RecordError, OSError):
        pass
    return end, count


def salvage_shard(tmp: Path, fsync: bool = True) -> tuple[str, int] | None:
    """Keep the whole records of a dead writer's unfinished shard ``tmp``: cut it after the last complete record,
    end the archive and publish it under the name it was being written for. Returns (name, records), or None
    when nothing could be kept (the file is then removed)."""
    final = tmp.with_name(tmp.name[1:].rsplit(TMP_MARKER, 1)[0])
    end, count = _complete_prefix(tmp) if parse_shard_name(final.name) and not final.exists() else (0, 0)
    if not count:
        tmp.unlink()
        return None
    with open(tmp, "r+b") as f:
        f.truncate(end)
        f.seek(end)
        tail = 2 * BLOCK + (-(end + 2 * BLOCK) % RECORD_SIZE)
        f.write(bytes(tail))
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    if fsync:
        fsync_dir(tmp.parent)
    return final.name, count
