"""``--frame-transform MODULE:FUNCTION``: the trainer's own image hook. The function receives a sample's frames
as PIL images with its annotation record and returns the images VGGT should see (VG-LLM draws SPAR markers
this way); the store records its name and the sha256 of its source file."""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from featstore.errors import OptionError

FrameTransform = Callable[[list[Any], dict[str, Any]], list[Any]]
#: Annotation fields whose records a trainer draws on before VGGT sees the frames (VG-LLM's SPAR samples).
NEEDS_TRANSFORM = ("spar_info",)


@dataclass(frozen=True)
class LoadedTransform:
    """A frame transform: its name as given, the function, and the sha256 of the file that defines it."""

    name: str
    function: FrameTransform
    sha256: str

    def identity(self) -> dict[str, Any]:
        """What the manifest records (``frame_transform``)."""
        return {"name": self.name, "sha256": self.sha256}


def load_transform(spec: str, shown: str = "--frame-transform") -> LoadedTransform:
    """Import ``MODULE:FUNCTION``; OptionError naming the value and what is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise OptionError(f"{shown} {spec}: expected MODULE:FUNCTION, e.g. mypkg.marks:draw_frames")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
        raise OptionError(f"{shown} {spec}: cannot import {module_name} ({type(e).__name__}: {e}); put it on "
                          f"PYTHONPATH") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise OptionError(f"{shown} {spec}: {module_name} has no function {attr}")
    try:
        source = inspect.getsourcefile(function) or inspect.getfile(function)
        with open(source, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except (TypeError, OSError) as e:
        raise OptionError(f"{shown} {spec}: cannot read the source file of {attr} ({e}); define it in a .py "
                          f"file") from None
    return LoadedTransform(spec, function, digest)


def no_transform_problem(record: dict[str, Any] | None) -> str | None:
    """Why a sample cannot be built from its plain files when no transform is given, or None."""
    fields = [f for f in NEEDS_TRANSFORM if record and f in record]
    if not fields:
        return None
    return (f"its annotation record carries {fields[0]}: the trainer draws on these frames before VGGT sees "
            f"them, so features of the plain files would not be what training computes; pass --frame-transform "
            f"MODULE:FUNCTION with the trainer's drawing function (VG-LLM: draw_visual_marks)")


def apply_transform(t: LoadedTransform, images: list[Any], record: dict[str, Any]) -> list[Any]:
    """The images VGGT sees of a sample's frames (RGB PIL images, as many as given)."""
    out = list(t.function(list(images), dict(record)))
    if len(out) != len(images):
        raise ValueError(f"frame transform {t.name} returned {len(out)} images for {len(images)} frames")
    return [im.convert("RGB") for im in out]
