"""Crash-safe file writes: write to a temporary name in the same directory, fsync, rename.

A reader (or a crash) at any instant sees either the old file or the new one, never a torn file.
Temporary names start with ``.`` and contain ``.tmp-`` so readers and ``verify`` can recognise them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import socket
import uuid
from pathlib import Path
from typing import IO, Any, Collection, Iterable, Iterator

from featstore.errors import StoreError
from featstore.runtime.faults import crash_point

TMP_MARKER = ".tmp-"


def temp_name_for(path: Path) -> Path:
    """Return a unique hidden temporary path next to ``path`` (same filesystem, so rename is atomic)."""
    tag = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return path.with_name(f".{path.name}{TMP_MARKER}{tag}")


def is_temp_name(name: str) -> bool:
    """True for names produced by :func:`temp_name_for` (left behind only by a crashed writer)."""
    return name.startswith(".") and TMP_MARKER in name


def temp_writer_is_dead(name: str) -> bool:
    """True when ``name`` is a temporary file whose writer ran on this host and is no longer alive.

    Only such files are safe to delete while other processes (job-array parts, readers) may be writing.
    """
    if not is_temp_name(name):
        return False
    parts = name.rsplit(TMP_MARKER, 1)[1].rsplit("-", 2)  # host-pid-uuid (the host may contain "-")
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def final_name_of(temp_name: str) -> str:
    """The name a temporary file from :func:`temp_name_for` stands for (``.a.tar.tmp-h-1-x`` -> ``a.tar``)."""
    return temp_name[1:].rsplit(TMP_MARKER, 1)[0]


def remove_temp_files(directory: Path, *, finals: Collection[str] | None = None,
                      any_writer: bool = False) -> list[Path]:
    """Delete the temporary files (:func:`temp_name_for` names) in ``directory``; returns them.

    The one temp-file cleanup. By default it removes only those whose writer ran on this host and is dead,
    because other processes (job-array parts, another host) may be writing there now. ``finals`` keeps to the
    temporaries of these final names; ``any_writer=True`` removes them whoever wrote them, for a caller that
    holds the lock over every name it passes (only a killed run of its own can have left them).
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for e in entries:
        if not is_temp_name(e.name) or (finals is not None and final_name_of(e.name) not in finals):
            continue
        if e.is_file(follow_symlinks=False) and (any_writer or temp_writer_is_dead(e.name)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(e.path)
                removed.append(Path(e.path))
    return removed


def fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a completed rename survives a power loss."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def free_bytes(path: Path | str) -> int | None:
    """Bytes available to this user on the filesystem holding ``path`` (None when unknown)."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def disk_full_is_store_error(path: Path | str, needed: int | None = None) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT while writing ``path`` into a StoreError naming the file and the space needed."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = free_bytes(Path(path).parent)
        want = f"needs {needed:,} more bytes" if needed is not None else "needs more space"
        have = f", {free:,} bytes free there" if free is not None else ""
        raise StoreError(f"disk full: writing {path} {want}{have} ({e.strerror}). Nothing torn was left "
                         f"behind; free space (or choose another output) and re-run the same command to "
                         f"resume") from None


_swept_dirs: set[str] = set()


def sweep_dead_temps_once(directory: Path) -> None:
    """Remove dead writers' temporary files from ``directory`` the first time this process writes there.

    A write killed before its rename leaves a temporary file; re-running the command writes the same
    folder again, so the leftover goes away without anyone listing a folder more than once per process.
    """
    key = str(directory)
    if key not in _swept_dirs:
        _swept_dirs.add(key)
        remove_temp_files(directory)


@contextlib.contextmanager
def atomic_open(path: Path | str, mode: str = "wb", *, fsync: bool = True, needed: int | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` only when the block exits cleanly.

    A full disk raises StoreError naming ``path`` (and ``needed`` bytes when the caller knows them).
    """
    path = Path(path)
    with disk_full_is_store_error(path, needed):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_dead_temps_once(path.parent)
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
            with contextlib.suppress(OSError):  # closing flushes, which fails again on a full disk
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: Path | str, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_open(path, "wb", fsync=fsync, needed=len(data)) as f:
        f.write(data)


def pretty_json(obj: Any) -> bytes:
    """THE text of every JSON document featstore writes (manifests, build.json, parts): indented, UTF-8."""
    return (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n").encode("utf-8")


def jsonl_bytes(rows: Iterable[Any]) -> bytes:
    """THE text of every JSONL ledger featstore writes (missing, failures): one compact UTF-8 object a line."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def file_sha256(path: Path | str, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a local file's content, streamed (THE file digest: shards, indexes, inputs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_json(path: Path | str, obj: Any, *, fsync: bool = True) -> None:
    """Write ``obj`` as pretty JSON (:func:`pretty_json`) to ``path`` atomically."""
    atomic_write_bytes(path, pretty_json(obj), fsync=fsync)
