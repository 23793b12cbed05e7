"""StreamVGGT checkpoints (wzzheng/StreamVGGT): `checkpoints.pth` is `torch.save(StreamVGGT().state_dict())`, the
official VGGT module tree (aggregator.* plus camera/point/depth/track heads); its training loop also writes
`model.pth` = {"model": state_dict} and `checkpoint-<n>.pth`, which pickles the argparse namespace."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from featstore.errors import CheckpointError
from featstore.model import load_vggt, rule_state_dict


@pytest.fixture(scope="module")
def streamvggt_sd(golden_dir):
    """A tiny state dict in StreamVGGT's key layout and order: aggregator keys, then every head key of the
    official tree (head tensors are small stand-ins: featstore never reads them)."""
    keys = [e["key"] for e in json.loads((golden_dir / "vggt1b_keys.json").read_text())["state_dict"]]
    sd = {f"aggregator.{k}": v for k, v in rule_state_dict("tiny").items()}
    heads = [k for k in keys if not k.startswith("aggregator.")]
    assert len(heads) == 587 and "camera_head.trunk.0.attn.qkv.weight" in heads
    sd.update({k: torch.full((2,), float(i)) for i, k in enumerate(heads)})
    return sd


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(1, 2, 3, 28, 42)


def assert_tiny(model, images):
    ref = load_vggt("tiny")
    assert model.config.name == "tiny" and model.fingerprint == ref.fingerprint
    with torch.no_grad():
        assert torch.equal(model(images, layers=(0, 1))[1], ref(images, layers=(0, 1))[1])


def test_checkpoints_pth_file_and_folder(tmp_path, streamvggt_sd, images):
    path = tmp_path / "ckpt" / "checkpoints.pth"
    path.parent.mkdir()
    torch.save(streamvggt_sd, path)
    by_file = load_vggt(path)
    assert by_file.source == str(path)
    assert_tiny(by_file, images)
    by_folder = load_vggt(path.parent)
    assert by_folder.source == str(path)
    assert_tiny(by_folder, images)


def test_training_model_pth_wraps_the_state_dict(tmp_path, streamvggt_sd, images):
    torch.save({"model": streamvggt_sd}, tmp_path / "model.pth")
    assert_tiny(load_vggt(tmp_path), images)


def test_training_checkpoint_with_args_is_refused_with_a_pointer(tmp_path, streamvggt_sd):
    path = tmp_path / "checkpoint-last.pth"
    torch.save({"model": streamvggt_sd, "args": argparse.Namespace(lr=1e-4), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match=r"checkpoint-last\.pth.*objects other than tensors"):
        load_vggt(path)


def test_folder_prefers_official_names_over_checkpoints_pth(tmp_path, streamvggt_sd, images):
    torch.save(streamvggt_sd, tmp_path / "checkpoints.pth")
    torch.save({f"aggregator.{k}": v for k, v in streamvggt_sd.items() if k.startswith("aggregator.")},
               tmp_path / "model.pt")
    assert load_vggt(tmp_path).source == str(tmp_path / "model.pt")
