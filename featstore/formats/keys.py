"""Image keys and their webdataset-safe tar member names.

An image key is the image's posix path relative to the data root (``ep1/frame.000.jpg``). webdataset
splits a member name at the first dot of its basename, so keys are percent-encoded into a flat token with
no dots or slashes; the original key is also stored inside the record.
"""

from __future__ import annotations

from urllib.parse import quote, unquote

RECORD_EXT = "fsr"  # featstore record: one tar member per image, "<encoded key>.fsr"


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
