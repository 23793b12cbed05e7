"""Image keys, the paths they name, and their webdataset-safe tar member names.

An image key is the image's posix path relative to the data root (``ep1/frame.000.jpg``), or its absolute
path for an image outside the data root. This module is the one place that goes from a key to a path and
back: the source image (:func:`key_for_path`, :func:`image_path_of`) and the per-image cache file
(:class:`CacheLayout`: ``path`` for readers, ``destination`` for writers, which refuses any file outside the
root, and ``key_of``).

webdataset splits a member name at the first dot of its basename, so keys are percent-encoded into a flat
token with no dots or slashes; the original key is also stored inside the record.

A training sample's key without an annotation id is the digest of its ordered frame keys (:func:`frames_key`),
the same rule for writers (the build, ``aliases.fsi``) and readers (``get_sample(frames)``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence
from urllib.parse import quote, unquote

from featstore.errors import RecordError
from featstore.formats.layout import PER_IMAGE_SUFFIX, RECORD_EXT

SAMPLE_KEY_PREFIX = "sample-"


def frames_key(frames: Sequence[str], reference_frame: str = "first") -> str:
    """THE frame-list key of a sample record: ``"sample-" + sha256(json.dumps([reference_frame, *frames],
    ensure_ascii=True, separators=(",", ":")).encode("ascii")).hexdigest()[:32]`` (frames in training order)."""
    payload = json.dumps([reference_frame, *frames], ensure_ascii=True, separators=(",", ":"))
    return SAMPLE_KEY_PREFIX + hashlib.sha256(payload.encode("ascii")).hexdigest()[:32]


def encode_key(key: str) -> str:
    """Encode ``key`` as a token of ``[A-Za-z0-9_%-]`` only (reversible, non-UTF-8 names included)."""
    token = quote(key, safe="", errors="surrogateescape")
    return token.replace(".", "%2E").replace("~", "%7E")


def decode_key(token: str) -> str:
    """Invert :func:`encode_key`."""
    return unquote(token, errors="surrogateescape")


def member_name(key: str) -> str:
    """Return the tar member name that holds ``key``'s record."""
    return f"{encode_key(key)}.{RECORD_EXT}"


def key_from_member(name: str) -> str | None:
    """Return the key stored under tar member ``name``, or None if it is not a record member."""
    token, dot, ext = name.rpartition(".")
    if not dot or ext != RECORD_EXT or "/" in token or "." in token:
        return None
    return decode_key(token)


def is_safe_relative_key(key: str) -> bool:
    """True if ``key`` is a relative posix path that stays inside its root (no '..', no absolute path)."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return False
    parts = key.split("/")
    return all(p not in ("", ".", "..") for p in parts)


def root_prefixes(data_root: str | os.PathLike[str]) -> tuple[str, ...]:
    """The data root as path prefixes (as given and with links resolved), each ending in a separator."""
    root = os.path.abspath(os.fspath(data_root))
    return tuple(dict.fromkeys(r.rstrip(os.sep) + os.sep for r in (root, os.path.realpath(root))))


def key_under(path: str, prefixes: tuple[str, ...]) -> str:
    """The key of an absolute, normalised path: posix path relative to the first matching root prefix,
    else the absolute posix path (an image outside the data root)."""
    for prefix in prefixes:
        if path.startswith(prefix):
            rel = path[len(prefix):]
            return rel if os.sep == "/" else Path(rel).as_posix()
    return path if os.sep == "/" else Path(path).as_posix()


def key_for_path(image_path: str | os.PathLike[str], data_root: str | os.PathLike[str] | None) -> str:
    """The store key of an image path: relative to the data root when inside it (also through links),
    else the absolute posix path; a relative path is taken as a key already."""
    p = os.fspath(image_path)
    if not os.path.isabs(p):
        return Path(p).as_posix().removeprefix("./")
    ap = os.path.abspath(p)
    if data_root:
        prefixes = root_prefixes(data_root)
        for candidate in (ap, os.path.realpath(ap)):
            if candidate.startswith(prefixes):
                return key_under(candidate, prefixes)
    return Path(ap).as_posix()


def image_path_of(key: str, data_root: str | os.PathLike[str]) -> str:
    """Where the source image of ``key`` lives: under the data root, or the key itself when absolute."""
    return key if key.startswith("/") else os.path.join(data_root, key)


class CacheLayout:
    """Where the per-image caches of one store lie: beside the images under the data root, or mirrored under
    a cache root; key -> file for readers (:meth:`path`) and writers (:meth:`destination`), and file -> key."""

    def __init__(self, data_root: str | os.PathLike[str], cache_root: str | os.PathLike[str] | None = None):
        self.data_root = Path(data_root)
        self.cache_root = Path(cache_root) if cache_root is not None else None
        self.root = self.cache_root or self.data_root
        self._real_root: str | None = None
        self._checked: dict[Path, None] = {}  # folders already found inside the root (this run)

    def path(self, key: str) -> Path:
        """The file ``key``'s cache is read from (an absolute key: beside the image, when not mirrored)."""
        if key.startswith("/"):
            if self.cache_root is not None:
                raise RecordError(f"image {key!r} lies outside the data root, so it has no place under the cache "
                                  f"root {self.cache_root}; move it under the data root or write caches beside images")
            return Path(key + PER_IMAGE_SUFFIX)
        if not is_safe_relative_key(key):
            raise RecordError(f"refusing key {key!r}: it would escape the output root")
        return self.root / (key + PER_IMAGE_SUFFIX)

    def destination(self, key: str) -> Path:
        """The file a writer may create for ``key``, never outside the root. RecordError for an absolute key or
        one with ``..``, a folder that resolves through a link to outside the root, or a file that is a link."""
        if not is_safe_relative_key(key):
            raise RecordError(f"refusing key {key!r}: it is absolute or contains '..', so its cache would land "
                              f"outside {self.root}; keep the images under the data root, or use a shard store")
        dest = self.root / (key + PER_IMAGE_SUFFIX)
        if dest.parent not in self._checked:
            self._check_inside(key, dest.parent)
        if dest.is_symlink():
            raise RecordError(f"refusing key {key!r}: {dest} is a symbolic link; remove it and re-run")
        return dest

    def _check_inside(self, key: str, folder: Path) -> None:
        """RecordError unless ``folder`` resolves (links followed) to the root or a folder under it."""
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        real_root, real = self._real_root, os.path.realpath(folder)
        if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
            fix = ("mirror the caches under another folder (--out DIR), or use a shard store" if self.cache_root is None
                   else "remove the link from the output folder, or choose another one")
            raise RecordError(f"refusing key {key!r}: its folder resolves through a link to {real}, outside "
                              f"{self.root}; {fix}")
        self._checked[folder] = None

    def key_of(self, path: str | os.PathLike[str]) -> str | None:
        """The key whose cache is the file ``path`` under the root (the inverse of :meth:`path`), or None when
        it is not a cache file."""
        p = os.fspath(path)
        if not p.endswith(PER_IMAGE_SUFFIX):
            return None
        return Path(os.path.relpath(p, self.root)).as_posix()[: -len(PER_IMAGE_SUFFIX)]


def cache_file_beside(image_path: str | os.PathLike[str]) -> Path:
    """The per-image cache file beside an image, as older training code reads it (``<image>.vggt_cache.pt``)."""
    return Path(os.fspath(image_path) + PER_IMAGE_SUFFIX)
