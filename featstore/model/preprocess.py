"""Image preprocessing that reproduces VGGT's official `load_and_preprocess_images`, one image at a time.

Every mode takes a target size ``image_size`` = N (a multiple of 14; default 518, the official model).
JanusVLN's copy of the function uses N = 644 (`MIV-XJTU/JanusVLN`, mode ``crop``; `NewJanusVLN`, mode ``pad``).

Modes (`MODES`):

* ``crop``: width becomes N, height ``round(h * (N / w) / 14) * 14``; if taller than N, the centre N rows are kept.
* ``pad``: the longer side becomes N, the other ``round(short * (N / long) / 14) * 14``; then padded with 1.0
  (white) to NxN, centred with ``top = dh//2``, ``left = dw//2``.
* ``janusvln``: ``pad``, then a torch bilinear resize (``align_corners=False``, no antialias) so each side
  is the largest multiple of 28 not above it (518 -> 504; 644 stays 644). This is *not* what JanusVLN feeds
  VGGT: JanusVLN feeds 644-pixel ``crop`` images (MIV-XJTU/JanusVLN; 640x480 -> 490x644) or ``pad`` images
  (NewJanusVLN; 644x644), i.e. ``crop``/``pad`` with ``image_size=644``. The mode is kept for stores built with it.

The size rule is the official float formula, evaluated in float64 in exactly this order with Python's
``round`` (half to even): at N = 644 a 640x480 frame gives ``round(480 * (644 / 640) / 14)`` =
``round(34.50000000000001)`` = 35, i.e. 490 rows, where exact arithmetic would tie at 34.5 and give 476.

``crop`` and ``pad`` are bit-identical to the official code (Pillow 13 BICUBIC resize of the uint8 image,
then ``/255`` in float32), including its colour handling: only mode "RGBA" is composited onto white;
"LA" and "P" with a transparency entry are converted without blending, exactly like the official code.

Where the official code has no sensible answer, featstore documents its own rule:

* 16-bit greyscale ("I;16*", "I"): Pillow's ``convert("RGB")`` clips such images at 255 (almost all
  white). featstore maps 0..65535 linearly to 0..255 (``round(v/257)``, values clipped to 0..65535 first).
  16-bit RGB(A) PNGs are already opened by Pillow as 8-bit "RGB"/"RGBA" (high byte) and are left as they are.
* Degenerate aspect ratios: where the official size rule gives 0 for the short side (e.g. 5000x10), the
  side is clamped to ``MIN_SIDE`` (14, one patch) instead of producing an empty tensor.
* EXIF orientation is ignored by default (as the official code does, so cached features equal the online
  path); ``apply_exif=True`` rotates the image first.
* Images whose header announces more than ``max_pixels`` pixels are refused before any pixel is decoded.
  This is the one guard: Pillow's own fixed limit is lifted while the header is read (`open_image`).

Every failure to read or preprocess an image raises `featstore.errors.ImageError` naming the image.
"""

from __future__ import annotations

import os
import warnings
from typing import BinaryIO, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from featstore.constants import DEFAULT_IMAGE_SIZE, JANUSVLN_IMAGE_SIZE, PATCH_SIZE, is_patch_multiple
from featstore.errors import ImageError

TARGET_SIZE = DEFAULT_IMAGE_SIZE  # the official model's size; the default `image_size`
JANUSVLN_MULTIPLE = 28
UINT8_MODES = ("crop", "pad")  # modes whose result is exactly uint8 / 255 (see preprocess_image_u8)
MIN_SIDE = PATCH_SIZE
MODES = ("crop", "pad", "janusvln")
# Pillow raises DecompressionBombError above twice its MAX_IMAGE_PIXELS (89,478,485): same default here.
DEFAULT_MAX_PIXELS = 178_956_970

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

ImageSource = Union[str, "os.PathLike[str]", Image.Image]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown preprocess mode {mode!r}: expected one of {', '.join(MODES)}")


def check_image_size(image_size: int) -> int:
    """Return `image_size` if it is a positive multiple of the patch size (14), else raise ValueError."""
    if not is_patch_multiple(image_size):
        raise ValueError(f"image size {image_size!r} is not a positive multiple of {PATCH_SIZE}: "
                         f"use e.g. {TARGET_SIZE} (official VGGT) or {JANUSVLN_IMAGE_SIZE} (JanusVLN)")
    return image_size


def _scaled_side(side: int, long_side: int, image_size: int) -> int:
    """Official rule for the side that is not set to N: ``round(side * (N / long_side) / 14) * 14`` in float64,
    in this order, Python round (half to even); clamped to at least MIN_SIDE (featstore's rule)."""
    return max(MIN_SIDE, round(side * (image_size / long_side) / PATCH_SIZE) * PATCH_SIZE)


def resize_size(width: int, height: int, mode: str, image_size: int = TARGET_SIZE) -> tuple[int, int]:
    """The (width, height) the image is resized to with Pillow before cropping or padding."""
    _check_mode(mode)
    check_image_size(image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if mode == "crop" or width >= height:
        return image_size, _scaled_side(height, width, image_size)
    return _scaled_side(width, height, image_size), image_size


def preprocessed_size(width: int, height: int, mode: str, image_size: int = TARGET_SIZE) -> tuple[int, int]:
    """The (H, W) of the tensor `preprocess_image` returns for an image of `width` x `height` pixels."""
    new_w, new_h = resize_size(width, height, mode, image_size)
    if mode == "crop":
        return min(new_h, image_size), new_w
    if mode == "pad":
        return max(new_h, image_size), max(new_w, image_size)
    side = (image_size // JANUSVLN_MULTIPLE) * JANUSVLN_MULTIPLE
    return side, side


def _describe(source: ImageSource) -> str:
    if isinstance(source, Image.Image):
        return f"<in-memory PIL image {source.mode} {source.size[0]}x{source.size[1]}>"
    return os.fspath(source)


def open_image(fp: "str | os.PathLike[str] | BinaryIO") -> Image.Image:
    """``Image.open`` (lazy: reads the header only) with Pillow's own bomb limit lifted.

    featstore's ``max_pixels`` check, applied to the header size before any pixel is decoded, is the one
    configurable guard; Pillow's fixed limit would otherwise refuse first with a message naming its limit.
    """
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(fp)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image has no pixels ({width}x{height}); expected a non-empty image")
    if width * height > max_pixels:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, above the limit of "
            f"{max_pixels:,} (decompression-bomb guard); raise max_pixels if this image is genuine")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """Map a 16-bit (or 32-bit integer) greyscale image to 8 bits: clip to 0..65535, then round(v/257)."""
    values = np.asarray(img, dtype=np.int64)
    scaled = (np.clip(values, 0, 65535) * 2 + 257) // 514  # round(v/257), halves up
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image, apply_exif: bool) -> Image.Image:
    """Official colour handling (RGBA composited on white, everything else `convert("RGB")`), plus the
    optional EXIF rotation and featstore's 16-bit rule."""
    if apply_exif:
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    elif img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    return img.convert("RGB")


def _load_rgb(source: ImageSource, apply_exif: bool, max_pixels: int) -> Image.Image:
    """Open, size-check (from the header, before decoding) and decode an image to RGB."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, name)
        try:
            return _to_rgb(source, apply_exif)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image, never a crash
            raise ImageError(f"{name}: cannot convert image to RGB ({type(exc).__name__}: {exc})") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image(source) as img:
                _check_pixels(img.size, max_pixels, name)
                img.load()
                return _to_rgb(img, apply_exif)
    except ImageError:
        raise
    except FileNotFoundError as exc:
        raise ImageError(f"{name}: image file not found; check the path or the data root") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"{name}: is a directory, expected an image file") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused by Pillow's decompression-bomb guard ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - truncated, zero-byte, not an image, unsupported codec, ...
        raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {exc}); "
                         "the file is damaged or not an image: replace or remove it") from exc


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 HWC RGB -> float32 CHW in [0,1], dividing by 255 exactly as torchvision's ToTensor does."""
    writable = np.array(array, dtype=np.uint8, order="C", copy=True)
    return torch.from_numpy(writable).permute(2, 0, 1).to(torch.float32).div(255).contiguous()


def _pad_centered(t: torch.Tensor, height: int, width: int, fill: float = 1.0) -> torch.Tensor:
    """Pad a [C,H,W] tensor with `fill` (1.0: white) to (height, width), top = dh//2 and left = dw//2 (official)."""
    dh, dw = height - t.shape[-2], width - t.shape[-1]
    if dh <= 0 and dw <= 0:
        return t
    dh, dw = max(dh, 0), max(dw, 0)
    return F.pad(t, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="constant", value=fill)


def janusvln_resize(t: torch.Tensor) -> torch.Tensor:
    """Bilinear resize (align_corners=False, no antialias) of a [C,H,W] tensor so each side is the largest
    multiple of 28 not above it."""
    h, w = t.shape[-2:]
    size = ((h // JANUSVLN_MULTIPLE) * JANUSVLN_MULTIPLE, (w // JANUSVLN_MULTIPLE) * JANUSVLN_MULTIPLE)
    if size == (h, w):
        return t
    return F.interpolate(t[None], size=size, mode="bilinear", align_corners=False, antialias=False)[0]


def _resized_pixels(source: ImageSource, mode: str, apply_exif: bool, max_pixels: int,
                    image_size: int) -> np.ndarray:
    """The image decoded, converted to RGB and resized with Pillow as the official code does: uint8 HWC."""
    _check_mode(mode)
    check_image_size(image_size)
    img = _load_rgb(source, apply_exif, max_pixels)
    new_w, new_h = resize_size(img.size[0], img.size[1], mode, image_size)
    if new_w * new_h > max_pixels:
        raise ImageError(f"{_describe(source)}: resizing {img.size[0]}x{img.size[1]} for mode {mode!r} "
                         f"needs {new_w}x{new_h} pixels, above the limit of {max_pixels:,}; "
                         "the aspect ratio is too extreme: use mode 'pad' or crop the image")
    return np.asarray(img.resize((new_w, new_h), Image.Resampling.BICUBIC), dtype=np.uint8)


def preprocess_image(source: ImageSource, mode: str = "crop", *, apply_exif: bool = False,
                     max_pixels: int = DEFAULT_MAX_PIXELS, image_size: int = TARGET_SIZE) -> torch.Tensor:
    """Load one image (path or PIL image) and return float32 [3,H,W] in [0,1], equal to VGGT's official
    `load_and_preprocess_images([path], mode)[0]` with target size `image_size` for `crop`/`pad` (644 is
    JanusVLN's copy); see the module docstring for `janusvln`."""
    if mode in UINT8_MODES:
        return to_unit_float(preprocess_image_u8(source, mode, apply_exif=apply_exif, max_pixels=max_pixels,
                                                 image_size=image_size))
    pixels = _resized_pixels(source, mode, apply_exif, max_pixels, image_size)
    return janusvln_resize(_pad_centered(_to_tensor(pixels), image_size, image_size))


def preprocess_image_u8(source: ImageSource, mode: str = "crop", *, apply_exif: bool = False,
                        max_pixels: int = DEFAULT_MAX_PIXELS, image_size: int = TARGET_SIZE) -> torch.Tensor:
    """`preprocess_image` for `crop`/`pad` before the division by 255: uint8 [3,H,W] (pad value 255).

    ``to_unit_float(preprocess_image_u8(...))`` equals ``preprocess_image(...)`` bit for bit, so a build can move
    a quarter of the bytes from its decode workers and divide on the device.
    """
    if mode not in UINT8_MODES:
        raise ValueError(f"mode {mode!r} has no uint8 form (it resizes in float): use one of {', '.join(UINT8_MODES)}")
    pixels = _resized_pixels(source, mode, apply_exif, max_pixels, image_size)
    if mode == "crop":
        # Same rows as the official crop of the float tensor; cropping the uint8 array first saves memory.
        top = max(pixels.shape[0] - image_size, 0) // 2
        pixels = pixels[top:top + image_size]
    t = torch.from_numpy(np.array(pixels, dtype=np.uint8, order="C", copy=True)).permute(2, 0, 1).contiguous()
    return t if mode == "crop" else _pad_centered(t, image_size, image_size, fill=255)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0,1] (x / 255 in float32, as torchvision's ToTensor); float input unchanged."""
    return images.to(torch.float32).div_(255) if images.dtype == torch.uint8 else images


def stack_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack [3,H,W] tensors as the official batch call does: when shapes differ, pad each (centred, 1.0)
    to the largest H and W first. (The official code also prints a warning; featstore does not.)"""
    if not images:
        raise ValueError("stack_batch needs at least one image")
    height = max(t.shape[-2] for t in images)
    width = max(t.shape[-1] for t in images)
    return torch.stack([_pad_centered(t, height, width) for t in images])
