"""Image keys and their webdataset-safe tar member names.

An image key is the image's posix path relative to the data root (``ep1/frame.000.jpg``). webdataset
splits a member name at the first dot of its basename, so keys are percent-encoded into a flat token with
no dots or slashes; the original key is also stored inside the record.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote, unquote

from featstore.formats.layout import RECORD_EXT



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
