"""The alias index of a sample store: frame-list lookups for records keyed by an annotation ``id``.

A sample record's key is its annotation ``id`` when the id is unique, else the digest of its ordered frames
(:func:`featstore.formats.keys.frames_key`). So that a training dataset can find a record from the frames it holds
whatever the key, ``aliases.fsi`` (the index format of :mod:`featstore.formats.index`) maps the frame digest
of every id-keyed record to that record's bytes, and every annotation id of a deduplicated record (several
samples, one record: its meta ``ids``) to it. Stores whose records answer to no other key have no alias index.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from featstore.formats.index import write_index
from featstore.formats.keys import frames_key
from featstore.formats.layout import ALIAS_INDEX, SHARDS_DIR
from featstore.formats.shards import ShardEntry, read_record_meta

#: Context modes whose records are keyed by a frame list (one record per training sample).
SAMPLE_CONTEXTS = ("sample", "joint")


def frames_digest(meta: dict) -> str | None:
    """The frame-digest key of a sample record's metadata (None for an image record)."""
    frames = meta.get("frames")
    if meta.get("context") not in SAMPLE_CONTEXTS or not isinstance(frames, list):
        return None
    return frames_key([str(f) for f in frames], str(meta.get("reference_frame", "first")))


def alias_keys(key: str, meta: dict) -> list[str]:
    """The other keys a sample record answers to: its frame digest (when it is keyed otherwise) and every
    annotation id of a deduplicated record (meta ``ids``) other than its key."""
    out = []
    digest = frames_digest(meta)
    if digest is not None and digest != key:
        out.append(digest)
    ids = meta.get("ids") if digest is not None else None
    if isinstance(ids, list):
        out.extend(str(i) for i in ids if str(i) != key and str(i) not in out)
    return out


def alias_entries(shards: list[str], known: dict[str, list[ShardEntry]],
                  meta_of: Callable[[str, int], dict]) -> list[tuple[int, ShardEntry]]:
    """The alias index's entries of the sample records of ``shards``: each record's :func:`alias_keys`
    (``meta_of(shard, offset)`` reads a record's metadata: its header only)."""
    aliases: list[tuple[int, ShardEntry]] = []
    for pos, name in enumerate(shards):
        for e in known[name]:
            for alias in alias_keys(e.key, meta_of(name, e.offset)):
                aliases.append((pos, ShardEntry(alias, e.offset, e.length, e.crc32, e.tensors, e.source)))
    return aliases


def write_alias_index(out_dir: Path, shards: list[str], known: dict[str, list[ShardEntry]]) -> int:
    """(Re)write ``aliases.fsi`` for the sample records of ``shards`` of a local store; removes it when there
    are none. Returns the number of aliases."""
    fds: dict[str, int] = {}

    def meta_of(shard: str, offset: int) -> dict:
        if shard not in fds:
            fds[shard] = os.open(Path(out_dir) / SHARDS_DIR / shard, os.O_RDONLY)
        return read_record_meta(fds[shard], offset)

    try:
        aliases = alias_entries(shards, known, meta_of)
    finally:
        for fd in fds.values():
            os.close(fd)
    path = Path(out_dir) / ALIAS_INDEX
    if not aliases:
        if path.exists():
            path.unlink()
        return 0
    return write_index(path, shards, aliases)
