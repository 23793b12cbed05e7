"""Per-image caches: ``<image path>.vggt_cache.pt`` beside each image (or mirrored under a cache root;
where each key's file lies is :mod:`featstore.formats.keys`'s to say).

Files are written to a temporary name and renamed, and read with ``torch.load(weights_only=True)`` so a
hostile pickle cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Iterator

import torch

from featstore.errors import RecordError, describe_load_error
from featstore.formats.keys import CacheLayout
from featstore.formats.record import Record, record_from_pt, record_to_pt
from featstore.formats.layout import PER_IMAGE_SUFFIX
from featstore.runtime.fsutil import atomic_write_bytes
from featstore.runtime.walk import walk_files


def encode_pt(rec: Record) -> bytes:
    """Serialise a record as the per-image ``.pt`` bytes (``torch.save`` of :func:`record_to_pt`)."""
    buf = io.BytesIO()
    torch.save(record_to_pt(rec), buf)
    return buf.getvalue()


def write_pt(path: Path, rec: Record, *, fsync: bool = True) -> int:
    """Write a record's per-image cache atomically; returns the bytes written."""
    data = encode_pt(rec)
    atomic_write_bytes(path, data, fsync=fsync)
    return len(data)


def read_pt(path: Path, *, key: str | None = None, verify: bool = True) -> Record:
    """Load a per-image cache safely (``weights_only=True``) and return it as a record."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        raise RecordError(f"cannot load per-image cache {path}: {describe_load_error(e)}; delete it and re-run "
                          "`featstore build`") from None
    return record_from_pt(obj, key=key, verify=verify)


def scan_per_image(root: Path) -> Iterator[str]:
    """Keys of every ``*.vggt_cache.pt`` file under ``root``, in walk order (``runtime.walk``: name order, hidden
    entries and temporary files skipped)."""
    layout = CacheLayout(root)
    for f in walk_files(root, lambda name: name.endswith(PER_IMAGE_SUFFIX)):
        key = layout.key_of(f.path)
        if key is not None:
            yield key
