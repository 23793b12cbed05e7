"""Where a store lives: a local folder, or an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).

This package is the one place that knows the difference: :func:`parse_location` turns a location into a
:class:`Storage` (:mod:`.base`) whose methods take names relative to the store root. Local paths (and
``file://`` URLs) are served by :mod:`.local` with plain ``os`` calls and the open-file LRU of :mod:`.mapped`,
and never import fsspec; every other protocol goes through :mod:`.remote`. Credentials are redacted from every
message (:mod:`.redact`); :mod:`.staging` and :mod:`.objects` hold helpers over any storage.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from featstore.storage.base import (DEFAULT_CHUNK_BYTES, DEFAULT_MAX_OPEN, DEFAULT_READ_AHEAD, ChunkStream, Storage,
                                    join_name)
from featstore.storage.local import LocalStorage
from featstore.storage.mapped import MappedFile, OpenFiles
from featstore.storage.objects import publish_json, read_json, sha256_of
from featstore.storage.options import storage_options_from_json
from featstore.storage.redact import (REDACTED, SECRET_ENV_VARS, RedactingFilter, install_log_redaction, redact,
                                      redact_url, register_secrets)
from featstore.storage.remote import ATOMIC_CREATE_PROTOCOLS, OBJECT_STORE_PROTOCOLS, S3_PROTOCOLS, FsspecStorage
from featstore.storage.staging import local_copy, local_file_to_publish, reset_staging_dir, staging_dir

# A URL with a protocol fsspec could serve, or an fsspec chain such as ``simplecache::s3://...``.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for an fsspec URL other than ``file://`` (those need fsspec and a backend)."""
    if not isinstance(location, str):
        return False
    return bool(_URL_RE.match(location)) and not location.startswith("file://")


def local_path_of(location: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or a ``file://`` URL."""
    s = os.fspath(location)
    if isinstance(s, bytes):
        s = os.fsdecode(s)
    if s.startswith("file://"):
        s = s[len("file://"):]
        if s.startswith("localhost/"):
            s = s[len("localhost"):]
    return Path(s)


def parse_location(location: str | os.PathLike[str] | Storage,
                   storage_options: Mapping[str, Any] | None = None) -> Storage:
    """A :class:`Storage` for a local path, ``file://`` URL or any fsspec URL (``s3://bucket/prefix``)."""
    if isinstance(location, Storage):
        return location
    if is_remote(location):
        return FsspecStorage(str(location), storage_options)
    return LocalStorage(local_path_of(location))


__all__ = ["Storage", "LocalStorage", "FsspecStorage", "MappedFile", "OpenFiles", "ChunkStream", "parse_location",
           "is_remote", "local_path_of", "join_name", "staging_dir", "reset_staging_dir", "local_file_to_publish",
           "local_copy", "publish_json", "read_json", "sha256_of", "redact", "redact_url", "register_secrets",
           "install_log_redaction", "RedactingFilter", "REDACTED", "SECRET_ENV_VARS", "storage_options_from_json",
           "ATOMIC_CREATE_PROTOCOLS",
           "OBJECT_STORE_PROTOCOLS", "S3_PROTOCOLS", "DEFAULT_CHUNK_BYTES", "DEFAULT_READ_AHEAD", "DEFAULT_MAX_OPEN"]
