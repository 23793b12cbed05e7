"""load_vggt: every checkpoint layout written for real, prefix/config detection, and every failure's message."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from featstore.errors import CheckpointError
from featstore.model import VGGTAggregator, VGGTConfig, load_vggt, rule_state_dict
from featstore.model.checkpoint import default_dtype

HEADS = {
    "camera_head.trunk_norm.weight": torch.ones(8),
    "depth_head.scratch.output_conv.weight": torch.full((4, 4), 3.0),
    "track_head.fnet.conv.bias": torch.zeros(5),
}


@pytest.fixture(scope="module")
def tiny_sd():
    return rule_state_dict("tiny")


@pytest.fixture(scope="module")
def tiny_model():
    return load_vggt("tiny")


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(1, 2, 3, 42, 56)


def full_vggt_dict(sd: dict, prefix: str = "", heads: bool = True) -> dict:
    """A state dict laid out like the official VGGT model (aggregator.* + heads), under `prefix`."""
    out = {f"{prefix}aggregator.{k}": v for k, v in sd.items()}
    if heads:
        out.update({prefix + k: v for k, v in HEADS.items()})
    return out


def assert_same_model(model, reference, images):
    assert model.config == reference.config
    assert model.fingerprint == reference.fingerprint
    with torch.no_grad():
        a, b = model(images, layers=(0, 1)), reference(images, layers=(0, 1))
    assert all(torch.equal(a[i], b[i]) for i in (0, 1))


def test_named_sources(tiny_model):
    assert tiny_model.source == "tiny" and tiny_model.config.name == "tiny"
    assert not tiny_model.training
    assert len(tiny_model.fingerprint) == 64
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in tiny_model.parameters())
    assert load_vggt("tiny").fingerprint == tiny_model.fingerprint  # stable
    assert default_dtype("cpu") == torch.float32


def test_golden_tiny_weights_file_gives_same_fingerprint(golden_dir, tiny_model):
    model = load_vggt(golden_dir / "tiny" / "weights.safetensors")
    assert model.fingerprint == tiny_model.fingerprint and model.config.name == "tiny"


def test_safetensors_dir_and_file_skip_heads_without_reading(tmp_path, tiny_sd, tiny_model, images, monkeypatch):
    save_file(full_vggt_dict(tiny_sd), str(tmp_path / "model.safetensors"))
    read = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.inner = real_open(*a, **k)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.inner.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    model = load_vggt(tmp_path)
    assert model.source == str(tmp_path / "model.safetensors")
    assert_same_model(model, tiny_model, images)
    assert len(read) == len(tiny_sd) and not any("head" in k.split(".")[0] for k in read)
    assert_same_model(load_vggt(str(tmp_path / "model.safetensors")), tiny_model, images)


@pytest.mark.parametrize("name,wrap", [("model.pt", False), ("model.pth", True), ("pytorch_model.bin", False)])
def test_torch_save_layouts(tmp_path, tiny_sd, tiny_model, images, monkeypatch, name, wrap):
    sd = full_vggt_dict(tiny_sd)
    torch.save({"model": sd, "epoch": 3} if wrap else sd, tmp_path / name)
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    model = load_vggt(tmp_path)
    assert calls and calls[0]["weights_only"] is True and calls[0]["mmap"] is True
    assert model.source.endswith(name)
    assert_same_model(model, tiny_model, images)
    assert all(p.data_ptr() != t.data_ptr() for p, t in zip(model.parameters(), tiny_sd.values()))


def test_sharded_safetensors_with_index_never_touches_head_shard(tmp_path, tiny_sd, tiny_model, images):
    sd = full_vggt_dict(tiny_sd)
    keys = list(sd)
    agg = [k for k in keys if k.startswith("aggregator.")]
    shards = {"model-00001-of-00003.safetensors": agg[: len(agg) // 2],
              "model-00002-of-00003.safetensors": agg[len(agg) // 2:],
              "model-00003-of-00003.safetensors": [k for k in keys if not k.startswith("aggregator.")]}
    for shard, names in shards.items():
        save_file({k: sd[k] for k in names}, str(tmp_path / shard))
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "model-00003-of-00003.safetensors").unlink()  # heads only: must never be opened
    model = load_vggt(tmp_path)
    assert model.source.endswith("model.safetensors.index.json")
    assert_same_model(model, tiny_model, images)
    # A missing aggregator shard is an error that names the shard.
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors.*does not exist"):
        load_vggt(tmp_path)


@pytest.mark.parametrize("prefix", ["", "module.", "vggt.", "model.vggt.", "module.vggt."])
def test_prefixed_keys(tmp_path, tiny_sd, tiny_model, images, prefix):
    save_file(full_vggt_dict(tiny_sd, prefix), str(tmp_path / "model.safetensors"))
    assert_same_model(load_vggt(tmp_path), tiny_model, images)


def test_bare_aggregator_state_dict(tmp_path, tiny_sd, tiny_model, images):
    torch.save(dict(tiny_sd), tmp_path / "agg.pt")
    assert_same_model(load_vggt(tmp_path / "agg.pt"), tiny_model, images)


def test_custom_config_inferred_from_shapes(tmp_path, images):
    cfg = VGGTConfig(name="custom", img_size=28 * 4, embed_dim=32, depth=3, num_heads=2, mlp_ratio=2.0,
                     dino_depth=1, dino_num_heads=2, dino_mlp_ratio=2.0)
    sd = rule_state_dict(cfg)
    save_file(full_vggt_dict(sd, heads=False), str(tmp_path / "model.safetensors"))
    model = load_vggt(tmp_path)
    assert model.config == cfg
    reference = VGGTAggregator(cfg)
    reference.load_state_dict(sd)
    with torch.no_grad():
        out, ref = model(images, layers=(-1,)), reference.eval()(images, layers=(2,))
    assert list(out) == [2] and torch.equal(out[2], ref[2])


def test_bfloat16_load(tiny_model, images):
    model = load_vggt("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model._resnet_mean.dtype == torch.float32
    assert model.fingerprint == tiny_model.fingerprint  # fingerprints the weights as read
    with torch.no_grad():
        out = model(images, layers=(1,))[1]
        ref = tiny_model(images, layers=(1,))[1]
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() < 0.15


@pytest.mark.slow  # torch.compile tracing (about 5 s)
def test_torch_compile_fullgraph(tiny_model, images):
    """No graph breaks (fullgraph); eager backend keeps this quick on CPU."""
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model, backend="eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(images, layers=(0, 1))
        ref = tiny_model(images, layers=(0, 1))
    assert all(torch.equal(out[i], ref[i]) for i in (0, 1))


# --------------------------------------------------------------------------------------------------- failures

def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(CheckpointError, match=r"VGGT checkpoint not found at .*nope.*expected model\.safetensors"):
        load_vggt(missing)


def test_directory_without_checkpoint(tmp_path):
    (tmp_path / "README.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"not found in directory .*found \['README.txt'\]"):
        load_vggt(tmp_path)


def test_missing_key(tmp_path, tiny_sd):
    sd = full_vggt_dict(tiny_sd)
    del sd["aggregator.global_blocks.1.ls2.gamma"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_vggt(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "model.safetensors") in msg
    assert "missing keys: 1 (global_blocks.1.ls2.gamma)" in msg
    assert "unexpected" not in msg and "unmodified VGGT checkpoint" in msg


def test_unexpected_keys_listed_with_count(tmp_path, tiny_sd):
    sd = full_vggt_dict(tiny_sd)
    for i in range(7):
        sd[f"aggregator.extra.{i}"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: 7 \(extra\.0, extra\.1, extra\.2, extra\.3, "
                                              r"extra\.4, \.\.\.\)"):
        load_vggt(tmp_path)


def test_wrong_shape(tmp_path, tiny_sd):
    sd = full_vggt_dict(tiny_sd)
    sd["aggregator.global_blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    torch.save(sd, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt.*wrong shapes: 1 \(global_blocks\.1\.attn\.proj\.weight "
                                              r"\[64, 32\] != \[64, 64\]\)"):
        load_vggt(tmp_path)


def test_not_a_vggt_checkpoint(tmp_path):
    save_file({"encoder.weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no VGGT aggregator in .*camera_token"):
        load_vggt(tmp_path)


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_vggt(tmp_path)


def test_truncated_safetensors(tmp_path, tiny_sd):
    save_file(full_vggt_dict(tiny_sd), str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_vggt(tmp_path)


def test_corrupt_pt(tmp_path, tiny_sd):
    torch.save(full_vggt_dict(tiny_sd), tmp_path / "model.pt")
    data = (tmp_path / "model.pt").read_bytes()
    (tmp_path / "model.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"cannot read VGGT checkpoint .*model\.pt.*corrupt"):
        load_vggt(tmp_path)


def test_pickled_object_refused(tmp_path):
    torch.save({"weights": [object()]}, tmp_path / "model.pt")  # not loadable with weights_only=True
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_vggt(tmp_path / "model.pt")
