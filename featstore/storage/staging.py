"""Local files standing in for objects of a (possibly remote) store: the folder a rank writes shards into
before they are uploaded, a local path to write an object through, and a local copy of an object to read."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from featstore.storage.base import Storage
from featstore.storage.redact import redact


def staging_dir(storage: Storage, gid: int) -> Path:
    """This host's local folder where rank ``gid`` writes shards bound for the remote ``storage``.

    Deterministic (per store and rank) so that a resumed build finds and clears what a killed one left;
    ``FEATSTORE_STAGING_DIR`` or the system temporary folder holds it.
    """
    base = os.environ.get("FEATSTORE_STAGING_DIR") or tempfile.gettempdir()
    tag = hashlib.sha256(redact(storage.display).encode()).hexdigest()[:16]
    return Path(base) / f"featstore-staging-{os.getuid()}" / f"{tag}-{gid:05d}"


def reset_staging_dir(path: Path) -> None:
    """Empty a staging folder (its rank's lock is held, so anything there is a killed run's leftover)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def local_file_to_publish(storage: Storage, name: str) -> Iterator[Path]:
    """A local path to write object ``name`` through; a remote store gets the file uploaded after the block.

    For a local store this is the final path itself (the writer makes its own write atomic, e.g. with
    :func:`featstore.runtime.fsutil.atomic_open`); nothing is uploaded when the block raises.
    """
    local = storage.local_path(name)
    if local is not None:
        yield local
        return
    stage = Path(tempfile.mkdtemp(prefix="featstore-stage-"))
    try:
        path = stage / os.path.basename(name)
        yield path
        storage.publish_file(name, path, move=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def local_copy(storage: Storage, name: str) -> Iterator[Path]:
    """A local file holding object ``name``: the file itself when local, else a temporary download."""
    local = storage.local_path(name)
    if local is not None:
        yield local
        return
    fd, tmp = tempfile.mkstemp(prefix="featstore-copy-", suffix=os.path.basename(name))
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in storage.iter_range(name):
                f.write(chunk)
        yield Path(tmp)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
