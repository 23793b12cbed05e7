"""When a stored record is stale: the one definition ``featstore build --rebuild-stale`` and ``featstore verify``
share.

A record notes its source image when it is built: size and mtime, plus the sha256 of the content when the
build ran with ``--hash-inputs``. A record with a sha256 is stale when the image's content differs (a size
change proves it without reading the image; otherwise the image is hashed), whatever its mtime says. A record
without one is stale when the image's size or mtime differ from the recorded ones. A sample record (a
record per training sample) notes every frame and is stale when any frame is.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from featstore.runtime.fsutil import file_sha256


def is_checkable(recorded: Mapping[str, Any] | None) -> bool:
    """True when a record's source note is enough to judge staleness."""
    return bool(recorded) and ("sha256" in recorded or ("size" in recorded and "mtime_ns" in recorded))


def source_changed(path: str | os.PathLike[str], recorded: Mapping[str, Any]) -> bool:
    """True when the image at ``path`` differs from the one the record was built from (see module docs).

    Raises OSError when the image cannot be read (a missing image is an orphan, not a stale record).
    """
    st = os.stat(path)
    digest = recorded.get("sha256")
    if digest:
        if "size" in recorded and int(recorded["size"]) != st.st_size:
            return True
        return file_sha256(path) != digest
    return (int(recorded.get("size", -1)), int(recorded.get("mtime_ns", -1))) != (st.st_size, st.st_mtime_ns)


def frames_changed(paths: Sequence[str], recorded: Sequence[Mapping[str, Any]]) -> bool:
    """True when any frame of a sample record differs from the one it was built from (``recorded``: the
    record's ``frame_sources``, one note per frame); a sample without per-frame notes counts as stale."""
    if len(recorded) != len(paths) or not all(is_checkable(r) for r in recorded):
        return True
    return any(source_changed(p, r) for p, r in zip(paths, recorded))
