"""The settings a build's records are made with, constructed once as the one
:class:`~featstore.formats.manifest.BuildSettings` (what binds a store is that class's rule)."""

from __future__ import annotations

from typing import Any

import torch

from featstore.build.extract import tensor_names
from featstore.build.transform import load_transform
from featstore.formats.manifest import BuildSettings
from featstore.formats.record import dtype_name
from featstore.model.checkpoint import default_dtype as default_model_dtype
from featstore.model.precision import Precision, resolve_precision


def preprocess_settings(opts: Any) -> dict[str, Any]:
    """How every image is preprocessed: crop/pad make the longest (pad) or width (crop) side ``image_size``,
    the other a multiple of 14; janusvln then takes each side down to a multiple of 28 (518 -> 504)."""
    return {"mode": opts.preprocess, "apply_exif": bool(opts.apply_exif), "target_size": opts.image_size,
            "multiple": 28 if opts.preprocess == "janusvln" else 14}


def context_settings(opts: Any) -> dict[str, Any]:
    """What a record is: one image, or one training sample (streamed with its frames as causal context, or
    its frames through the model together)."""
    if opts.context == "image":
        return {"mode": "image"}
    history = None if opts.history is None else {"frames": opts.history, "pad": opts.history_pad, "rule": "janusvln"}
    return {"mode": opts.context, "reference_frame": opts.reference_frame, "history": history}


def default_precision(device: torch.device) -> str:
    """The recipe of a build that names none, what builds did before recipes: bf16 weights on GPUs with bf16,
    else fp32."""
    return "bf16" if default_model_dtype(device) == torch.bfloat16 else "fp32"


def precision_of(opts: Any, device: torch.device) -> Precision:
    """The build's recipe: ``--precision``, ``--autocast`` (amp), else the device's default."""
    return resolve_precision(opts.precision, True if opts.autocast else None, default=default_precision(device))


def transform_identity(opts: Any) -> dict[str, Any]:
    """The manifest's ``frame_transform``: name and source sha256 of ``--frame-transform``, or none."""
    if not getattr(opts, "frame_transform", None):
        return {"name": None, "sha256": None}
    return load_transform(opts.frame_transform).identity()


def model_identity(model: Any = None) -> dict[str, Any]:
    """The model's fingerprint, name and config (all None before it is loaded)."""
    if model is None:
        return {"fingerprint": None, "name": None, "config": None}
    return {"fingerprint": model.fingerprint, "name": model.config.name, "config": model.config.to_dict()}


def requested_settings(opts: Any, device: torch.device, layers: tuple[int, ...], store_dtype: torch.dtype,
                       model: Any = None) -> BuildSettings:
    """The settings this run's records get (``model`` None: before it loads, its fingerprint unknown)."""
    dtype = dtype_name(store_dtype)
    recipe = precision_of(opts, device)
    return BuildSettings(
        vggt_model_path=str(opts.model), model=model_identity(model), layers=list(layers),
        tensors={n: {"layer": i, "dtype": dtype, "codec": opts.codec} for n, i in zip(tensor_names(layers), layers)},
        preprocess=preprocess_settings(opts), context=context_settings(opts), dtype=dtype,
        compute=recipe.compute_name(device), precision=recipe.name, frame_transform=transform_identity(opts),
        codec=opts.codec, tokens=opts.tokens,
        source_fingerprint="sha256" if opts.hash_inputs else "stat")
