"""`featstore build --context joint`: one record per sample, its frames through VGGT together, equal to the
official multi-frame computation (golden tiny/b2s3) and, per precision recipe, to the reference code run under
that recipe (golden tiny_recipes); the frame transform hook; readers, verify and export on joint stores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from helpers import run_inproc, write_jsonl
from featstore import load_sample_features, open_store, stream
from featstore.formats.manifest import read_manifest
from featstore.model import joint_features, load_vggt
from featstore.model.preprocess import preprocess_image


pytestmark = pytest.mark.usefixtures("one_thread")  # the golden files were made with 1 thread


@pytest.fixture(scope="module")
def golden(golden_dir):
    return {"b2s3": load_file(str(golden_dir / "tiny" / "b2s3.safetensors")),
            "joint": load_file(str(golden_dir / "tiny_recipes" / "joint_outputs.safetensors"))}


def golden_data(root: Path, images_u8: torch.Tensor, extra: dict | None = None) -> list[str]:
    """The golden samples as PNG frames (378x280: crop at --image-size 378 keeps their pixels) and one annotation
    record per sample; returns the ids."""
    ids = []
    records = []
    for b in range(images_u8.shape[0]):
        frames = []
        for s in range(images_u8.shape[1]):
            key = f"scene{b}/frame{s}.png"
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images_u8[b, s].permute(1, 2, 0).numpy()).save(root / key)
            frames.append(key)
        ids.append(f"s{b}")
        records.append({"id": f"s{b}", "images": frames, **(extra or {})})
    write_jsonl(root / "train.jsonl", records)
    return ids


def joint_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--data-root", str(root), "--out", str(out), "--model", "tiny", "--device", "cpu",
            "--no-progress", "--num-workers", "0", "--context", "joint", "--image-size", "378", "--layers=-2",
            "--dtype", "float32", *extra]


@pytest.mark.parametrize("reference", ["first", "last"])
def test_joint_records_equal_the_official_multi_frame_computation(tmp_path, golden, reference):
    images = golden["b2s3"]["images_u8"]
    ids = golden_data(tmp_path / "d", images)
    assert torch.equal(preprocess_image(tmp_path / "d" / "scene0/frame1.png", "crop", image_size=378),
                       images[0, 1].float() / 255)  # the build sees the golden inputs exactly
    r = run_inproc(*joint_args(tmp_path / "d", tmp_path / "s", "--reference-frame", reference, "--batch-size", "2",
                               "--precision", "fp32"))
    assert r.returncode == 0, r.stderr
    store = open_store(tmp_path / "s")
    for b, sid in enumerate(ids):
        got = store.get_sample(id=sid)
        want = (golden["b2s3"]["output.0"][b, :, 5:] if reference == "first"
                else golden["joint"][f"joint.fp32.ref_last.sample_{b}"])
        assert got.shape == (3, 540, 128) and got.dtype == torch.float32
        assert float((got - want).abs().max()) <= 2e-5
        assert torch.equal(store.get_sample([f"scene{b}/frame{s}.png" for s in range(3)]), got)
    m = read_manifest(tmp_path / "s" / "manifest.json")
    assert m["context"] == {"mode": "joint", "reference_frame": reference, "history": None}
    assert m["precision"] == "fp32" and m["feature_shapes"] == {"[3, 540, 128]": 2}
    rec = store.record(ids[0])
    assert rec.meta["frames"] == ["scene0/frame0.png", "scene0/frame1.png", "scene0/frame2.png"]
    assert rec.meta["grid"] == [20, 27] and rec.meta["reference_frame"] == reference
    v = run_inproc("verify", str(tmp_path / "s"), "--recompute", "2")
    assert v.returncode == 0, v.stdout + v.stderr
    frames = [f"scene1/frame{s}.png" for s in range(3)]
    assert torch.equal(load_sample_features([tmp_path / "d" / f for f in frames], store=tmp_path / "s"),
                       store.get_sample(id="s1"))
    streamed = {s["key"]: s for s in stream(tmp_path / "s", shuffle=False)}
    assert streamed["s1"]["frames"] == frames and streamed["s1"]["grid"] == (20, 27)
    assert torch.equal(streamed["s1"]["features"], store.get_sample(id="s1"))  # [S, h*w, C]


@pytest.mark.parametrize("recipe", ["fp32", "amp", "deepspeed-bf16", "bf16"])
def test_each_recipe_through_featstore_build_equals_the_reference_under_it_bit_for_bit(tmp_path, golden, recipe):
    ids = golden_data(tmp_path / "d", golden["b2s3"]["images_u8"])
    r = run_inproc(*joint_args(tmp_path / "d", tmp_path / "s", "--precision", recipe, "--batch-size", "1"))
    assert r.returncode == 0, r.stderr
    assert read_manifest(tmp_path / "s" / "manifest.json")["precision"] == recipe
    store = open_store(tmp_path / "s")
    for b, sid in enumerate(ids):
        assert torch.equal(store.get_sample(id=sid), golden["joint"][f"joint.{recipe}.ref_first.sample_{b}"]), recipe


def test_deepspeed_bf16_is_not_amp_and_a_resume_with_another_recipe_is_refused(tmp_path, golden):
    golden_data(tmp_path / "d", golden["b2s3"]["images_u8"][:1])
    stores = {}
    for recipe in ("amp", "deepspeed-bf16"):
        assert run_inproc(*joint_args(tmp_path / "d", tmp_path / recipe, "--precision", recipe)).returncode == 0
        stores[recipe] = open_store(tmp_path / recipe).get_sample(id="s0")
    assert not torch.equal(stores["amp"], stores["deepspeed-bf16"])
    golden_data(tmp_path / "d", golden["b2s3"]["images_u8"])  # a second sample to build
    r = run_inproc(*joint_args(tmp_path / "d", tmp_path / "amp", "--precision", "deepspeed-bf16"))
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]
    assert r.returncode == 2 and len(errors) == 1
    assert "--precision: the store's records have amp, this run deepspeed-bf16" in errors[0]
    r = run_inproc(*joint_args(tmp_path / "d", tmp_path / "amp", "--autocast"))  # the old spelling of amp
    assert r.returncode == 0, r.stderr


TRANSFORM = '''
from PIL import ImageDraw


def draw(frames, record):
    out = []
    for im in frames:
        im = im.convert("RGB")
        ImageDraw.Draw(im).rectangle(record["spar_info"]["box"], outline=(255, 0, 0), width=3)
        out.append(im)
    return out
'''


def test_frame_transform_features_equal_the_model_on_the_transformed_frames(tmp_path, golden, monkeypatch):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "marks.py").write_text(TRANSFORM)
    monkeypatch.syspath_prepend(str(tmp_path / "hooks"))
    images = golden["b2s3"]["images_u8"][:1]
    golden_data(tmp_path / "d", images, extra={"spar_info": {"box": [40, 30, 200, 150]}})
    r = run_inproc(*joint_args(tmp_path / "d", tmp_path / "plain"))
    assert r.returncode == 1 and "spar_info" in r.stderr  # refused, not computed from the plain files
    failures = [json.loads(ln) for ln in (tmp_path / "plain" / "failures.jsonl").read_text().splitlines()]
    assert len(failures) == 1 and "--frame-transform" in failures[0]["error"]

    r = run_inproc(*joint_args(tmp_path / "d", tmp_path / "s", "--frame-transform", "marks:draw"))
    assert r.returncode == 0, r.stderr
    frames = []
    for s in range(3):
        im = Image.fromarray(images[0, s].permute(1, 2, 0).numpy())
        ImageDraw.Draw(im).rectangle([40, 30, 200, 150], outline=(255, 0, 0), width=3)
        frames.append(preprocess_image(im, "crop", image_size=378))
    want = joint_features(load_vggt("tiny"), torch.stack(frames), layers=(-2,))
    got = open_store(tmp_path / "s").get_sample(id="s0")
    assert torch.equal(got, next(iter(want.values())))
    assert not torch.equal(got, golden["b2s3"]["output.0"][0, :, 5:])  # the rectangle changed the features
    m = read_manifest(tmp_path / "s" / "manifest.json")
    assert m["frame_transform"]["name"] == "marks:draw"
    assert m["frame_transform"]["sha256"] == __import__("hashlib").sha256(TRANSFORM.encode()).hexdigest()
    assert run_inproc("verify", str(tmp_path / "s"), "--recompute", "1").returncode == 0

    (tmp_path / "hooks" / "other.py").write_text(TRANSFORM.replace("width=3", "width=5"))
    golden_data(tmp_path / "d", golden["b2s3"]["images_u8"], extra={"spar_info": {"box": [40, 30, 200, 150]}})
    r = run_inproc(*joint_args(tmp_path / "d", tmp_path / "s", "--frame-transform", "other:draw"))
    assert r.returncode == 2 and "--frame-transform: the store's records have marks:draw" in r.stderr


def test_frames_of_one_sample_must_share_a_size_and_export_per_image_refuses_joint_stores(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    for name, (w, h) in (("a.png", (70, 56)), ("b.png", (70, 56)), ("c.png", (56, 70))):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(root / name)
    write_jsonl(root / "train.jsonl", [{"id": "ok", "images": ["a.png", "b.png"]},
                                       {"id": "mixed", "images": ["a.png", "c.png"]}])
    r = run_inproc(*joint_args(root, tmp_path / "s"), "--image-size", "56", "--allow-failures", "1")
    assert r.returncode == 0, r.stderr
    failures = [json.loads(ln) for ln in (tmp_path / "s" / "failures.jsonl").read_text().splitlines()]
    assert [(f["key"], f["frame"]) for f in failures] == [("mixed", "c.png")]
    assert "one size" in failures[0]["error"]
    assert open_store(tmp_path / "s").get_sample(id="ok").shape[0] == 2
    r = run_inproc("export", str(tmp_path / "s"), "--format", "per-image", "--out", str(tmp_path / "pi"))
    assert r.returncode == 2 and "--context joint" in r.stderr


@pytest.mark.parametrize("recipe", ["fp32", "amp", "deepspeed-bf16", "bf16"])
def test_each_recipe_through_a_context_sample_build_equals_janusvlns_stream_under_it(tmp_path, golden_dir, recipe):
    """--context sample with every recipe: the records of the samples "frames 0..k" equal JanusVLN's stream run
    under that recipe (golden tiny_recipes), bit for bit (the frames' prefix shared, one stream per step)."""
    images = load_file(str(golden_dir / "tiny_stream" / "inputs.safetensors"))["images_u8"]
    root = tmp_path / "d"
    keys = []
    for s in range(images.shape[1]):
        keys.append(f"ep/frame{s}.png")
        (root / "ep").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[0, s].permute(1, 2, 0).numpy()).save(root / keys[-1])
    write_jsonl(root / "train.jsonl", [{"id": f"k{k}", "images": keys[:k + 1]} for k in range(len(keys))])
    args = joint_args(root, tmp_path / "s", "--precision", recipe, "--batch-size", "1")
    args[args.index("joint")] = "sample"
    r = run_inproc(*args)
    assert r.returncode == 0, r.stderr
    want = load_file(str(golden_dir / "tiny_recipes" / "stream_outputs.safetensors"))
    store = open_store(tmp_path / "s")
    for k in range(len(keys)):
        assert torch.equal(store.get_sample(id=f"k{k}")[0], want[f"stream.{recipe}.frames_0_to_{k}"]), (recipe, k)
