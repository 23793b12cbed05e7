"""featstore.model.preprocess against the official VGGT preprocessing (shared/golden/preprocess) and hostile inputs."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from featstore.errors import ImageError
from featstore.model.preprocess import (DEFAULT_MAX_PIXELS, MIN_SIDE, MODES, preprocess_image, preprocess_image_u8,
                                  preprocessed_size, to_unit_float,
                                  resize_size, stack_batch)

# The batch order of golden/preprocess (README section 7).
GOLDEN_NAMES = ["rgb_640x480_q95", "rgb_480x640_q95", "rgb_1000x300", "rgb_518x518", "rgba_300x700",
                "gray_320x240", "palette_256x256"]


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> dict:
    """Expected tensors plus the info.json image table, keyed by name."""
    root = golden_dir / "preprocess"
    info = json.loads((root / "info.json").read_text())
    return {"root": root, "expected": load_file(str(root / "expected.safetensors")),
            "images": {im["name"]: im for im in info["images"]}}


def _path(golden: dict, name: str) -> Path:
    return golden["root"] / golden["images"][name]["file"]


def _as_u8(t: torch.Tensor) -> torch.Tensor:
    return (t * 255).round().to(torch.uint8)


def test_modes_listed():
    assert MODES == ("crop", "pad", "janusvln")


@pytest.mark.parametrize("name", [n for n in GOLDEN_NAMES if n.endswith("_q95")])
def test_jpeg_decode_equals_golden_decode(golden, name):
    # If this failed, the local libjpeg decodes differently from the one that made the golden data, and
    # the JPEG rows of test_golden_exact would differ for that reason, not because of preprocessing.
    with Image.open(_path(golden, name)) as img:
        decoded = np.asarray(img.convert("RGB"))
    assert np.array_equal(decoded, golden["expected"][f"decoded/{name}"].numpy())


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_golden_exact(golden, name, mode):
    t = preprocess_image(_path(golden, name), mode)
    expected = golden["expected"][f"{mode}/{name}"][0]
    assert t.dtype == torch.float32 and t.shape == expected.shape
    assert torch.equal(_as_u8(t), expected)
    # Bit-exact floats: the official tensor is uint8 / 255 in float32.
    assert torch.equal(t, expected.to(torch.float32) / 255)
    info = golden["images"][name]
    assert preprocessed_size(info["width"], info["height"], mode) == tuple(t.shape[1:])


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_pil_input_equals_path_input(golden, name):
    with Image.open(_path(golden, name)) as img:
        from_pil = preprocess_image(img, "crop")
    assert torch.equal(from_pil, preprocess_image(_path(golden, name), "crop"))


def test_crop_batch_semantics(golden):
    crops = [preprocess_image(_path(golden, n), "crop") for n in GOLDEN_NAMES]
    assert len({tuple(c.shape) for c in crops}) == 3  # the batch really mixes shapes
    batch = stack_batch(crops)
    assert torch.equal(_as_u8(batch), golden["expected"]["crop_batch"])
    assert torch.equal(batch, golden["expected"]["crop_batch"].to(torch.float32) / 255)


def test_pad_batch_is_concat_of_individual(golden):
    pads = [preprocess_image(_path(golden, n), "pad") for n in GOLDEN_NAMES]
    expected = torch.cat([golden["expected"][f"pad/{n}"] for n in GOLDEN_NAMES])
    assert torch.equal(_as_u8(stack_batch(pads)), expected)


@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_janusvln_is_bilinear_resize_of_pad(golden, name):
    t = preprocess_image(_path(golden, name), "janusvln")
    assert t.shape == (3, 504, 504) and t.dtype == torch.float32
    assert t.shape[1] % 28 == 0 and t.shape[2] % 28 == 0
    pad = golden["expected"][f"pad/{name}"].to(torch.float32) / 255
    direct = F.interpolate(pad, size=(504, 504), mode="bilinear", align_corners=False, antialias=False)[0]
    assert torch.equal(t, direct)
    assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
    info = golden["images"][name]
    assert preprocessed_size(info["width"], info["height"], "janusvln") == (504, 504)


@pytest.mark.parametrize("size,mode,expected", [
    ((640, 480), "crop", (392, 518)), ((480, 640), "crop", (518, 518)), ((1000, 300), "crop", (154, 518)),
    ((300, 700), "crop", (518, 518)), ((640, 480), "pad", (518, 518)), ((300, 700), "janusvln", (504, 504)),
    ((5000, 10), "crop", (MIN_SIDE, 518)), ((5000, 10), "pad", (518, 518)), ((10, 5000), "pad", (518, 518)),
])
def test_preprocessed_size_table(size, mode, expected):
    assert preprocessed_size(*size, mode) == expected


def test_unknown_mode_is_rejected(golden):
    with pytest.raises(ValueError, match="unknown preprocess mode 'resize'"):
        preprocess_image(_path(golden, "rgb_518x518"), "resize")


# ---------------------------------------------------------------- special colour modes (real files)

def _constant_518(tmp_path: Path, img: Image.Image, name: str) -> Path:
    path = tmp_path / name
    img.save(path)
    return path


def test_rgba_transparent_becomes_white(tmp_path):
    path = _constant_518(tmp_path, Image.new("RGBA", (518, 518), (10, 20, 30, 0)), "t.png")
    assert torch.equal(preprocess_image(path, "crop"), torch.ones(3, 518, 518))


def test_la_is_not_blended_like_official(tmp_path):
    path = _constant_518(tmp_path, Image.new("LA", (518, 518), (10, 0)), "la.png")
    with Image.open(path) as img:
        assert img.mode == "LA"
    assert torch.equal(_as_u8(preprocess_image(path, "pad")), torch.full((3, 518, 518), 10, dtype=torch.uint8))


def test_palette_with_transparency_is_not_blended_like_official(tmp_path):
    img = Image.new("P", (518, 518), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    path = tmp_path / "pt.png"
    img.save(path, transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and "transparency" in check.info
    u8 = _as_u8(preprocess_image(path, "crop"))
    assert u8[:, 0, 0].tolist() == [10, 20, 30] and bool((u8 == u8[:, :1, :1]).all())


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (320, 240), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    with Image.open(path) as img:
        assert img.mode == "CMYK"
    t = preprocess_image(path, "crop")
    assert t.shape == (3, 392, 518)
    mean = t.mean(dim=(1, 2))
    assert mean[0] > 0.95 and mean[1] < 0.05 and mean[2] < 0.05


def test_sixteen_bit_png_scaled_to_eight_bits(tmp_path):
    values = (np.arange(518 * 518, dtype=np.int64) * 65535 // (518 * 518 - 1)).reshape(518, 518)
    path = tmp_path / "depth16.png"
    Image.fromarray(values.astype(np.uint16)).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")
    u8 = _as_u8(preprocess_image(path, "crop"))  # 518x518 crop: no resize, so the mapping is visible
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)
    assert np.array_equal(u8[0].numpy(), expected)
    assert torch.equal(u8[0], u8[1]) and torch.equal(u8[0], u8[2])
    assert u8.max() == 255 and u8.min() == 0


def test_int32_image_is_clipped_then_scaled():
    pattern = np.array([-5, 0, 257, 65535, 70000, 128 * 257, 128 * 257 + 129], dtype=np.int32)
    values = np.resize(pattern, (518, 518)).astype(np.int32)
    t = preprocess_image(Image.fromarray(values, mode="I"), "crop")  # 518x518: no resize
    expected = np.resize(np.array([0, 0, 1, 255, 255, 128, 129], dtype=np.uint8), (518, 518))
    assert np.array_equal(_as_u8(t)[1].numpy(), expected)


def _exif_jpeg(tmp_path: Path, orientation: int) -> Path:
    rng = np.random.RandomState(0)
    img = Image.fromarray(rng.randint(0, 256, (200, 300, 3), dtype=np.uint8))  # 300 wide, 200 high
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"exif{orientation}.jpg"
    img.save(path, exif=exif, quality=90)
    return path


def test_exif_ignored_by_default_and_applied_on_request(tmp_path):
    path = _exif_jpeg(tmp_path, 6)
    default = preprocess_image(path, "crop")
    assert default.shape == (3, 350, 518)  # the stored 300x200, as the official code sees it
    with Image.open(path) as img:
        assert torch.equal(default, preprocess_image(img.convert("RGB"), "crop"))
        rotated = img.transpose(Image.Transpose.ROTATE_270)
    applied = preprocess_image(path, "crop", apply_exif=True)
    assert applied.shape == (3, 518, 518)  # 200x300 after rotation: 784 rows, centre 518 kept
    assert torch.equal(applied, preprocess_image(rotated, "crop"))


# ---------------------------------------------------------------- degenerate and hostile inputs

def test_5000x10_gets_the_documented_minimum_height(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (5000, 10), (200, 100, 50)).save(path)
    crop = preprocess_image(path, "crop")
    assert crop.shape == (3, MIN_SIDE, 518) and torch.isfinite(crop).all()
    assert _as_u8(crop)[:, 7, 259].tolist() == [200, 100, 50]
    pad = preprocess_image(path, "pad")
    assert pad.shape == (3, 518, 518)
    top = (518 - MIN_SIDE) // 2
    assert torch.equal(pad[:, :top], torch.ones(3, top, 518))
    assert _as_u8(pad)[:, top + 7, 259].tolist() == [200, 100, 50]
    assert preprocess_image(path, "janusvln").shape == (3, 504, 504)


def test_tall_strip_pad_works_and_crop_respects_pixel_limit(tmp_path):
    path = tmp_path / "tall.png"
    Image.new("RGB", (10, 5000), (1, 2, 3)).save(path)
    assert preprocess_image(path, "pad").shape == (3, 518, 518)
    with pytest.raises(ImageError, match="aspect ratio is too extreme"):
        preprocess_image(path, "crop", max_pixels=10_000_000)


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.bmp"
    Image.new("RGB", (1, 1), (7, 8, 9)).save(path)
    t = preprocess_image(path, "crop")
    assert t.shape == (3, 518, 518)
    assert _as_u8(t)[:, 100, 100].tolist() == [7, 8, 9]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height but holds almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_bomb_refused_from_header_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, 20_000, 5_000)  # 100M pixels: under Pillow's own limit, over ours
    with pytest.raises(ImageError, match=r"20000x5000 = 100,000,000 pixels, above the limit of 50,000,000") as e:
        preprocess_image(path, "crop", max_pixels=50_000_000)
    assert str(path) in str(e.value)


def test_huge_header_refused_with_default_limit(tmp_path):
    path = tmp_path / "huge.png"
    _png_header_only(path, 100_000, 100_000)
    assert DEFAULT_MAX_PIXELS < 100_000 * 100_000
    with pytest.raises(ImageError, match="decompression-bomb") as e:
        preprocess_image(path, "pad")
    assert str(path) in str(e.value)


def test_pil_image_over_limit_refused():
    with pytest.raises(ImageError, match="above the limit"):
        preprocess_image(Image.new("RGB", (100, 100)), "crop", max_pixels=9_999)


def _good_jpeg(path: Path) -> bytes:
    rng = np.random.RandomState(1)
    Image.fromarray(rng.randint(0, 256, (240, 320, 3), dtype=np.uint8)).save(path, quality=90)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["truncated", "zero_byte", "not_an_image", "directory", "missing",
                                  "garbage_after_magic"])
def test_undecodable_inputs_raise_image_error_naming_the_path(tmp_path, case):
    path = tmp_path / f"bad {case}.jpg"
    if case == "truncated":
        data = _good_jpeg(tmp_path / "good.jpg")
        path.write_bytes(data[: len(data) // 2])
    elif case == "zero_byte":
        path.write_bytes(b"")
    elif case == "not_an_image":
        path.write_text("this is a text file, not a JPEG\n")
    elif case == "directory":
        path.mkdir()
    elif case == "garbage_after_magic":
        path.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    with pytest.raises(ImageError) as e:
        preprocess_image(path, "crop")
    assert str(path) in str(e.value)
    reason = {"truncated": "cannot decode", "zero_byte": "cannot decode", "not_an_image": "cannot decode",
              "directory": "directory", "missing": "not found", "garbage_after_magic": "cannot decode"}[case]
    assert reason in str(e.value)


def test_shipped_sample_frames_preprocess(tmp_path):
    from helpers import copy_images

    sample = copy_images(tmp_path / "sample")
    frames = sorted(p for p in sample.rglob("*") if p.is_file())
    assert len(frames) == 12
    for path in frames:
        for mode in MODES:
            t = preprocess_image(path, mode)
            with Image.open(path) as img:
                assert tuple(t.shape[1:]) == preprocessed_size(*img.size, mode)
            assert t.dtype == torch.float32 and 0.0 <= float(t.min()) and float(t.max()) <= 1.0


def test_sixteen_bit_rgb_png_uses_pillows_high_byte(tmp_path):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    values = np.zeros((518, 518, 3), dtype=">u2")
    values[..., 0], values[..., 1], values[..., 2] = 0x1280, 0xFFFF, 0x00FF
    raw = b"".join(b"\0" + row.tobytes() for row in values)
    path = tmp_path / "rgb48.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 518, 518, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    u8 = _as_u8(preprocess_image(path, "crop"))
    assert u8[:, 5, 5].tolist() == [0x12, 0xFF, 0x00] and bool((u8 == u8[:, :1, :1]).all())


# ---------------------------------------------------------------- 644 pixels (JanusVLN's load_fn, golden/preprocess644)

@pytest.fixture(scope="module")
def golden644(golden_dir: Path) -> dict:
    """JanusVLN's 644-pixel outputs: 4 stored tensors, shape + u8 sha256 for all 16 image/mode pairs."""
    root = golden_dir / "preprocess644"
    info = json.loads((root / "info.json").read_text())
    return {"root": root, "expected": load_file(str(root / "expected.safetensors")), "info": info,
            "images": {im["name"]: root / im["file"] for im in info["images"]}}


def _sha256_u8(t: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(_as_u8(t)[None].contiguous().numpy().tobytes()).hexdigest()


def test_644_pairs_cover_every_image(golden644):
    assert len(golden644["info"]["tensors"]) == 16 and len(golden644["images"]) == 8
    assert {k for k, v in golden644["info"]["tensors"].items() if v["stored"]} == set(golden644["expected"])


@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("name", GOLDEN_NAMES + ["frame_640x480"])
def test_644_golden_shape_and_sha256(golden644, name, mode):
    entry = golden644["info"]["tensors"][f"{mode}/{name}"]
    t = preprocess_image(golden644["images"][name], mode, image_size=644)
    assert [1, *t.shape] == entry["shape"] and t.dtype == torch.float32
    assert torch.equal(t, _as_u8(t).to(torch.float32) / 255)  # exactly k/255, so the u8 hash is the whole tensor
    assert _sha256_u8(t) == entry["u8_sha256"]
    with Image.open(golden644["images"][name]) as img:
        assert preprocessed_size(*img.size, mode, image_size=644) == tuple(t.shape[1:])
    if entry["stored"]:
        assert torch.equal(t, golden644["expected"][f"{mode}/{name}"][0].to(torch.float32) / 255)


def test_644_frame_640x480_crop_is_490x644_and_pad_has_77_white_rows(golden644):
    path = golden644["images"]["frame_640x480"]
    crop = preprocess_image(path, "crop", image_size=644)
    pad = preprocess_image(path, "pad", image_size=644)
    assert crop.shape == (3, 490, 644) and pad.shape == (3, 644, 644)
    assert torch.equal(pad[:, :77], torch.ones(3, 77, 644)) and torch.equal(pad[:, -77:], torch.ones(3, 77, 644))
    assert torch.equal(pad[:, 77:-77], crop)


@pytest.mark.parametrize("size,mode,expected", [
    ((640, 480), "crop", (644, 490)), ((320, 240), "crop", (644, 490)), ((480, 640), "pad", (490, 644)),
    ((480, 640), "crop", (644, 854)), ((1000, 300), "crop", (644, 196)), ((300, 700), "pad", (280, 644)),
])
def test_644_float64_tie_rounds_up_like_the_official_formula(size, mode, expected):
    # 480 * (644 / 640) / 14 is 34.50000000000001 in float64: 35, not the exact tie's 34 (476 rows).
    assert resize_size(*size, mode, image_size=644) == expected


@pytest.mark.parametrize("size,mode,image_size,expected", [
    ((640, 480), "crop", 644, (490, 644)), ((640, 480), "pad", 644, (644, 644)),
    ((640, 480), "janusvln", 644, (644, 644)), ((640, 480), "crop", 518, (392, 518)),
    ((640, 480), "janusvln", 518, (504, 504)), ((640, 480), "crop", 280, (210, 280)),
    ((640, 480), "janusvln", 280, (280, 280)), ((5000, 10), "crop", 644, (MIN_SIDE, 644)),
])
def test_preprocessed_size_for_other_image_sizes(size, mode, image_size, expected):
    assert preprocessed_size(*size, mode, image_size=image_size) == expected


def test_janusvln_mode_at_644_equals_pad(golden644):
    path = golden644["images"]["rgba_300x700"]
    assert torch.equal(preprocess_image(path, "janusvln", image_size=644),
                       golden644["expected"]["pad/rgba_300x700"][0].to(torch.float32) / 255)


@pytest.mark.parametrize("bad", [0, -14, 500, 644.0, True, "644"])
def test_image_size_must_be_a_positive_multiple_of_14(golden, bad):
    with pytest.raises(ValueError, match="not a positive multiple of 14"):
        preprocess_image(_path(golden, "rgb_518x518"), "crop", image_size=bad)
    with pytest.raises(ValueError, match="not a positive multiple of 14"):
        preprocessed_size(640, 480, "pad", image_size=bad)


# ---------------------------------------------------------------- uint8 form (what build workers send)

@pytest.mark.parametrize("size", [518, 644])
@pytest.mark.parametrize("mode", ["crop", "pad"])
@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_uint8_form_is_the_official_tensor_before_division(golden, name, mode, size):
    u8 = preprocess_image_u8(_path(golden, name), mode, image_size=size)
    assert u8.dtype == torch.uint8 and u8.is_contiguous()
    assert torch.equal(to_unit_float(u8), preprocess_image(_path(golden, name), mode, image_size=size))
    if size == 518:
        assert torch.equal(u8, golden["expected"][f"{mode}/{name}"][0])


def test_uint8_form_refuses_janusvln(golden):
    with pytest.raises(ValueError, match="no uint8 form"):
        preprocess_image_u8(_path(golden, "rgb_518x518"), "janusvln")
