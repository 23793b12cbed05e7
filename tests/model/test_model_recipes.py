"""Precision recipes against the golden outputs of the reference code run under each recipe (tiny_recipes/),
bit for bit, for JanusVLN's stream and VG-LLM's joint call; and the recipes applied by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from featstore.errors import OptionError
from featstore.model import PRECISION_NAMES, get_precision, joint_features, load_vggt, resolve_precision
from featstore.model.layers.rope import RotaryEmbedding2D, rope_angles

RECIPES = ("fp32", "amp", "deepspeed-bf16", "bf16")


pytestmark = pytest.mark.usefixtures("one_thread")  # the golden files were made with 1 thread


@pytest.fixture(scope="module")
def golden(golden_dir):
    d = golden_dir / "tiny_recipes"
    return {
        "stream": load_file(str(d / "stream_outputs.safetensors")),
        "joint": load_file(str(d / "joint_outputs.safetensors")),
        "stream_in": load_file(str(golden_dir / "tiny_stream" / "inputs.safetensors"))["images_u8"].float() / 255,
        "joint_in": load_file(str(golden_dir / "tiny" / "b2s3.safetensors"))["images_u8"].float() / 255,
        "weights": golden_dir / "tiny" / "weights.safetensors",
    }


def prepared(recipe: str):
    return load_vggt("tiny", precision=recipe)


def stream_sample(model, recipe: str, frames: torch.Tensor) -> torch.Tensor:
    """JanusVLN's training stream of one sample: fresh cache, frames one by one; last frame's layer -2 patches."""
    p = get_precision(recipe)
    cache = None
    with torch.no_grad(), p.autocast("cpu"):
        for j in range(frames.shape[1]):
            out, cache = model.stream_step(p.cast_input(frames[:, j:j + 1]), cache, layers=(-2,))
    return out[0][0, 0, model.patch_start_idx:]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("recipe", RECIPES)
def test_stream_equals_janusvln_reference_bit_for_bit(golden, recipe):
    model = prepared(recipe)
    for k in range(4):
        got = stream_sample(model, recipe, golden["stream_in"][:, :k + 1])
        assert got.dtype == get_precision(recipe).weights_dtype
        assert torch.equal(got.float(), golden["stream"][f"stream.{recipe}.frames_0_to_{k}"]), (recipe, k)


@pytest.mark.parametrize("recipe", RECIPES)
def test_joint_equals_vgllm_reference_bit_for_bit(golden, recipe):
    model = prepared(recipe)
    for b in range(2):
        frames = golden["joint_in"][b]  # [S, 3, H, W]
        for ref in ("first", "last"):
            got = joint_features(model, frames, layers=(-2,), reference_frame=ref, precision=recipe)
            assert list(got) == [0] and got[0].shape == (3, 540, 128)
            want = golden["joint"][f"joint.{recipe}.ref_{ref}.sample_{b}"]
            assert torch.equal(got[0].float(), want), (recipe, ref, b)


def by_hand(model, recipe: str, images: torch.Tensor) -> torch.Tensor:
    """The recipe written out the way a training script does it, on a model loaded from the golden file."""
    if recipe in ("deepspeed-bf16", "bf16"):
        model = model.bfloat16()
    if recipe == "bf16":
        images = images.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe in ("amp", "deepspeed-bf16")):
        return model(images, layers=(-2,))[0]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_equals_the_recipe_applied_by_hand(golden, recipe):
    images = golden["joint_in"]  # [2, 3, 3, H, W]: both samples in one call
    hand = by_hand(load_vggt(golden["weights"]), recipe, images)
    p = get_precision(recipe)
    model = p.prepare(load_vggt(golden["weights"]))
    with torch.no_grad(), p.autocast("cpu"):
        got = model(p.cast_input(images), layers=(-2,))[0]
    assert got.dtype == hand.dtype and torch.equal(got, hand)
    batched = joint_features(model, images, layers=-2, precision=p)[0]
    assert torch.equal(batched, got[:, :, 5:])


def test_every_pair_of_recipes_differs(golden):
    """deepspeed-bf16 vs amp (and every other pair) differs by far more than noise: recipes cannot coincide."""
    frames = golden["joint_in"][0]
    out = {r: joint_features(prepared(r), frames, precision=r)[0].float() for r in RECIPES}
    assert rel_l2(out["deepspeed-bf16"], out["amp"]) > 1e-3
    for i, a in enumerate(RECIPES):
        for b in RECIPES[i + 1:]:
            assert rel_l2(out[a], out[b]) > 1e-3, (a, b)


def test_prepare_casts_parameters_and_buffers():
    ds = prepared("deepspeed-bf16")
    assert all(p.dtype == torch.bfloat16 for p in ds.parameters())
    assert ds._resnet_mean.dtype == torch.bfloat16 and ds._resnet_std.dtype == torch.bfloat16
    assert ds._resnet_mean.flatten()[0].item() == 0.484375  # 0.485 rounded to bf16 (spacing 2^-9 there)
    amp = prepared("amp")
    assert all(p.dtype == torch.float32 for p in amp.parameters()) and amp._resnet_mean.dtype == torch.float32
    with pytest.raises(OptionError, match=r"precision 'fp32' needs float32 weights.*dtype=torch.float32"):
        get_precision("fp32").prepare(load_vggt("tiny", dtype=torch.bfloat16))
    assert get_precision("bf16").prepare(load_vggt("tiny", dtype=torch.bfloat16))._resnet_std.dtype == torch.bfloat16
    by_hand = get_precision("deepspeed-bf16").prepare(load_vggt("tiny", dtype=torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(by_hand.state_dict().values(), ds.state_dict().values()))
    assert ds.fingerprint == amp.fingerprint  # the weights as read, before any cast
    with pytest.raises(ValueError, match="dtype or precision, not both"):
        load_vggt("tiny", dtype=torch.float32, precision="amp")
    with pytest.raises(OptionError, match="'fp4' is not a precision recipe"):
        load_vggt("tiny", precision="fp4")


def test_recipe_attributes_and_autocast_context():
    assert PRECISION_NAMES == ("fp32", "bf16", "amp", "deepspeed-bf16", "fp8")  # fp8: opt-in, not training-exact
    assert get_precision("bf16").cast_input(torch.rand(2, 3)).dtype == torch.bfloat16
    assert get_precision("deepspeed-bf16").cast_input(torch.rand(2, 3)).dtype == torch.float32
    with get_precision("deepspeed-bf16").autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with get_precision("bf16").autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
    assert get_precision("deepspeed-bf16").compute_name("cpu") == "bfloat16-weights+autocast-bfloat16"
    assert get_precision("fp32").compute_name("cpu") == "float32-weights"
    with pytest.raises(ValueError, match="divide uint8 by 255"):
        get_precision("bf16").cast_input(torch.zeros(2, dtype=torch.uint8))


def test_unknown_recipe_and_legacy_autocast_flag():
    with pytest.raises(OptionError, match=r"--precision 'fp16' is not a precision recipe: expected one of "
                                          r"fp32, bf16, amp, deepspeed-bf16"):
        get_precision("fp16", shown="--precision")
    assert resolve_precision(None, autocast=True).name == "amp"
    assert resolve_precision(None, autocast=None).name == "fp32"
    assert resolve_precision(None, autocast=False).name == "fp32"
    assert resolve_precision("deepspeed-bf16", autocast=True).name == "deepspeed-bf16"
    assert resolve_precision("amp", autocast=None).name == "amp"
    with pytest.raises(OptionError, match=r"--autocast contradicts --precision bf16.*old spelling of --precision amp"):
        resolve_precision("bf16", autocast=True)
    with pytest.raises(OptionError, match=r"--no-autocast contradicts --precision amp"):
        resolve_precision("amp", autocast=False)


def test_rope_tables_take_cos_sin_in_the_rotated_tensors_dtype():
    rope = RotaryEmbedding2D(16, 100.0, 5)
    tables = rope.tables(20, 27, torch.device("cpu"))
    angles = rope_angles(20, 27, 16, 100.0, 5)
    cos32, _ = tables.for_dtype(torch.float32)
    cos16, sin16 = tables.for_dtype(torch.bfloat16)
    assert torch.equal(cos32, angles.cos()) and cos16.dtype == torch.bfloat16
    assert torch.equal(cos16, angles.bfloat16().cos()) and torch.equal(sin16, angles.bfloat16().sin())
    assert not torch.equal(cos16, angles.cos().bfloat16())  # the angle is rounded before its cosine is taken
    assert rope.tables(20, 27, torch.device("cpu")) is tables and tables.for_dtype(torch.bfloat16)[0] is cos16


def test_joint_features_shapes_reference_last_and_errors(golden, tiny_model):
    frames = golden["joint_in"][1]
    with torch.no_grad():
        plain = tiny_model(frames[None], layers=(0, 1))
        flipped = tiny_model(frames.flip(0)[None], layers=(1,))
    got = joint_features(tiny_model, frames, layers=(0, -1), tokens="all")
    assert sorted(got) == [0, 1] and got[1].shape == (3, 545, 128)
    assert all(torch.equal(got[i], plain[i][0]) for i in (0, 1))
    last = joint_features(tiny_model, frames[None], layers=(1,), reference_frame="last")
    assert last[1].shape == (1, 3, 540, 128)
    assert torch.equal(last[1][0], flipped[1][0, :, 5:].flip(0))  # index i is still input frame i
    assert (last[1][0] - plain[1][0, :, 5:]).abs().max().item() > 1e-5  # frame 2 took the first-frame token
    with pytest.raises(ValueError, match="reference_frame 'middle'"):
        joint_features(tiny_model, frames, reference_frame="middle")
    with pytest.raises(ValueError, match="tokens 'cls'"):
        joint_features(tiny_model, frames, tokens="cls")
    with pytest.raises(ValueError, match=r"\[S, 3, H, W\] or \[B, S, 3, H, W\]"):
        joint_features(tiny_model, frames[0, 0])
    with pytest.raises(ValueError, match=r"'deepspeed-bf16' needs torch.bfloat16 weights.*prepare\(model\)"):
        joint_features(tiny_model, frames, precision="deepspeed-bf16")
