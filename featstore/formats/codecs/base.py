"""What every codec shares: the :class:`Codec` interface and the buffer helpers codecs build on.

A codec turns one tensor into header fields plus payload buffers (``encode``) and back (``decode``),
says how many bytes its decode allocates (``output_nbytes``), checks a header entry's sizes before any
allocation (``validate``) and, when lossy, reports the error bound stored at write time (``error_bound``).
"""

from __future__ import annotations

import math
import threading
import zlib
from typing import Any, Callable, Mapping

import numpy as np
import torch

from featstore.errors import RecordError
from featstore.runtime.env import in_dataloader_worker

ALIGN = 64
HEAP_TENSOR_BYTES = 1 << 16  # decoded tensors at least this large take their memory from numpy (see empty_tensor)
DEFAULT_ZSTD_LEVEL = 1  # with byte shuffling, level 1 compresses bf16 features better than 3 and 2x faster

Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # how a decoder allocates an output tensor
Encoded = tuple[dict[str, Any], list[Any]]  # (header fields, payload buffers in order)
_tls = threading.local()


class Codec:
    """One tensor codec. Subclasses set ``name`` (the header's ``codec`` value), ``order`` (its place in
    :data:`featstore.formats.codecs.CODECS`) and ``lossy``, and implement encode and decode."""

    name = ""
    order = 100
    lossy = False

    def applies(self, t: torch.Tensor) -> bool:
        """Whether this codec can hold ``t`` (others are stored with the default codec)."""
        return True

    def encode(self, name: str, t: torch.Tensor, level: int, block: int) -> Encoded:
        """Header fields (``codec``, ``filter``, ``crc32``, ``zbytes`` and the codec's own) and payload buffers."""
        raise NotImplementedError

    def decode(self, fields: Mapping[str, Any], payload: memoryview, dtype: torch.dtype, shape: tuple[int, ...], *,
               verify: bool, dequantize: bool, empty: Empty) -> Any:
        """The tensor (or a lossy codec's quantized form with ``dequantize=False``) of one payload."""
        raise NotImplementedError

    def output_nbytes(self, fields: Mapping[str, Any], shape: tuple[int, ...], dtype: torch.dtype, *,
                      dequantize: bool, copies_raw: bool) -> list[int]:
        """Sizes of the tensors :meth:`decode` allocates with ``empty``, in order."""
        return [math.prod(shape) * dtype.itemsize]

    def validate(self, fields: Mapping[str, Any], shape: tuple[int, ...], nbytes: int) -> None:
        """Refuse a header entry whose codec-specific sizes do not fit (before any allocation)."""

    def error_bound(self, fields: Mapping[str, Any]) -> dict[str, float] | None:
        """The error bound stored with a lossy entry (relative L2, max abs); None for a lossless codec."""
        bound = fields.get("bound")
        return {k: float(v) for k, v in bound.items()} if self.lossy and isinstance(bound, dict) else None


def crc32_of(buf: bytes | memoryview) -> int:
    """crc32 (zlib) of a buffer."""
    return zlib.crc32(buf) & 0xFFFFFFFF


def check_crc(fields: Mapping[str, Any], data: bytes | memoryview) -> None:
    """RecordError unless ``data``'s crc32 is the entry's ``crc32``."""
    got = crc32_of(data)
    if got != int(fields["crc32"]):
        raise RecordError(f"tensor {fields['name']!r}: crc32 mismatch (stored {int(fields['crc32']):08x}, "
                          f"computed {got:08x})")


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
