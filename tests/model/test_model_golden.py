"""The aggregator against the official VGGT golden outputs (shared/golden/tiny, full) and the weight rule."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from featstore.model import VGGTAggregator, get_config, load_vggt, rule_state_dict
from featstore.model.weights import rule_seed

TINY_CASES = ["b1s1", "b2s3", "b1s2_h294w518"]


@pytest.fixture(scope="module")
def tiny_model():
    return load_vggt("tiny")


def test_rule_check_values_from_readme():
    assert rule_seed("aggregator.camera_token") == 1278331849303793629
    assert rule_seed("aggregator.frame_blocks.0.ls1.gamma") == 5557896378478359223
    assert rule_seed("aggregator.patch_embed.norm.weight") == 8371665881928194686


def test_rule_weights_equal_golden_tiny_bitwise(golden_dir):
    golden = load_file(str(golden_dir / "tiny" / "weights.safetensors"))
    ours = rule_state_dict("tiny")
    assert ["aggregator." + k for k in ours] == [
        e["key"] for e in json.loads((golden_dir / "tiny" / "config.json").read_text())["state_dict_keys"]]
    assert set(golden) == {"aggregator." + k for k in ours}
    for k, t in ours.items():
        assert torch.equal(t, golden["aggregator." + k]), k


def test_rule_weights_match_full_fingerprints(golden_dir):
    """A few full-size tensors of each rule class, bit-exact (sha256 of float32 LE bytes)."""
    fps = json.loads((golden_dir / "full" / "weight_fingerprints.json").read_text())["keys"]
    shapes = {e["key"]: e["shape"] for e in json.loads((golden_dir / "vggt1b_keys.json").read_text())["state_dict"]}
    from featstore.model.weights import rule_tensor
    keys = ["aggregator.camera_token", "aggregator.register_token", "aggregator.patch_embed.norm.weight",
            "aggregator.frame_blocks.0.ls1.gamma", "aggregator.global_blocks.23.attn.k_norm.weight",
            "aggregator.patch_embed.pos_embed", "aggregator.frame_blocks.5.attn.qkv.weight",
            "camera_head.trunk_norm.weight"]
    for k in keys:
        t = rule_tensor(k, shapes[k])
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == fps[k]["sha256_f32le"], k
        assert t.flatten()[:3].tolist() == pytest.approx(fps[k]["first"], abs=0)


def test_vggt1b_config_keys_shapes_dtypes_on_meta(golden_dir):
    ref = json.loads((golden_dir / "vggt1b_keys.json").read_text())
    expected = [(e["key"][len("aggregator."):], e["shape"], e["dtype"]) for e in ref["state_dict"]
                if e["key"].startswith("aggregator.")]
    with torch.device("meta"):
        model = VGGTAggregator(get_config("vggt-1b"))
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == expected
    assert len(ours) == 1210
    assert sum(p.numel() for p in model.parameters()) == ref["parameters_per_top_level_module"]["aggregator"][
        "num_parameters"]
    buffers = dict(model.named_buffers())
    assert sorted(buffers) == ["_resnet_mean", "_resnet_std"]
    assert all(list(b.shape) == [1, 1, 3, 1, 1] for b in buffers.values())


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_matches_official_every_layer(golden_dir, tiny_model, case):
    data = load_file(str(golden_dir / "tiny" / f"{case}.safetensors"))
    images = data["images_u8"].to(torch.float32) / 255
    with torch.no_grad():
        out = tiny_model(images, layers=(0, 1))
    assert sorted(out) == [0, 1]
    for layer in (0, 1):
        ref = data[f"output.{layer}"]
        assert out[layer].shape == ref.shape
        assert (out[layer] - ref).abs().max().item() <= 2e-5, (case, layer)


def test_layers_argument(golden_dir, tiny_model):
    data = load_file(str(golden_dir / "tiny" / "b1s2_h294w518.safetensors"))
    images = data["images_u8"].to(torch.float32) / 255
    with torch.no_grad():
        default = tiny_model(images)
        last = tiny_model(images, layers=-1)
        both = tiny_model(images, layers=(-1, 0))
    assert list(default) == [0]  # default -2 of a 2-layer model
    assert list(last) == [1] and sorted(both) == [0, 1]
    assert torch.equal(default[0], both[0]) and torch.equal(last[1], both[1])
    assert tiny_model.patch_start_idx == 5
    with pytest.raises(ValueError, match="out of range"):
        tiny_model(images, layers=(2,))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_model(images[..., :285, :], layers=(0,))
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, W\]"):
        tiny_model(images[0])


def test_stops_after_deepest_requested_layer(tiny_model, monkeypatch):
    called = []
    block = tiny_model.frame_blocks[1]
    monkeypatch.setattr(block, "forward", lambda *a, **k: called.append(1) or a[0])
    with torch.no_grad():
        tiny_model(torch.rand(1, 1, 3, 28, 28), layers=(0,))
    assert called == []


@pytest.mark.slow
def test_full_size_rule_weights_match_official(golden_dir):
    """Full VGGT-1B sizes with rule weights: layers 22/23 on full/input within 1e-4 (about a minute on 2 CPUs)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "tools" / "check_full_model.py"
    spec = importlib.util.spec_from_file_location("check_full_model", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    result = tool.check_full_model(golden_dir)
    assert result["max_abs"]["layer22_patch_tokens"] <= 1e-4
    assert result["max_abs"]["layer23_patch_tokens"] <= 1e-4
    assert result["max_abs"]["layer23_special_tokens"] <= 1e-4


def test_non_causal_path_calls_sdpa_without_mask(tiny_model, monkeypatch):
    """Flash kernels need attn_mask=None: the default (official) path must never build a mask."""
    import torch.nn.functional as F

    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        tiny_model(torch.rand(2, 3, 3, 28, 42), layers=(-1,))
    assert len(seen) == 2 + 2 * 2 and all(m is None for m in seen)  # 2 DINO blocks + 2 frame/global pairs
