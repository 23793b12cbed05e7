"""Whole-object helpers over any :class:`Storage`: JSON documents and sha256 digests."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from featstore.runtime.fsutil import file_sha256, pretty_json
from featstore.storage.base import Storage


def publish_json(storage: Storage, name: str, obj: Any) -> None:
    """Write ``obj`` as pretty JSON to object ``name`` atomically (same text as ``fsutil.atomic_write_json``)."""
    storage.publish_bytes(name, pretty_json(obj))


def read_json(storage: Storage, name: str) -> Any:
    """Parse object ``name`` as JSON (FileNotFoundError when absent, ValueError when not JSON)."""
    return json.loads(storage.read_bytes(name))


def sha256_of(storage: Storage, name: str) -> str:
    """sha256 hex digest of object ``name``, streamed (a local file through ``fsutil.file_sha256``)."""
    local = storage.local_path(name)
    if local is not None:
        return file_sha256(local)
    h = hashlib.sha256()
    for chunk in storage.iter_range(name):
        h.update(chunk)
    return h.hexdigest()
