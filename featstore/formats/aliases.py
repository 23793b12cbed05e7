"""The alias index of a sample store: frame-list lookups for records keyed by an annotation ``id``.

A sample record's key is its annotation ``id`` when the id is unique, else the digest of its ordered frames
(:func:`featstore.formats.keys.frames_key`). So that a training dataset can find a record from the frames it holds
whatever the key, ``aliases.fsi`` (the index format of :mod:`featstore.formats.index`) maps the frame digest
of every id-keyed record to that record's bytes. Stores whose keys are all digests have no alias index.
"""

from __future__ import annotations

import os
from pathlib import Path

from featstore.formats.index import write_index
from featstore.formats.keys import SAMPLE_KEY_PREFIX, frames_key
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


def write_alias_index(out_dir: Path, shards: list[str], known: dict[str, list[ShardEntry]]) -> int:
    """(Re)write ``aliases.fsi`` for the id-keyed records of ``shards`` (reads those records' headers only);
    removes it when there are none. Returns the number of aliases."""
    aliases: list[tuple[int, ShardEntry]] = []
    for pos, name in enumerate(shards):
        ided = [e for e in known[name] if not e.key.startswith(SAMPLE_KEY_PREFIX)]
        if not ided:
            continue
        fd = os.open(Path(out_dir) / SHARDS_DIR / name, os.O_RDONLY)
        try:
            for e in ided:
                digest = frames_digest(read_record_meta(fd, e.offset))
                if digest is not None and digest != e.key:
                    aliases.append((pos, ShardEntry(digest, e.offset, e.length, e.crc32, e.tensors, e.source)))
        finally:
            os.close(fd)
    path = Path(out_dir) / ALIAS_INDEX
    if not aliases:
        if path.exists():
            path.unlink()
        return 0
    return write_index(path, shards, aliases)
