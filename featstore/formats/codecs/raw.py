"""``raw`` (lossless): the tensor's bytes as they are, 64-byte aligned inside the record, so a reader that reads
the record into an aligned buffer gets the tensor as a view of it (no copy beyond the read)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from featstore.errors import RecordError
from featstore.formats.codecs.base import Codec, Empty, Encoded, check_crc, crc32_of, tensor_bytes, view_or_copy


class RawCodec(Codec):
    """Lossless and uncompressed: decoding is a view of the read buffer when it is writable and aligned."""

    name, order = "raw", 1

    def encode(self, name: str, t: torch.Tensor, level: int, block: int) -> Encoded:
        raw = tensor_bytes(t)
        return {"codec": "raw", "filter": "raw", "crc32": crc32_of(raw), "zbytes": len(raw)}, [raw]

    def decode(self, fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...], *,
               verify: bool, dequantize: bool, empty: Empty) -> torch.Tensor:
        if verify:
            check_crc(fields, payload)
        return view_or_copy(payload, dtype, shape, empty)

    def output_nbytes(self, fields: Mapping[str, Any], shape: tuple[int, ...], dtype: torch.dtype, *,
                      dequantize: bool, copies_raw: bool) -> list[int]:
        return super().output_nbytes(fields, shape, dtype, dequantize=dequantize, copies_raw=copies_raw) \
            if copies_raw else []

    def validate(self, fields: Mapping[str, Any], shape: tuple[int, ...], nbytes: int) -> None:
        if int(fields["zbytes"]) != nbytes:
            raise RecordError(f"tensor {fields.get('name')!r}: raw payload of {fields['zbytes']} bytes for {nbytes} "
                              f"tensor bytes")


CODEC = RawCodec()
