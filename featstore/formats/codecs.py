"""Tensor codecs: how one tensor's values become the bytes of a shard record, and back.

Every codec has an encoder (tensor -> header fields + payload buffers), a decoder (header fields + payload
bytes -> tensor) and, for lossy codecs, the error bound measured at write time and stored in the header.

* ``zstd`` (default, lossless): byte-plane shuffle + one zstd frame. Records written before codecs existed
  (no ``codec`` field) are this codec, so old stores read unchanged.
* ``raw`` (lossless): the tensor's bytes as they are, 64-byte aligned inside the record, so a reader that
  reads the record into an aligned buffer gets the tensor as a view of it (no copy beyond the read).
* ``int8`` (lossy): ``x ~= q * token_scale[t, block] * channel_scale[c]`` with ``q`` int8. A per-channel scale
  first flattens outlier channels (ViT activations have a few channels 10-100x larger than the rest, and a
  scale shared with an outlier loses the ordinary channels), then a per-token (per ``block`` of channels)
  scale adapts to each token's magnitude; the number of levels (at most 127) is the fewest whose
  predicted rounding error is 0.8% relative L2. ``benchmarks/codec_bench.py`` measured this scheme against
  per-channel, per-token, per-block and fp8 alternatives. The int8 values are zstd-compressed; the scales
  are stored as float32. NaN/Inf are refused at write.

Integrity: a zstd frame carries an xxh64 checksum of its content, checked on every decode. ``crc32`` in the
header covers the decoded bytes (zstd, raw) or the stored payload (int8); readers check it with
``verify=True`` (what ``featstore verify`` does), the training hot path does not.
"""

from __future__ import annotations

import math
import sys
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
import zstandard

from featstore.runtime.env import in_dataloader_worker
from featstore.errors import RecordError

CODECS = ("zstd", "raw", "int8")
DEFAULT_CODEC = "zstd"
LOSSY_CODECS = frozenset({"int8"})
DEFAULT_ZSTD_LEVEL = 1  # with byte shuffling, level 1 compresses bf16 features better than 3 and 2x faster
ALIGN = 64
INT8_MAX = 127
INT8_TARGET_REL_L2 = 0.008  # rounding error the levels are chosen for; bf16 output rounding adds ~0.1% (codec_bench.py)
INT8_BLOCK = 0  # 0: one scale per token over all channels (per-block scales cost more bytes for the same error)
ZSTD_FILTERS = ("byteshuffle", "none")  # the codec-less (legacy) header's filter values
LITTLE_ENDIAN = sys.byteorder == "little"
HEAP_TENSOR_BYTES = 1 << 16  # decoded tensors at least this large take their memory from numpy (see empty_tensor)

_tls = threading.local()
Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # how a decoder allocates an output tensor


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


def crc32_of(buf: bytes | memoryview) -> int:
    """crc32 (zlib) of a buffer."""
    return zlib.crc32(buf) & 0xFFFFFFFF


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's raw little-endian C-order bytes, without a copy when it is already contiguous on CPU."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def empty_tensor(shape: tuple[int, ...], dtype: torch.dtype, shared: bool = True) -> torch.Tensor:
    """An uninitialised CPU tensor; in a DataLoader worker it lives in shared memory, so handing it to the main
    process costs no copy (torch would otherwise copy every tensor a worker returns into shared memory).

    Elsewhere its memory comes from numpy's allocator, which reuses freed heap pages: ``torch.empty`` maps
    fresh pages for every large tensor, and faulting them in cost ~10% of a zstd record's decode.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if shared and in_dataloader_worker():
        return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(nbytes)).view(shape)
    if nbytes < HEAP_TENSOR_BYTES:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def padding_for(n: int) -> int:
    """Zero bytes that bring ``n`` up to the next multiple of :data:`ALIGN`."""
    return -n % ALIGN


def check_codec(name: str) -> str:
    """Return ``name`` if it is a known codec, else raise RecordError naming the choices."""
    if name not in CODECS:
        raise RecordError(f"unknown codec {name!r}: expected one of {', '.join(CODECS)}")
    return name


def codec_of(fields: Mapping[str, Any]) -> str:
    """The codec a header's tensor entry names (legacy entries without ``codec`` are zstd)."""
    name = str(fields.get("codec", DEFAULT_CODEC))
    if name not in CODECS:
        raise RecordError(f"tensor {fields.get('name')!r}: unknown codec {name!r} (written by a newer featstore?)")
    return name


# --- zstd ------------------------------------------------------------------------------------------------
def compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's zstd compressor for ``level`` (ZstdCompressor objects are not thread-safe)."""
    cache = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor."""
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def shuffle_bytes(raw: memoryview, itemsize: int) -> bytes | memoryview:
    """Byte-plane shuffle: byte j of every element together, so zstd finds the clustered exponent bytes."""
    if itemsize == 1:
        return raw
    a = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize)
    out = np.empty((itemsize, a.shape[0]), dtype=np.uint8)
    for j in range(itemsize):  # plane by plane: ~5x faster than one transposed copy
        out[j] = a[:, j]
    return out.data


def unshuffle_into(planes: bytes | memoryview, itemsize: int, out: np.ndarray) -> None:
    """Undo :func:`shuffle_bytes` into ``out`` (uint8, same size).

    Two-byte elements (bf16, fp16) are rebuilt as ``low | high << 8`` in 16-bit lanes (two contiguous SIMD
    passes, ~25% faster than strided byte copies); wider ones with one strided copy per byte plane.
    """
    src = np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1)
    if itemsize == 2 and LITTLE_ENDIAN:
        lanes = out.view(np.uint16)
        np.left_shift(src[1], 8, out=lanes, dtype=np.uint16)  # little-endian: plane 1 is the high byte
        np.bitwise_or(lanes, src[0], out=lanes)
        return
    dst = out.reshape(-1, itemsize)
    for j in range(itemsize):
        dst[:, j] = src[j]


def zstd_frame(data: bytes | memoryview, level: int) -> bytes:
    """One zstd frame (content size and xxh64 checksum included) of ``data``."""
    return compressor(level).compress(data)


def content_size(frame: memoryview, what: str) -> int:
    """The decoded size a zstd frame's header claims (-1: not recorded); RecordError for a damaged header."""
    try:
        return zstandard.frame_content_size(frame)
    except zstandard.ZstdError as e:
        raise RecordError(f"{what}: zstd frame header is corrupt ({e})") from None


def unzstd(frame: memoryview, nbytes: int, what: str) -> bytes:
    """Decompress one zstd frame that must hold exactly ``nbytes`` (checked before allocating)."""
    claimed = content_size(frame, what)
    if claimed != nbytes:
        raise RecordError(f"{what}: zstd frame claims {claimed} bytes, header says {nbytes}")
    try:
        raw = decompressor().decompress(frame, max_output_size=nbytes)
    except zstandard.ZstdError as e:
        raise RecordError(f"{what}: zstd data is corrupt ({e})") from None
    if len(raw) != nbytes:
        raise RecordError(f"{what}: decompressed {len(raw)} bytes, expected {nbytes}")
    return raw


def unzstd_into(frame: memoryview, out: np.ndarray, what: str) -> None:
    """Decompress one zstd frame straight into ``out`` (uint8), which it must fill exactly; the frame's
    content checksum is checked at its end."""
    claimed = content_size(frame, what)
    if claimed != out.nbytes:
        raise RecordError(f"{what}: zstd frame claims {claimed} bytes, header says {out.nbytes}")
    try:
        reader = decompressor().stream_reader(frame)
        got = reader.readinto(out) if out.nbytes else 0
        trailing = reader.read(1)  # reaches the frame end, where zstd checks the checksum
    except zstandard.ZstdError as e:
        raise RecordError(f"{what}: zstd data is corrupt ({e})") from None
    if got != out.nbytes or trailing:
        raise RecordError(f"{what}: zstd frame holds other than the {out.nbytes} bytes its header claims")


def scratch(nbytes: int, slot: str = "planes") -> np.ndarray:
    """This thread's reusable uint8 buffer ``slot`` of ``nbytes`` (no fresh pages to fault in per record); valid
    until this thread asks for the same slot again."""
    buffers = getattr(_tls, "scratch", None)
    if buffers is None:
        buffers = _tls.scratch = {}
    buf = buffers.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = buffers[slot] = np.empty(nbytes, dtype=np.uint8)
    return buf[:nbytes]


def _encode_zstd(t: torch.Tensor, level: int) -> tuple[dict[str, Any], list[Any]]:
    raw = tensor_bytes(t)
    itemsize = t.element_size()
    filt = "byteshuffle" if itemsize > 1 else "none"
    z = zstd_frame(shuffle_bytes(raw, itemsize) if itemsize > 1 else raw, level)
    return {"codec": "zstd", "filter": filt, "crc32": crc32_of(raw), "zbytes": len(z)}, [z]


def _decode_zstd(fields: Mapping[str, Any], payload: memoryview, out: torch.Tensor, verify: bool) -> torch.Tensor:
    arr = out.view(-1).view(torch.uint8).numpy()
    if fields.get("filter") == "byteshuffle" and out.element_size() > 1:
        planes = scratch(out.nbytes)
        unzstd_into(payload, planes, f"tensor {fields['name']!r}")
        unshuffle_into(planes.data, out.element_size(), arr)
    else:
        unzstd_into(payload, arr, f"tensor {fields['name']!r}")
    if verify:
        _check_crc(fields, arr.data)
    return out


def _check_crc(fields: Mapping[str, Any], data: bytes | memoryview) -> None:
    got = crc32_of(data)
    if got != int(fields["crc32"]):
        raise RecordError(f"tensor {fields['name']!r}: crc32 mismatch (stored {int(fields['crc32']):08x}, "
                          f"computed {got:08x})")


# --- raw -------------------------------------------------------------------------------------------------
def _encode_raw(t: torch.Tensor) -> tuple[dict[str, Any], list[Any]]:
    raw = tensor_bytes(t)
    return {"codec": "raw", "filter": "raw", "crc32": crc32_of(raw), "zbytes": len(raw)}, [raw]


def _decode_raw(fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...],
                verify: bool, empty: Empty) -> torch.Tensor:
    if verify:
        _check_crc(fields, payload)
    return view_or_copy(payload, dtype, shape, empty)


def view_or_copy(payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...], empty: Empty | None = None
                 ) -> torch.Tensor:
    """A tensor over ``payload``: a zero-copy view when the buffer is writable and aligned, else a copy into
    ``empty(shape, dtype)`` (default :func:`empty_tensor`)."""
    if not len(payload):
        return torch.empty(shape, dtype=dtype)
    if not payload.readonly:
        t = _storage_view(payload)
        if t is None:
            t = torch.frombuffer(payload, dtype=torch.uint8)
        if t.data_ptr() % dtype.itemsize == 0:
            return t.view(dtype).reshape(shape)
    out = (empty or empty_tensor)(shape, dtype)
    np.copyto(out.view(-1).view(torch.uint8).numpy(), np.frombuffer(payload, dtype=np.uint8))
    return out


def _storage_view(payload: memoryview) -> torch.Tensor | None:
    """``payload`` as a slice of the torch tensor it was cut from (``memoryview(tensor.numpy())[a:b]``), if any.

    A slice keeps the tensor's own storage, so a view decoded in a DataLoader worker from a shared-memory
    read buffer is still shared memory and crosses to the main process without a copy (a view made by
    ``torch.frombuffer`` has a storage torch does not know is shared, and would be copied).
    """
    owner = payload.obj.base if isinstance(payload.obj, np.ndarray) else None
    if not isinstance(owner, torch.Tensor) or owner.dtype != torch.uint8 or owner.dim() != 1:
        return None
    start = np.frombuffer(payload, dtype=np.uint8).__array_interface__["data"][0] - owner.data_ptr()
    if start < 0 or start + len(payload) > owner.numel():
        return None
    return owner[start:start + len(payload)]


# --- int8 ------------------------------------------------------------------------------------------------
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


def _encode_int8(name: str, t: torch.Tensor, level: int, block: int) -> tuple[dict[str, Any], list[Any]]:
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


def _decode_int8(fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...],
                 verify: bool, dequantize: bool, empty: Empty) -> torch.Tensor | Quantized:
    if verify:
        _check_crc(fields, payload)
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


# --- dispatch --------------------------------------------------------------------------------------------
def encode(name: str, t: torch.Tensor, codec: str, level: int = DEFAULT_ZSTD_LEVEL,
           block: int = INT8_BLOCK) -> tuple[dict[str, Any], list[Any]]:
    """Encode one tensor with ``codec``; returns (header fields, payload buffers in order).

    A lossy codec that cannot hold the tensor (an integer tensor, an empty one) stores it with zstd.
    """
    check_codec(codec)
    if codec == "int8" and int8_applies(t):
        return _encode_int8(name, t, level, block)
    if codec == "raw":
        return _encode_raw(t)
    return _encode_zstd(t, level)


def decode(fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...], *,
           verify: bool = False, dequantize: bool = True, empty: Empty = empty_tensor) -> torch.Tensor | Quantized:
    """Decode one tensor's payload; lossy codecs return :class:`Quantized` when ``dequantize=False``.

    Output tensors are allocated with ``empty(shape, dtype)``, at most :func:`output_nbytes` in all.
    """
    codec = codec_of(fields)
    if codec == "zstd":
        return _decode_zstd(fields, payload, empty(shape, dtype), verify)
    if codec == "raw":
        return _decode_raw(fields, payload, dtype, shape, verify, empty)
    return _decode_int8(fields, payload, dtype, shape, verify, dequantize, empty)


def output_nbytes(fields: Mapping[str, Any], shape: tuple[int, ...], dtype: torch.dtype, *, dequantize: bool,
                  copies_raw: bool) -> list[int]:
    """Sizes of the tensors :func:`decode` allocates with ``empty`` for this entry, in order (``copies_raw``:
    the payload is read-only, so a ``raw`` tensor is copied rather than viewed)."""
    codec = codec_of(fields)
    nbytes = math.prod(shape) * dtype.itemsize
    if codec == "raw" and not copies_raw:
        return []
    if codec != "int8" or dequantize:
        return [nbytes]
    cs, ts, _ = int8_sizes(fields, shape)
    numel = math.prod(shape)
    return [numel + padding_for(numel) + cs + ts]


def validate_fields(fields: Mapping[str, Any], shape: tuple[int, ...], nbytes: int) -> None:
    """Check a header entry's codec-specific sizes before any allocation (hostile headers)."""
    codec = codec_of(fields)
    zbytes = int(fields["zbytes"])
    if codec == "zstd" and fields.get("filter", "none") not in ZSTD_FILTERS:
        raise RecordError(f"tensor {fields.get('name')!r}: unknown filter {fields.get('filter')!r}")
    if codec == "raw" and zbytes != nbytes:
        raise RecordError(f"tensor {fields.get('name')!r}: raw payload of {zbytes} bytes for {nbytes} tensor bytes")
    if codec == "int8":
        int8_sizes(fields, shape)
