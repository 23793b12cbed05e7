"""The codec registry: one Codec object per module of featstore.formats.codecs, found without a list to edit."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from featstore.errors import RecordError
from featstore.formats import codecs
from featstore.formats.record import Record, decode_header, decode_record, encode_record


def test_registry_holds_one_object_per_codec_module_in_order():
    assert codecs.CODECS == ("zstd", "raw", "int8") and codecs.DEFAULT_CODEC == codecs.CODECS[0]
    assert codecs.LOSSY_CODECS == {"int8"}
    for name, c in codecs.REGISTRY.items():
        assert isinstance(c, codecs.Codec) and c.name == name and codecs.get(name) is c
    with pytest.raises(RecordError, match="unknown codec 'lz4'"):
        codecs.get("lz4")


@pytest.mark.parametrize("name", ["zstd", "raw", "int8"])
def test_each_codec_object_encodes_decodes_sizes_and_states_its_bound(name):
    c = codecs.get(name)
    t = torch.randn(3, 40, 16).to(torch.bfloat16)
    fields, parts = c.encode("features", t, 1, 0)
    payload = memoryview(bytearray(b"".join(bytes(p) for p in parts)))
    entry = dict(fields, name="features")
    c.validate(entry, tuple(t.shape), t.nbytes)
    sizes = c.output_nbytes(entry, tuple(t.shape), t.dtype, dequantize=True, copies_raw=payload.readonly)
    allocated = []

    def empty(shape, dtype):
        allocated.append(torch.Size(shape).numel() * dtype.itemsize)
        return torch.empty(shape, dtype=dtype)

    out = c.decode(entry, payload, t.dtype, tuple(t.shape), verify=True, dequantize=True, empty=empty)
    assert allocated == sizes and out.shape == t.shape and out.dtype == t.dtype
    bound = c.error_bound(entry)
    if c.lossy:
        assert set(bound) == {"rel_l2", "max_abs"}
        assert float((out.float() - t.float()).norm() / t.float().norm()) <= bound["rel_l2"] + 1e-6
    else:
        assert bound is None and torch.equal(out.view(torch.uint8), t.view(torch.uint8))


NEW_CODEC = '''
    """A test codec: the tensor's bytes, each xor-ed with 0x5A."""
    import numpy as np
    import torch

    from featstore.formats.codecs.base import Codec, crc32_of, tensor_bytes


    class XorCodec(Codec):
        name, order = "xor", 50

        def encode(self, name, t, level, block):
            raw = tensor_bytes(t)
            data = (np.frombuffer(raw, np.uint8) ^ 0x5A).tobytes()
            return {"codec": "xor", "filter": "xor", "crc32": crc32_of(raw), "zbytes": len(data)}, [data]

        def decode(self, fields, payload, dtype, shape, *, verify, dequantize, empty):
            out = empty(shape, dtype)
            out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(payload, np.uint8) ^ 0x5A
            return out


    CODEC = XorCodec()
'''


def test_a_new_codec_is_one_new_module(tmp_path, monkeypatch):
    (tmp_path / "xor.py").write_text(textwrap.dedent(NEW_CODEC))
    monkeypatch.setattr(codecs, "__path__", [*codecs.__path__, str(tmp_path)])
    try:
        found = codecs._discover()
    finally:
        sys.modules.pop("featstore.formats.codecs.xor", None)
    assert tuple(found) == ("zstd", "raw", "int8", "xor")
    monkeypatch.setattr(codecs, "REGISTRY", found)
    t = torch.randn(2, 9, 8)
    data = encode_record(Record("k", "k", {"features": t}), codec="xor")
    assert [s.codec for s in decode_header(data)[1]] == ["xor"]
    assert torch.equal(decode_record(data, verify=True).features, t)
