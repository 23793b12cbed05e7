"""Records as training samples: a decoded record becomes a dict of ``key``, ``path`` and tensors
(:func:`record_to_sample`), decoded into a DataLoader worker's shared-memory slot when there is one
(:func:`decode_to_sample`); webdataset samples of featstore shards decode with :func:`decode_sample`, and
int8 tensors read with ``dequantize=False`` turn back into their stored dtype with :func:`dequantize`."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from featstore.formats.aliases import SAMPLE_CONTEXTS
from featstore.errors import RecordError
from featstore.formats.codecs import dequantize_int8, unpack_scales
from featstore.formats.layout import RECORD_EXT
from featstore.formats.record import FEATURES, SCALES, Record, decode_record, output_nbytes, parse_dtype
from featstore.read.sharedpool import SharedSample, Slot, SlotPool, aligned


def record_to_sample(rec: Record) -> dict[str, Any]:
    """The training sample of a record: ``key``, ``path``, ``features`` and any other stored tensors; a sample
    store's records also give ``frames`` (frame keys in training order) and ``grid`` ((h, w) of the tokens).

    A record read with ``dequantize=False`` keeps each int8-coded tensor ``<name>`` as int8 and adds
    ``<name>_scales`` (float32 ``[C + P]``: C channel scales, then one scale per token) and ``quantized``
    (``{name: stored dtype name}``); :func:`dequantize` turns them back into the stored dtype.
    """
    sample: dict[str, Any] = {"key": rec.key, "path": rec.path}
    if rec.meta.get("context") in SAMPLE_CONTEXTS:  # a training sample's record: its frames and token grid
        sample["frames"] = list(rec.meta.get("frames") or [])
        sample["grid"] = tuple(rec.meta.get("grid") or ())
    sample.update(rec.tensors)
    if rec.quantized:
        sample["quantized"] = dict(rec.quantized)
    return sample


def decode_to_sample(data: bytes | memoryview, dequantize: bool, pool: SlotPool | None, read_into: Slot | None = None
                     ) -> dict[str, Any]:
    """The training sample of a stored record; with a DataLoader worker's ``pool``, its decoded tensors share one
    recycled shared-memory slot, so the sample crosses to the main process without a copy or a new segment.

    ``read_into``: the pool slot ``data`` was read into (an uncompressed record, whose ``raw`` tensors are views
    of it; any other tensor of the record is allocated as usual).
    """
    if read_into is not None:
        sample = SharedSample(record_to_sample(decode_record(data, verify=False, dequantize=dequantize)))
        sample.slot = read_into
        return sample
    sizes = output_nbytes(data, dequantize=dequantize) if pool is not None else []
    if pool is None or not sizes:
        return record_to_sample(decode_record(data, verify=False, dequantize=dequantize))
    slot = pool.slot(sum(aligned(n) for n in sizes))
    sample = SharedSample(record_to_sample(decode_record(data, verify=False, dequantize=dequantize, empty=slot.empty)))
    sample.slot = slot
    return sample


def decode_sample(sample: dict[str, Any], dequantize: bool = True) -> dict[str, Any]:
    """Decode a webdataset sample (``{"__key__", "fsr": bytes, ...}``) from featstore shards into a training sample.

    Usable in any plain pipeline: ``wds.WebDataset(urls).map(featstore.loader.decode_sample)``.
    """
    data = sample.get(RECORD_EXT)
    if data is None:
        raise RecordError(f"webdataset sample {sample.get('__key__')!r} has no {RECORD_EXT!r} field (found "
                          f"{sorted(k for k in sample if not k.startswith('__'))}); is this a featstore shard?")
    return record_to_sample(decode_record(data, verify=False, dequantize=dequantize))


def dequantize(sample: Mapping[str, Any], name: str = FEATURES, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensor ``name`` of a sample read with ``dequantize=False``, in ``dtype`` (default: its stored dtype).

    Works on a single sample or a collated batch (leading batch dimensions broadcast), on whatever device
    the sample's tensors are, so training can move the int8 values to the GPU and dequantize there.
    A tensor that was not quantized is returned as it is (cast to ``dtype`` when given).
    """
    values = sample[name]
    if values.dtype != torch.int8 or name + SCALES not in sample:
        return values if dtype is None else values.to(dtype)
    if dtype is None:
        stored = (sample.get("quantized") or {}).get(name, "float32")
        dtype = parse_dtype(stored if isinstance(stored, str) else stored[0])  # collated: a list of names
    channel_scale, token_scale = unpack_scales(values, sample[name + SCALES])
    return dequantize_int8(values, channel_scale, token_scale, dtype)
