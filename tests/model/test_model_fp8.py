"""Opt-in FP8 (featstore.model.fp8, recipe "fp8"): the emulation equals torch's own rowwise-scaled FP8 matmul,
the recipe converts every block linear, and its feature error against bf16 is measured per layer."""

from __future__ import annotations

import sys

import pytest
import torch

from featstore.errors import OptionError
from featstore.model import get_precision, load_vggt
from featstore.model.fp8 import (E4M3_MAX, EmulatedFp8Linear, ScaledMmFp8Linear, block_linears, convert_fp8,
                                 feature_error, fp8_backend, quantize_rows)
from featstore.model.precision import PRECISION_NAMES, TRAINING_EXACT_NAMES


def test_rowwise_e4m3_quantization():
    t = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 8)[:, None]
    q, scale = quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (8, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((8,), E4M3_MAX))  # each row's amax maps to 448
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: relative rounding <= 2^-4 for normal values (small ones are subnormal)
    normal = t.abs() >= scale * 2 ** -6
    assert ((back - t).abs() <= t.abs() * 2 ** -4 + 1e-12)[normal].all()


def test_emulated_linear_equals_torch_scaled_mm():
    gen = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48).bfloat16()
    x = torch.randn(2, 10, 64, generator=gen).bfloat16()
    got = EmulatedFp8Linear(lin)(x)
    x8, xs = quantize_rows(x.reshape(-1, 64))
    w8, ws = quantize_rows(lin.weight)
    ref = torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.float32) + lin.bias.float()
    assert got.dtype == torch.bfloat16
    # the same products summed in another order, then one bf16 rounding: within one bf16 ulp
    assert ((got.float() - ref.reshape(2, 10, 48)).abs() <= ref.abs().reshape(2, 10, 48) * 2 ** -8 + 1e-4).all()
    plain = lin(x).float()
    assert 1e-3 < ((got.float() - plain).norm() / plain.norm()).item() < 0.1  # fp8 differs from bf16


def test_fp8_recipe_is_registered_but_not_training_exact():
    recipe = get_precision("fp8")
    assert "fp8" in PRECISION_NAMES and "fp8" not in TRAINING_EXACT_NAMES and not recipe.training_exact
    assert TRAINING_EXACT_NAMES == ("fp32", "bf16", "amp", "deepspeed-bf16")
    assert recipe.compute_name("cpu") == "bfloat16-weights+fp8-linears"
    assert "NOT training-exact" in recipe.reproduces


def test_fp8_features_against_bf16_per_layer():
    bf16 = get_precision("bf16").prepare(load_vggt("tiny", dtype=torch.float32))
    fp8 = get_precision("fp8").prepare(load_vggt("tiny", dtype=torch.float32))
    assert len(block_linears(bf16)) == 6 * 4 and not block_linears(fp8)  # qkv, proj, fc1, fc2 of 6 blocks
    assert sum(isinstance(m, EmulatedFp8Linear) for m in fp8.modules()) == 6 * 4
    assert fp8.patch_embed.patch_embed.proj.weight.dtype == torch.bfloat16  # the patch conv stays bf16
    images = torch.rand(2, 2, 3, 28, 42, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        ref, got = bf16(images, layers=(0, 1)), fp8(images, layers=(0, 1))
    err = feature_error(ref, got)
    assert set(err) == {0, 1}
    # Measured (tiny model, these images): rel L2 0.24% (layer 0) and 0.26% (layer 1), max abs 0.0156 on
    # features up to 3.14 (most of the residual stream skips the matmuls; the full-size model: gpu_bench.py).
    for layer, e in err.items():
        assert 1e-3 < e["rel_l2"] < 0.01, (layer, e)
        assert 0 < e["max_abs"] < 0.05, (layer, e)


def test_fp8_backend_choice_and_errors(monkeypatch):
    assert fp8_backend("cpu") == "emulate"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "NVIDIA A100")
    with pytest.raises(OptionError, match=r"FP8 tensor cores .*NVIDIA A100 is 8.0: use --precision bf16"):
        fp8_backend("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed
    with pytest.raises(OptionError, match=r"needs torchao, which is not installed: pip install 'featstore\[fp8\]'"):
        fp8_backend("cuda:0")


def test_scaled_mm_backend_equals_the_emulation():
    emulated = get_precision("bf16").prepare(load_vggt("tiny", dtype=torch.float32))
    native = get_precision("bf16").prepare(load_vggt("tiny", dtype=torch.float32))
    assert convert_fp8(emulated, "emulate") == convert_fp8(native, "scaled_mm") == 24
    assert sum(isinstance(m, ScaledMmFp8Linear) for m in native.modules()) == 24
    images = torch.rand(1, 2, 3, 28, 28, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.no_grad():
        err = feature_error(emulated(images, layers=(1,)), native(images, layers=(1,)))[1]
    # torch's kernel rounds its output to bf16 before the bias; the emulation after: a bf16 ulp apart at most
    assert err["rel_l2"] < 2e-3 and err["max_abs"] <= 0.0625, err
