"""The record format: the one definition of how an image's features are stored.

A :class:`Record` holds an image's key, its path, named tensors (``features`` first) and JSON metadata.
Two encodings share this module, so every writer, reader, verifier and exporter agrees:

* shard bytes (one tar member per record)::

      b"FSR1" | u32 header length | header JSON | one payload per tensor

  The header lists each tensor's name, dtype, shape, decoded byte count, stored byte count (``zbytes``),
  crc32, byte ``filter`` and ``codec`` (see :mod:`featstore.formats.codecs`: ``zstd``, ``raw``, ``int8``;
  entries without ``codec``, written before codecs existed, are ``zstd``). Each tensor may name its own
  codec. When any tensor is not ``zstd``, the header is padded with spaces and each payload followed by
  ``pad`` zero bytes so that every payload starts 64-byte aligned within the record (tar members start
  512-aligned, so a record read into an aligned buffer yields aligned tensor views). Decoding checks every
  size against the header before allocating, so a hostile record cannot make a reader allocate more than
  it claims (and never more than ``MAX_TENSOR_BYTES``).
* a per-image ``.pt`` dict (``{"features", "path", "featstore": {...}, <other tensors>}``), what existing
  training code loads with ``torch.load(p)["features"]``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from featstore.errors import RecordError
from featstore.formats import codecs
from featstore.formats.codecs import DEFAULT_ZSTD_LEVEL, Quantized, crc32_of, tensor_bytes

__all__ = ["Record", "TensorSpec", "encode_record", "decode_record", "decode_header", "record_to_pt",
           "record_from_pt", "crc32_of", "tensor_bytes", "dtype_name", "parse_dtype", "DEFAULT_ZSTD_LEVEL"]

MAGIC = b"FSR1"
FORMAT_VERSION = 1  # records whose tensors are all zstd: the layout every featstore version reads
ALIGNED_VERSION = 2  # records with raw/int8 tensors: aligned payloads
MAX_HEADER_BYTES = 1 << 20
MAX_TENSOR_BYTES = 1 << 32  # 4 GiB: far above any feature map, far below a hostile claim
PT_META_KEY = "featstore"
FEATURES = "features"
SCALES = "_scales"  # key suffix of an int8 tensor's packed scales when read with dequantize=False

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class Record:
    """One image's stored features: tensors by name (``features`` first) plus metadata.

    ``bounds`` holds, per lossy tensor, the error bound it was written with (``{"codec", "rel_l2",
    "max_abs"}``); ``quantized`` names the tensors returned still quantized (``dequantize=False``), each
    with its dtype; their scales are the tensors ``<name>_scales`` (:meth:`codecs.Quantized.packed_scales`).
    """

    key: str
    path: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    bounds: dict[str, dict[str, Any]] = field(default_factory=dict)
    quantized: dict[str, str] = field(default_factory=dict)

    @property
    def features(self) -> torch.Tensor:
        """The primary feature tensor (the first requested layer)."""
        return self.tensors[FEATURES]


@dataclass(frozen=True)
class TensorSpec:
    """What a record header says about one stored tensor (``fields`` is its whole header entry)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    zbytes: int
    crc32: int
    filter: str
    codec: str = codecs.DEFAULT_CODEC
    pad: int = 0
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The header JSON form."""
        return dict(self.fields)


def dtype_name(dtype: torch.dtype) -> str:
    """Return featstore's name for a torch dtype (``torch.bfloat16`` -> ``"bfloat16"``)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise RecordError(f"unsupported tensor dtype {dtype}: expected one of {sorted(DTYPES)}") from None


def parse_dtype(name: str) -> torch.dtype:
    """Return the torch dtype for a featstore dtype name."""
    try:
        return DTYPES[name]
    except KeyError:
        raise RecordError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}") from None


def _codec_for(name: str, codec: str | Mapping[str, str]) -> str:
    return codec if isinstance(codec, str) else codec.get(name, codecs.DEFAULT_CODEC)


def encode_tensor(name: str, t: torch.Tensor, level: int = DEFAULT_ZSTD_LEVEL,
                  codec: str = codecs.DEFAULT_CODEC) -> tuple[dict[str, Any], list[Any]]:
    """Encode one tensor; returns its header entry and payload buffers."""
    fields, parts = codecs.encode(name, t, codec, level)
    entry = {"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "nbytes": t.numel() * t.element_size()}
    entry.update(fields)
    return entry, parts


def encode_record(rec: Record, level: int = DEFAULT_ZSTD_LEVEL, codec: str | Mapping[str, str] = "zstd") -> bytes:
    """Serialise a record to the shard byte format; ``codec`` is one codec name or a name per tensor."""
    if FEATURES not in rec.tensors:
        raise RecordError(f"record {rec.key!r} has no 'features' tensor (has {list(rec.tensors)})")
    names = [FEATURES] + [n for n in rec.tensors if n != FEATURES]
    entries, payloads = [], []
    for n in names:
        entry, parts = encode_tensor(n, rec.tensors[n], level, _codec_for(n, codec))
        entries.append(entry)
        payloads.append(parts)
    aligned = any(e["codec"] != "zstd" for e in entries)
    if aligned:
        for e in entries:
            e["pad"] = codecs.padding_for(e["zbytes"])
    header = {"v": ALIGNED_VERSION if aligned else FORMAT_VERSION, "key": rec.key, "path": rec.path, "meta": rec.meta,
              "tensors": entries}
    hb = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if aligned:
        hb += b" " * codecs.padding_for(8 + len(hb))  # JSON allows trailing spaces; payloads start aligned
    out = [MAGIC, struct.pack("<I", len(hb)), hb]
    for e, parts in zip(entries, payloads):
        out += parts
        if e.get("pad"):
            out.append(bytes(e["pad"]))
    return b"".join(out)


def _spec_from_json(d: dict[str, Any]) -> TensorSpec:
    try:
        spec = TensorSpec(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["nbytes"]),
                          int(d["zbytes"]), int(d["crc32"]), str(d.get("filter", "none")), codecs.codec_of(d),
                          int(d.get("pad", 0)), d)
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"malformed tensor entry in record header: {d!r} ({e})") from None
    itemsize = parse_dtype(spec.dtype).itemsize
    if any(s < 0 for s in spec.shape) or math.prod(spec.shape) * itemsize != spec.nbytes:
        raise RecordError(f"tensor {spec.name!r}: shape {list(spec.shape)} x {spec.dtype} does not match "
                          f"its byte count {spec.nbytes}")
    if spec.nbytes > MAX_TENSOR_BYTES or spec.zbytes < 0 or not 0 <= spec.pad < codecs.ALIGN:
        raise RecordError(f"tensor {spec.name!r} claims {spec.nbytes} bytes (limit {MAX_TENSOR_BYTES}), "
                          f"{spec.zbytes} stored and {spec.pad} padding")
    try:
        codecs.validate_fields(d, spec.shape, spec.nbytes)
    except (KeyError, TypeError, ValueError) as e:
        raise RecordError(f"malformed {spec.codec} entry for tensor {spec.name!r}: {e}") from None
    return spec


def decode_header(buf: bytes | memoryview) -> tuple[dict[str, Any], list[TensorSpec], int]:
    """Parse a record's header; returns (header dict, tensor specs, offset of the first payload)."""
    mv = memoryview(buf)
    if len(mv) < 8 or bytes(mv[:4]) != MAGIC:
        raise RecordError(f"not a featstore record: expected magic {MAGIC!r}, found {bytes(mv[:4])!r}")
    (hlen,) = struct.unpack("<I", mv[4:8])
    if hlen > MAX_HEADER_BYTES or 8 + hlen > len(mv):
        raise RecordError(f"record header length {hlen} is impossible for a record of {len(mv)} bytes")
    try:
        header = json.loads(bytes(mv[8:8 + hlen]))
        specs = [_spec_from_json(d) for d in header["tensors"]]
        header["key"], header["path"]
    except (ValueError, KeyError, TypeError) as e:
        raise RecordError(f"record header is not valid JSON of the expected form ({e})") from None
    if not specs or specs[0].name != FEATURES:
        raise RecordError("record's first tensor is not 'features'")
    return header, specs, 8 + hlen


def _bound_of(spec: TensorSpec) -> dict[str, Any] | None:
    bound = codecs.stored_bound(spec.fields)
    return dict(bound, codec=spec.codec) if bound is not None else None


def _add_tensor(rec: Record, spec: TensorSpec, value: torch.Tensor | Quantized) -> None:
    if isinstance(value, Quantized):
        rec.tensors[spec.name] = value.values
        rec.tensors[spec.name + SCALES] = value.packed_scales()
        rec.quantized[spec.name] = spec.dtype
    else:
        rec.tensors[spec.name] = value


def decode_record(buf: bytes | memoryview, *, verify: bool = True, only: tuple[str, ...] | None = None,
                  dequantize: bool = True, empty: codecs.Empty = codecs.empty_tensor) -> Record:
    """Parse shard record bytes back into a :class:`Record`.

    zstd frames carry an xxh64 content checksum, always checked, so a corrupt zstd payload never decodes.
    ``verify=True`` also checks each tensor's crc32 (what ``featstore verify`` does; the loader's hot path
    skips it). Lossy tensors decode to their stored dtype, or with ``dequantize=False`` stay int8 next to
    their scales (see :class:`Record`). Tensors of ``raw`` records are views of ``buf`` when it is writable
    and aligned; every other tensor is allocated with ``empty(shape, dtype)`` (:func:`output_nbytes` in all).
    """
    header, specs, pos = decode_header(buf)
    mv = memoryview(buf)
    rec = Record(header["key"], header["path"], {}, header.get("meta") or {})
    for spec in specs:
        end = pos + spec.zbytes
        if end + spec.pad > len(mv):
            raise RecordError(f"record {header['key']!r} is truncated: tensor {spec.name!r} needs bytes up to "
                              f"{end + spec.pad}, record has {len(mv)}")
        bound = _bound_of(spec)
        if bound is not None:
            rec.bounds[spec.name] = bound
        if only is None or spec.name in only:
            value = codecs.decode(spec.fields, mv[pos:end], parse_dtype(spec.dtype), spec.shape, verify=verify,
                                  dequantize=dequantize, empty=empty)
            _add_tensor(rec, spec, value)
        pos = end + spec.pad
    if pos != len(mv):
        raise RecordError(f"record {header['key']!r} has {len(mv) - pos} unexpected trailing bytes")
    return rec


def output_nbytes(buf: bytes | memoryview, *, only: tuple[str, ...] | None = None, dequantize: bool = True
                  ) -> list[int]:
    """Sizes of the tensors :func:`decode_record` allocates with ``empty`` for ``buf``, in order."""
    _, specs, _ = decode_header(buf)
    copies_raw = memoryview(buf).readonly
    return [n for spec in specs if only is None or spec.name in only
            for n in codecs.output_nbytes(spec.fields, spec.shape, parse_dtype(spec.dtype), dequantize=dequantize,
                                          copies_raw=copies_raw)]


def with_lossy_provenance(rec: Record) -> Record:
    """``rec`` with the error bounds it was decoded with folded into ``meta["lossy"]`` (per tensor: codec,
    relative L2 and max abs error, summed over every lossy encoding on its way), so a lossless copy of a
    dequantized record (a per-image cache, a zstd re-export) still says it is not the model's exact output.
    """
    if not rec.bounds:
        return rec
    lossy = {n: dict(b) for n, b in (rec.meta.get("lossy") or {}).items()}
    for name, b in rec.bounds.items():
        old = lossy.get(name, {})
        lossy[name] = {"codec": b["codec"], "rel_l2": old.get("rel_l2", 0.0) + b["rel_l2"],
                       "max_abs": old.get("max_abs", 0.0) + b["max_abs"]}
    return Record(rec.key, rec.path, rec.tensors, dict(rec.meta, lossy=lossy))


def lossy_max_abs(rec: Record, name: str) -> float:
    """The max abs error ``rec``'s tensor ``name`` may have against the model's output: its own codec's bound
    plus what earlier lossy encodings recorded in ``meta["lossy"]`` (0 for an exact tensor)."""
    own = float((rec.bounds.get(name) or {}).get("max_abs", 0.0))
    return own + float(((rec.meta.get("lossy") or {}).get(name) or {}).get("max_abs", 0.0))


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: a row of a batch would drag the whole batch into the file.
    t = t.detach().to("cpu").contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0 else t.clone()


def record_to_pt(rec: Record) -> dict[str, Any]:
    """The per-image ``.pt`` dict for a record: ``features`` and ``path`` first, then metadata and other tensors."""
    if rec.quantized:
        raise RecordError(f"record {rec.key!r} holds quantized tensors {sorted(rec.quantized)}: decode it with "
                          f"dequantize=True before writing a per-image cache")
    tensors = {n: _own_storage(t) for n, t in rec.tensors.items()}
    checks = {n: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "crc32": crc32_of(tensor_bytes(t))}
              for n, t in tensors.items()}
    d: dict[str, Any] = {FEATURES: tensors[FEATURES], "path": rec.path}
    d[PT_META_KEY] = {"v": FORMAT_VERSION, "key": rec.key, "meta": rec.meta, "tensors": checks}
    for n, t in tensors.items():
        if n != FEATURES:
            d[n] = t
    return d


def record_from_pt(obj: Any, *, key: str | None = None, verify: bool = True) -> Record:
    """Build a :class:`Record` from a loaded per-image dict; accepts legacy caches with only features/path."""
    if not isinstance(obj, dict) or not isinstance(obj.get(FEATURES), torch.Tensor):
        found = type(obj).__name__ if not isinstance(obj, dict) else f"keys {sorted(map(str, obj))}"
        raise RecordError(f"per-image cache is not a dict with a 'features' tensor (found {found})")
    fs = obj.get(PT_META_KEY) if isinstance(obj.get(PT_META_KEY), dict) else None
    names = [FEATURES] + [n for n, v in obj.items() if isinstance(v, torch.Tensor) and n != FEATURES]
    tensors = {n: obj[n] for n in names}
    if fs is not None and verify:
        for n, check in (fs.get("tensors") or {}).items():
            t = tensors.get(n)
            if t is None:
                raise RecordError(f"per-image cache lists tensor {n!r} in its metadata but does not contain it")
            if dtype_name(t.dtype) != check.get("dtype") or list(t.shape) != check.get("shape"):
                raise RecordError(f"tensor {n!r}: {dtype_name(t.dtype)} {list(t.shape)} differs from its metadata "
                                  f"{check.get('dtype')} {check.get('shape')}")
            if crc32_of(tensor_bytes(t)) != check.get("crc32"):
                raise RecordError(f"tensor {n!r}: crc32 mismatch with its metadata")
    path = obj.get("path")
    rec_key = (fs or {}).get("key") or key or (str(path) if path is not None else "")
    meta = dict((fs or {}).get("meta") or {})
    if fs is None:
        meta.setdefault("legacy", True)
    return Record(str(rec_key), str(path) if path is not None else rec_key, tensors, meta)
