"""``int8`` (lossy): ``x ~= q * token_scale[t, block] * channel_scale[c]`` with ``q`` int8.

A per-channel scale first flattens outlier channels (ViT activations have a few channels 10-100x larger than
the rest, and a scale shared with an outlier loses the ordinary channels), then a per-token (per ``block`` of
channels) scale adapts to each token's magnitude; the number of levels (at most 127) is the fewest whose
predicted rounding error is 0.8% relative L2 (``benchmarks/codec_bench.py`` measured this scheme against
per-channel, per-token, per-block and fp8 alternatives). The int8 values are zstd-compressed; the scales are
stored as float32. NaN/Inf are refused at write. ``crc32`` covers the stored payload.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch

from featstore.errors import RecordError
from featstore.formats.codecs.base import Codec, Empty, Encoded, check_crc, empty_tensor, padding_for, tensor_bytes, view_or_copy
from featstore.formats.codecs.zstd import unzstd_into, zstd_frame

INT8_MAX = 127
INT8_TARGET_REL_L2 = 0.008  # rounding error the levels are chosen for; bf16 output rounding adds ~0.1% (codec_bench.py)
INT8_BLOCK = 0  # 0: one scale per token over all channels (per-block scales cost more bytes for the same error)


@dataclass
class Quantized:
    """An int8-coded tensor as stored: ``values`` (int8), its scales, the dtype it decodes to, its error bound.

    ``dequantize()`` gives ``values * token_scale[..., block] * channel_scale`` in ``dtype`` (on any device).
    """

    values: torch.Tensor
    channel_scale: torch.Tensor  # float32 [C]
    token_scale: torch.Tensor  # float32 [*values.shape[:-1], C // block]
    dtype: torch.dtype
    bound: dict[str, float] = field(default_factory=dict)
    levels: int = 0  # the largest |value| the encoder allowed (0: unknown)
    packed: torch.Tensor | None = None  # both scales in one tensor, when decoded that way

    def dequantize(self, dtype: torch.dtype | None = None, empty: Empty | None = None) -> torch.Tensor:
        """The decoded tensor (``dtype`` defaults to the stored dtype; ``empty`` allocates it, on CPU)."""
        return dequantize_int8(self.values, self.channel_scale, self.token_scale, dtype or self.dtype, empty)

    def packed_scales(self) -> torch.Tensor:
        """Both scales in one float32 tensor, ``[C + P * blocks]``: channel scales, then token scales.

        One tensor, not two, because every storage a DataLoader worker returns costs a file descriptor
        handed to the main process.
        """
        if self.packed is not None:
            return self.packed
        out = empty_tensor((self.channel_scale.numel() + self.token_scale.numel(),), torch.float32)
        out[:self.channel_scale.numel()] = self.channel_scale
        out[self.channel_scale.numel():] = self.token_scale.reshape(-1)
        return out


def unpack_scales(values: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel scale, token scale) from :meth:`Quantized.packed_scales`, shaped to broadcast against ``values``.

    ``scales`` may carry leading batch dimensions that ``values`` also has (a collated batch).
    """
    batch = scales.shape[:-1]
    tokens_shape = values.shape[len(batch):-1]
    channels = values.shape[-1]
    per_token = (scales.shape[-1] - channels) // max(1, math.prod(tokens_shape))
    if per_token < 1 or channels + per_token * math.prod(tokens_shape) != scales.shape[-1]:
        raise ValueError(f"scales of shape {list(scales.shape)} do not fit int8 values of shape {list(values.shape)}")
    channel_scale = scales[..., :channels].reshape(*batch, *([1] * len(tokens_shape)), channels)
    return channel_scale, scales[..., channels:].reshape(*batch, *tokens_shape, per_token)


def int8_layout(shape: tuple[int, ...], block: int) -> tuple[int, int, int]:
    """(tokens, channels, token scales per token) of an int8-coded tensor of ``shape``."""
    channels = shape[-1] if shape else 1
    tokens = math.prod(shape[:-1]) if shape else 1
    per_token = 1 if block in (0, channels) else channels // block
    return tokens, channels, per_token


def int8_block(shape: tuple[int, ...], block: int = INT8_BLOCK) -> int:
    """The block the int8 codec uses for ``shape``: ``block`` if it divides the channels, else 0 (all)."""
    channels = shape[-1] if shape else 1
    return block if block and channels % block == 0 and block < channels else 0


def int8_applies(t: torch.Tensor) -> bool:
    """Whether the int8 codec can hold ``t`` (a non-empty floating tensor); others are stored with zstd."""
    return t.is_floating_point() and t.dim() >= 1 and t.numel() > 0


def quantize_int8(x: torch.Tensor, block: int = INT8_BLOCK, levels: int | None = None,
                  target: float = INT8_TARGET_REL_L2) -> Quantized:
    """Quantize a finite floating tensor to ``[-levels, levels]`` with a per-channel times a per-token scale.

    Without ``levels``, it is the fewest (at most 127) whose predicted rounding error, ``step^2 / 12`` per
    value, stays within ``target`` relative L2: each halving of the levels saves about a bit a value.
    """
    tokens, channels, per_token = int8_layout(tuple(x.shape), block)
    xf = x.detach().to("cpu", torch.float32).reshape(tokens, channels)
    channel_scale = xf.abs().amax(0)
    channel_scale = torch.where(channel_scale > 0, channel_scale, torch.ones(()))
    y = (xf / channel_scale).view(tokens, per_token, channels // per_token)
    token_max = y.abs().amax(-1)
    if levels is None:
        levels = levels_for(token_max, channel_scale, float(torch.linalg.vector_norm(xf)), target)
    token_scale = token_max / levels
    token_scale = torch.where(token_scale > 0, token_scale, torch.ones(()))
    q = torch.round(y / token_scale[..., None]).clamp_(-levels, levels).to(torch.int8)
    return Quantized(q.view(x.shape), channel_scale, token_scale.view(*x.shape[:-1], per_token), x.dtype, levels=levels)


def levels_for(token_max: torch.Tensor, channel_scale: torch.Tensor, norm: float, target: float) -> int:
    """The fewest int8 levels whose uniform rounding error (``step^2 / 12`` a value) is within ``target``."""
    if norm <= 0:
        return INT8_MAX
    per_token = token_max.shape[-1]
    block_energy = channel_scale.pow(2).view(per_token, -1).sum(-1)  # sum of c_j^2 in each block
    unit_mse = float((token_max.pow(2) * block_energy).sum()) / 12  # squared error summed, at one level
    return int(min(INT8_MAX, max(1, math.ceil(math.sqrt(unit_mse) / (target * norm)))))


def dequantize_int8(values: torch.Tensor, channel_scale: torch.Tensor, token_scale: torch.Tensor,
                    dtype: torch.dtype, empty: Empty | None = None) -> torch.Tensor:
    """``values * token_scale (per block of channels) * channel_scale`` as ``dtype``; leading batch dims broadcast.

    On CPU the result is allocated with ``empty(shape, dtype)`` (default :func:`empty_tensor`)."""
    per_token = token_scale.shape[-1]
    channels = values.shape[-1]
    y = values.reshape(*values.shape[:-1], per_token, channels // per_token).to(torch.float32)
    y.mul_(token_scale.to(y.device, torch.float32)[..., None])  # in place: one float32 temporary in all
    y = y.view(values.shape).mul_(channel_scale.to(y.device, torch.float32))
    if values.device.type != "cpu":
        return y.to(dtype)
    return (empty or empty_tensor)(tuple(values.shape), dtype).copy_(y)  # shared memory inside a DataLoader worker


def error_bound(original: torch.Tensor, decoded: torch.Tensor) -> dict[str, float]:
    """Measured error of ``decoded`` against ``original``: relative L2 and max absolute error."""
    a, b = original.detach().to("cpu", torch.float32), decoded.detach().to("cpu", torch.float32)
    diff = b - a
    norm = float(torch.linalg.vector_norm(a))
    return {"rel_l2": float(torch.linalg.vector_norm(diff)) / norm if norm > 0 else 0.0,
            "max_abs": float(diff.abs().max()) if diff.numel() else 0.0}


def _refuse_nonfinite(name: str, t: torch.Tensor, codec: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise RecordError(f"tensor {name!r} holds {bad} NaN/Inf values, which the lossy {codec} codec cannot "
                          f"store; fix the model output, or store it with --codec zstd or raw")


def encode_int8(name: str, t: torch.Tensor, level: int, block: int) -> Encoded:
    """Header fields and payload parts (channel scales, token scales, zstd frame of the values)."""
    _refuse_nonfinite(name, t, "int8")
    block = int8_block(tuple(t.shape), block)
    qt = quantize_int8(t, block)
    qt.bound = error_bound(t, qt.dequantize())
    scales = [tensor_bytes(qt.channel_scale), tensor_bytes(qt.token_scale)]
    z = zstd_frame(tensor_bytes(qt.values), level)
    parts = [*scales, z]
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    fields = {"codec": "int8", "filter": "int8", "block": block, "levels": qt.levels, "qbytes": len(z),
              "bound": qt.bound, "crc32": crc & 0xFFFFFFFF, "zbytes": sum(len(p) for p in parts)}
    return fields, parts


def int8_sizes(fields: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channel scale bytes, token scale bytes, zstd frame bytes) of an int8 entry; RecordError if inconsistent."""
    block = int(fields.get("block", 0))
    channels = shape[-1] if shape else 0
    if not shape or block < 0 or (block and (channels % block or block > channels)):
        raise RecordError(f"tensor {fields.get('name')!r}: int8 block {block} does not fit shape {list(shape)}")
    tokens, channels, per_token = int8_layout(shape, block)
    cs, ts, qb = 4 * channels, 4 * tokens * per_token, int(fields.get("qbytes", -1))
    if qb < 0 or cs + ts + qb != int(fields["zbytes"]):
        raise RecordError(f"tensor {fields.get('name')!r}: int8 sections ({cs} + {ts} + {qb}) do not add up to its "
                          f"{fields['zbytes']} stored bytes")
    return cs, ts, qb


def decode_int8(fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...],
                 verify: bool, dequantize: bool, empty: Empty) -> torch.Tensor | Quantized:
    """The dequantized tensor, or with ``dequantize=False`` the :class:`Quantized` values and scales."""
    if verify:
        check_crc(fields, payload)
    cs, ts, qb = int8_sizes(fields, shape)
    _, channels, per_token = int8_layout(shape, int(fields.get("block", 0)))
    bound = {k: float(v) for k, v in (fields.get("bound") or {}).items()}
    frame, what, numel = payload[cs + ts:cs + ts + qb], f"tensor {fields['name']!r}", math.prod(shape)
    if dequantize:
        values = torch.empty(shape, dtype=torch.int8)  # a temporary: only the dequantized tensor is kept
        unzstd_into(frame, values.view(-1).view(torch.uint8).numpy(), what)
        channel_scale = view_or_copy(payload[:cs], torch.float32, (channels,))
        token_scale = view_or_copy(payload[cs:cs + ts], torch.float32, (*shape[:-1], per_token))
        return Quantized(values, channel_scale, token_scale, dtype, bound).dequantize(empty=empty)
    # Values and both scales in one (shared-memory, in a worker) buffer: a sample whose tensors are views of
    # one storage crosses to the main process as one file descriptor. Stored scales are already packed.
    scales_at = numel + padding_for(numel)
    buf = empty((scales_at + cs + ts,), torch.uint8)
    unzstd_into(frame, buf[:numel].numpy(), what)
    buf[scales_at:].numpy()[:] = np.frombuffer(payload[:cs + ts], dtype=np.uint8)
    packed = buf[scales_at:].view(torch.float32)
    return Quantized(buf[:numel].view(torch.int8).view(shape), packed[:channels],
                     packed[channels:].view(*shape[:-1], per_token), dtype, bound, packed=packed)


class Int8Codec(Codec):
    """Lossy 8-bit: per-channel x per-token scales, levels for 0.8% relative L2, the measured bound stored."""

    name, order, lossy = "int8", 2, True

    def applies(self, t: torch.Tensor) -> bool:
        return int8_applies(t)

    def encode(self, name: str, t: torch.Tensor, level: int, block: int) -> Encoded:
        return encode_int8(name, t, level, block)

    def decode(self, fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...], *,
               verify: bool, dequantize: bool, empty: Empty) -> torch.Tensor | Quantized:
        return decode_int8(fields, payload, dtype, shape, verify, dequantize, empty)

    def output_nbytes(self, fields: Mapping[str, Any], shape: tuple[int, ...], dtype: torch.dtype, *,
                      dequantize: bool, copies_raw: bool) -> list[int]:
        if dequantize:
            return [math.prod(shape) * dtype.itemsize]
        cs, ts, _ = int8_sizes(fields, shape)
        numel = math.prod(shape)
        return [numel + padding_for(numel) + cs + ts]

    def validate(self, fields: Mapping[str, Any], shape: tuple[int, ...], nbytes: int) -> None:
        int8_sizes(fields, shape)


CODEC = Int8Codec()
