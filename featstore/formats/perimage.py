"""Per-image caches: ``<image path>.vggt_cache.pt`` beside each image (or mirrored under a cache root).

Files are written to a temporary name and renamed, and read with ``torch.load(weights_only=True)`` so a
hostile pickle cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Iterator

import torch

from featstore.formats.layout import PER_IMAGE_SUFFIX
from featstore.errors import RecordError, describe_load_error
from featstore.formats.keys import is_safe_relative_key
from featstore.formats.record import Record, record_from_pt, record_to_pt
from featstore.fsutil import atomic_write_bytes, is_temp_name


def cache_path_for(key: str, data_root: Path, cache_root: Path | None = None) -> Path:
    """Where the per-image cache for ``key`` lives: beside the image, or mirrored under ``cache_root``."""
    if key.startswith("/"):
        if cache_root is not None:
            raise RecordError(f"image {key!r} lies outside the data root, so it has no place under the cache "
                              f"root {cache_root}; move it under the data root or write caches beside images")
        return Path(key + PER_IMAGE_SUFFIX)
    if not is_safe_relative_key(key):
        raise RecordError(f"refusing key {key!r}: it would escape the output root")
    return (cache_root or data_root) / (key + PER_IMAGE_SUFFIX)


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
    """Keys of every ``*.vggt_cache.pt`` file under ``root``, in sorted walk order (temporary files skipped)."""
    root = Path(root)
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        for name in sorted(files):
            if name.endswith(PER_IMAGE_SUFFIX) and not is_temp_name(name):
                rel = Path(os.path.relpath(os.path.join(dirpath, name), root)).as_posix()
                yield rel[: -len(PER_IMAGE_SUFFIX)]
