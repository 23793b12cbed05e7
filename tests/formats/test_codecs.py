"""Record codecs (zstd, raw, int8): round trips, stored error bounds, legacy records, corruption, hostile headers."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
import zstandard
from safetensors.torch import load_file

import featstore
from featstore.errors import RecordError
from featstore.formats import codecs
from featstore.formats.codecs import CODECS
from featstore.formats.record import Record, decode_header, decode_record, encode_record
from featstore.read.samples import record_to_sample

LOSSLESS = ("zstd", "raw")


def golden_features(golden_dir, which: str) -> torch.Tensor:
    """Real model outputs from the golden data: the tiny model's, or the full-size model's layer 22."""
    if which == "tiny":
        return load_file(str(golden_dir / "tiny" / "b1s1.safetensors"))["output.1"][0, 0, 5:]
    return load_file(str(golden_dir / "full" / "expected.safetensors"))["layer22_patch_tokens"][0, 0]


def with_outliers(x: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` with ``count`` channels scaled 10x to 100x (as ViT outlier channels are); returns (x, their indices)."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(x.shape[-1], generator=g)[:count]
    y = x.float().clone()
    y[..., idx] *= torch.linspace(10, 100, count)
    return y.to(x.dtype), idx


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def round_trip(t: torch.Tensor, codec: str, **kw) -> Record:
    return decode_record(encode_record(Record("k.jpg", "k.jpg", {"features": t}, {"m": 1}), codec=codec), **kw)


@pytest.mark.parametrize("codec", LOSSLESS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lossless_codecs_are_bit_exact_including_nonfinite(codec, dtype):
    t = torch.randn(1, 37, 24).to(dtype)
    t[0, 0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    extra = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    data = encode_record(Record("k", "k", {"features": t, "layer_1": extra}), codec=codec)
    rec = decode_record(data)
    assert rec.features.dtype == dtype and not rec.bounds
    assert torch.equal(rec.features.view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(rec.tensors["layer_1"], extra)
    assert [s.codec for s in decode_header(data)[1]] == [codec, codec]


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_unshuffle_undoes_the_shuffle_into_aligned_and_misaligned_outputs(itemsize):
    raw = np.random.default_rng(itemsize).integers(0, 256, 4096 * itemsize, dtype=np.uint8)
    planes = codecs.shuffle_bytes(memoryview(raw), itemsize)
    for offset in (0, 1):
        buf = np.zeros(raw.size + 1, np.uint8)
        codecs.unshuffle_into(planes, itemsize, buf[offset:offset + raw.size])
        assert np.array_equal(buf[offset:offset + raw.size], raw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_large_tensors_decode_bit_exact_into_reused_heap_memory(dtype):
    t = torch.randn(2, 300, 128).to(dtype)  # above HEAP_TENSOR_BYTES: the numpy-allocated output path
    assert t.nbytes >= codecs.HEAP_TENSOR_BYTES
    for _ in range(3):  # freed outputs are reused: each decode must still fill its tensor completely
        rec = round_trip(t, "zstd", verify=True)
        assert rec.features.dtype == dtype and rec.features.shape == t.shape
        assert torch.equal(rec.features.view(torch.uint8), t.view(torch.uint8))
        del rec
    q = round_trip(t.float(), "int8")
    assert q.features.dtype == torch.float32 and rel_l2(q.features, t.float()) <= q.bounds["features"]["rel_l2"] + 1e-6


def test_raw_decodes_as_views_of_an_aligned_buffer():
    t = torch.randn(1, 50, 32).to(torch.bfloat16)
    data = encode_record(Record("k", "k", {"features": t, "layer_3": t.float()}), codec="raw")
    buf = torch.empty(len(data), dtype=torch.uint8)  # aligned, writable: what the loader reads into
    buf.numpy()[:] = np.frombuffer(data, np.uint8)
    rec = decode_record(memoryview(buf.numpy()), verify=False)
    lo, hi = buf.data_ptr(), buf.data_ptr() + len(data)
    for name in ("features", "layer_3"):
        got = rec.tensors[name]
        assert lo <= got.data_ptr() < hi and got.data_ptr() % 64 == 0  # a view, 64-byte aligned
    assert torch.equal(rec.features, t) and torch.equal(rec.tensors["layer_3"], t.float())
    assert torch.equal(decode_record(data).features, t)  # read-only bytes: copied, same values


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_int8_on_real_features_within_target_and_stored_bound(golden_dir, which):
    x = golden_features(golden_dir, which).to(torch.bfloat16)[None]
    data = encode_record(Record("k", "k", {"features": x}), codec="int8")
    rec = decode_record(data)
    bound = rec.bounds["features"]
    assert rec.features.dtype == torch.bfloat16 and rec.features.shape == x.shape
    assert bound["codec"] == "int8" and bound["rel_l2"] <= 0.01  # the target
    assert rel_l2(rec.features, x) == pytest.approx(bound["rel_l2"], rel=1e-6)
    assert float((rec.features.float() - x.float()).abs().max()) == pytest.approx(bound["max_abs"], rel=1e-6)
    if which == "full":  # bytes per value: <= 2.6 MB for a 1369 x 2048 (518x518) record
        assert len(data) / x.numel() * 1369 * 2048 <= 2.6e6


@pytest.mark.parametrize("which", ["tiny", "full"])
def test_int8_outlier_channels_do_not_cost_the_ordinary_ones(golden_dir, which):
    x = golden_features(golden_dir, which).to(torch.bfloat16)[None]
    y, idx = with_outliers(x, max(2, x.shape[-1] // 100))
    rec = round_trip(y, "int8")
    ordinary = torch.ones(x.shape[-1], dtype=torch.bool)
    ordinary[idx] = False
    assert rec.bounds["features"]["rel_l2"] <= 0.01
    assert rel_l2(rec.features[..., ordinary], y[..., ordinary]) <= 0.01
    # the scheme the codec avoids: one scale per token, shared by the outliers and the ordinary channels
    yf = y.float()
    step = yf.abs().amax(-1, keepdim=True) / 85
    shared = torch.round(yf / step) * step
    assert rel_l2(shared[..., ordinary], y[..., ordinary]) > 2 * rel_l2(rec.features[..., ordinary], y[..., ordinary])


def test_int8_zeros_and_zero_channels_are_exact():
    t = torch.zeros(1, 20, 16)
    rec = round_trip(t, "int8")
    assert torch.equal(rec.features, t) and rec.bounds["features"] == {"rel_l2": 0.0, "max_abs": 0.0, "codec": "int8"}
    u = torch.randn(1, 20, 16)
    u[..., 3] = 0
    u[0, 5] = 0
    got = round_trip(u, "int8").features
    assert torch.equal(got[..., 3], u[..., 3]) and torch.equal(got[0, 5], u[0, 5])


@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_int8_refuses_nonfinite_at_write(bad):
    t = torch.randn(1, 8, 8)
    t[0, 2, 2] = bad
    with pytest.raises(RecordError, match="features.*NaN/Inf"):
        encode_record(Record("k", "k", {"features": t}), codec="int8")


def test_int8_dequantize_false_gives_values_and_scales_that_dequantize_on_any_batch():
    x = torch.randn(1, 30, 64).to(torch.bfloat16)
    full = round_trip(x, "int8")
    raw = round_trip(x, "int8", dequantize=False)
    assert raw.quantized == {"features": "bfloat16"} and raw.features.dtype == torch.int8
    assert set(raw.tensors) == {"features", "features_scales"} and raw.tensors["features_scales"].shape == (64 + 30,)
    sample = record_to_sample(raw)
    assert torch.equal(featstore.dequantize(sample), full.features)
    other = round_trip(x * 3, "int8", dequantize=False)
    batch = torch.utils.data.default_collate([sample, record_to_sample(other)])  # what a DataLoader batch holds
    out = featstore.dequantize(batch)
    assert out.shape == (2, 1, 30, 64) and out.dtype == torch.bfloat16
    assert torch.equal(out[0], full.features) and torch.equal(out[1], round_trip(x * 3, "int8").features)
    assert torch.equal(featstore.dequantize(batch, dtype=torch.float32)[1].to(torch.bfloat16), out[1])


def test_mixed_codecs_in_one_record():
    f = torch.randn(1, 10, 32).to(torch.bfloat16)
    other = torch.randn(1, 10, 32)
    data = encode_record(Record("k", "k", {"features": f, "layer_5": other, "ids": torch.arange(3)}),
                         codec={"features": "int8", "layer_5": "raw", "ids": "int8"})
    _, specs, first = decode_header(data)
    assert [s.codec for s in specs] == ["int8", "raw", "zstd"]  # an integer tensor falls back to zstd
    assert first % 64 == 0
    rec = decode_record(data)
    assert torch.equal(rec.tensors["layer_5"], other) and torch.equal(rec.tensors["ids"], torch.arange(3))
    assert set(rec.bounds) == {"features"}


def legacy_record(key: str, t: torch.Tensor) -> bytes:
    """A record exactly as featstore wrote it before codecs existed (written here independently of the codec)."""
    raw = t.contiguous().view(-1).view(torch.uint8).numpy()
    planes = raw.reshape(-1, t.element_size()).T.copy()
    z = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(planes.tobytes())
    spec = {"name": "features", "dtype": "bfloat16", "shape": list(t.shape), "nbytes": raw.size, "zbytes": len(z),
            "crc32": zlib.crc32(raw.tobytes()) & 0xFFFFFFFF, "filter": "byteshuffle"}
    hb = json.dumps({"v": 1, "key": key, "path": key, "meta": {"layers": {"features": 22}}, "tensors": [spec]},
                    separators=(",", ":")).encode()
    return b"FSR1" + struct.pack("<I", len(hb)) + hb + z


def test_legacy_records_decode_unchanged():
    t = torch.randn(1, 40, 16).to(torch.bfloat16)
    rec = decode_record(legacy_record("old.jpg", t))
    assert torch.equal(rec.features, t) and rec.meta == {"layers": {"features": 22}} and not rec.bounds
    assert decode_header(legacy_record("old.jpg", t))[1][0].codec == "zstd"
    # today's zstd records keep the legacy layout: every field an older reader needs, unpadded
    header, specs, first = decode_header(encode_record(Record("k", "k", {"features": t})))
    assert header["v"] == 1 and specs[0].filter == "byteshuffle" and specs[0].pad == 0


@pytest.mark.parametrize("codec", CODECS)
def test_a_flipped_payload_byte_is_caught_by_verify_decoding(codec):
    t = torch.randn(1, 64, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    data = encode_record(Record("k", "k", {"features": t}), codec=codec)
    want = decode_record(data).features
    _, specs, first = decode_header(data)
    rng = np.random.default_rng(0)
    flips = [(first, 0), (first + 3, 7)]  # the zstd magic (int8: a scale): a damaged frame header is a RecordError
    flips += [(int(p), int(rng.integers(8))) for p in rng.integers(first, first + specs[0].zbytes, size=40)]
    caught = 0
    for pos, bit in flips:
        bad = bytearray(data)
        bad[pos] ^= 1 << bit
        try:
            got = decode_record(bytes(bad), verify=True)
        except RecordError:
            caught += 1
            continue
        # zstd ignores a few bits (an unused frame-header flag, padding at a bitstream's end): the same values
        assert codec == "zstd" and torch.equal(got.features.view(torch.uint8), want.view(torch.uint8)), (pos, bit)
    assert caught >= len(flips) - 2


def test_hostile_int8_headers_are_refused_before_allocating():
    data = encode_record(Record("k", "k", {"features": torch.randn(1, 8, 16)}), codec="int8")
    header, _, first = decode_header(data)
    for change in ({"block": 3}, {"qbytes": 10**12}, {"codec": "fp4"}, {"nbytes": 1 << 40}):
        h = json.loads(json.dumps(header))
        h["tensors"][0].update(change)
        hb = json.dumps(h).encode()
        with pytest.raises(RecordError):
            decode_record(b"FSR1" + struct.pack("<I", len(hb)) + hb + data[first:])


@pytest.mark.parametrize("codec", ["zstd", "int8"])
def test_training_reads_reject_a_corrupt_zstd_frame_without_the_crc_pass(codec):
    t = torch.randn(1, 64, 32).to(torch.bfloat16)
    data = encode_record(Record("k", "k", {"features": t}), codec=codec)
    _, specs, first = decode_header(data)
    frame_start = first + specs[0].zbytes - specs[0].fields.get("qbytes", specs[0].zbytes)
    rng = np.random.default_rng(1)
    for pos in rng.integers(frame_start, first + specs[0].zbytes, size=30):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(RecordError):
            decode_record(bytes(bad), verify=False)
