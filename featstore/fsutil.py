"""Crash-safe file writes: write to a temporary name in the same directory, fsync, rename.

A reader (or a crash) at any instant sees either the old file or the new one, never a torn file.
Temporary names start with ``.`` and contain ``.tmp-`` so readers and ``verify`` can recognise them.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

from featstore.faults import crash_point

TMP_MARKER = ".tmp-"


def temp_name_for(path: Path) -> Path:
    """Return a unique hidden temporary path next to ``path`` (same filesystem, so rename is atomic)."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name}{TMP_MARKER}{tag}")


def is_temp_name(name: str) -> bool:
    """True for names produced by :func:`temp_name_for` (left behind only by a crashed writer)."""
    return name.startswith(".") and TMP_MARKER in name


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a completed rename survives a power loss."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", *, fsync: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only when the block exits cleanly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name_for(path)
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        if fsync:
            os.fsync(f.fileno())
        f.close()
        crash_point("atomic-before-rename")
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_json(path: Path | str, obj: Any, *, fsync: bool = True) -> None:
    """Write ``obj`` as pretty JSON to ``path`` atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)
