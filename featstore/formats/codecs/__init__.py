"""Tensor codecs: how one tensor's values become the bytes of a shard record, and back.

A registry of :class:`~featstore.formats.codecs.base.Codec` objects, one per module of this package
(``zstd``: byte shuffle + zstd, the default and every legacy record's codec; ``raw``: aligned bytes, read as
views; ``int8``: lossy, per-channel x per-token scales, its error bound stored). A new codec is one new module
here defining ``CODEC``: the registry finds it (the CLI's ``--codec`` choices spell the names out too).

Integrity: a zstd frame carries an xxh64 checksum of its content, checked on every decode. ``crc32`` in the
header covers the decoded bytes (zstd, raw) or the stored payload (int8); readers check it with
``verify=True`` (what ``featstore verify`` does), the training hot path does not.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from typing import Any, Mapping

import torch

from featstore.errors import RecordError
from featstore.formats.codecs.base import (ALIGN, DEFAULT_ZSTD_LEVEL, HEAP_TENSOR_BYTES, Codec, Empty, Encoded,
                                           crc32_of, empty_tensor, padding_for, scratch, tensor_bytes, view_or_copy)
from featstore.formats.codecs.int8 import (INT8_BLOCK, INT8_MAX, INT8_TARGET_REL_L2, Quantized, dequantize_int8,
                                           error_bound, int8_applies, int8_block, int8_layout, int8_sizes, levels_for,
                                           quantize_int8, unpack_scales)
from featstore.formats.codecs.zstd import (LITTLE_ENDIAN, ZSTD_FILTERS, compressor, content_size, decompressor,
                                           shuffle_bytes, shuffle_planes, unshuffle_into, unzstd, unzstd_into,
                                           zstd_frame)

__all__ = ["ALIGN", "CODECS", "DEFAULT_CODEC", "DEFAULT_ZSTD_LEVEL", "HEAP_TENSOR_BYTES", "INT8_BLOCK", "INT8_MAX",
           "INT8_TARGET_REL_L2", "LITTLE_ENDIAN", "LOSSY_CODECS", "REGISTRY", "ZSTD_FILTERS", "Codec", "Empty",
           "Encoded", "Quantized", "check_codec", "codec_of", "compressor", "content_size", "crc32_of", "decode",
           "decompressor", "dequantize_int8", "empty_tensor", "encode", "error_bound", "get", "int8_applies",
           "int8_block", "int8_layout", "int8_sizes", "levels_for", "output_nbytes", "padding_for", "quantize_int8",
           "scratch", "shuffle_bytes", "shuffle_planes", "tensor_bytes", "unpack_scales", "unshuffle_into",
           "unzstd", "unzstd_into", "validate_fields", "view_or_copy", "zstd_frame"]

DEFAULT_CODEC = "zstd"


def _discover() -> dict[str, Codec]:
    """Every codec module of this package (a module with a ``CODEC``), by name, in ``order``."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        codec = getattr(importlib.import_module(f"{__name__}.{info.name}"), "CODEC", None)
        if isinstance(codec, Codec):
            found.append(codec)
    return {c.name: c for c in sorted(found, key=lambda c: (c.order, c.name))}


REGISTRY: dict[str, Codec] = _discover()
CODECS = tuple(REGISTRY)
LOSSY_CODECS = frozenset(n for n, c in REGISTRY.items() if c.lossy)


def check_codec(name: str) -> str:
    """Return ``name`` if it is a known codec, else raise RecordError naming the choices."""
    if name not in REGISTRY:
        raise RecordError(f"unknown codec {name!r}: expected one of {', '.join(CODECS)}")
    return name


def codec_of(fields: Mapping[str, Any]) -> str:
    """The codec a header's tensor entry names (legacy entries without ``codec`` are zstd)."""
    name = str(fields.get("codec", DEFAULT_CODEC))
    if name not in REGISTRY:
        raise RecordError(f"tensor {fields.get('name')!r}: unknown codec {name!r} (written by a newer featstore?)")
    return name


def get(name: str) -> Codec:
    """The codec object named ``name`` (RecordError for an unknown name)."""
    return REGISTRY[check_codec(name)]


def encode(name: str, t: torch.Tensor, codec: str, level: int = DEFAULT_ZSTD_LEVEL,
           block: int = INT8_BLOCK) -> Encoded:
    """Encode one tensor with ``codec``; returns (header fields, payload buffers in order).

    A codec that cannot hold the tensor (int8 and an integer or empty tensor) stores it with the default codec.
    """
    c = get(codec)
    return (c if c.applies(t) else REGISTRY[DEFAULT_CODEC]).encode(name, t, level, block)


def decode(fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...], *,
           verify: bool = False, dequantize: bool = True, empty: Empty = empty_tensor) -> torch.Tensor | Quantized:
    """Decode one tensor's payload; lossy codecs return :class:`Quantized` when ``dequantize=False``.

    Output tensors are allocated with ``empty(shape, dtype)``, at most :func:`output_nbytes` in all.
    """
    return REGISTRY[codec_of(fields)].decode(fields, payload, dtype, shape, verify=verify, dequantize=dequantize,
                                             empty=empty)


def output_nbytes(fields: Mapping[str, Any], shape: tuple[int, ...], dtype: torch.dtype, *, dequantize: bool,
                  copies_raw: bool) -> list[int]:
    """Sizes of the tensors :func:`decode` allocates with ``empty`` for this entry, in order (``copies_raw``:
    the payload is read-only, so a ``raw`` tensor is copied rather than viewed)."""
    return REGISTRY[codec_of(fields)].output_nbytes(fields, shape, dtype, dequantize=dequantize,
                                                    copies_raw=copies_raw)


def validate_fields(fields: Mapping[str, Any], shape: tuple[int, ...], nbytes: int) -> None:
    """Check a header entry's codec-specific sizes before any allocation (hostile headers)."""
    REGISTRY[codec_of(fields)].validate(fields, shape, nbytes)


def stored_bound(fields: Mapping[str, Any]) -> dict[str, float] | None:
    """The error bound a lossy entry was written with (None for lossless codecs)."""
    return REGISTRY[codec_of(fields)].error_bound(fields)


def decoded_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a decoded tensor of ``shape`` and ``dtype``."""
    return math.prod(shape) * dtype.itemsize
