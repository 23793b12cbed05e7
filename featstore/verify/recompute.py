"""``verify --recompute N``: re-run the model on N seeded records and compare with what is stored.

One model and one :class:`~featstore.build.extract.Extractor` serve the whole run, in float32 on the device the user
chose (``--device``, default cpu; TF32 is off while it runs, so a GPU computes true float32). A record may differ
from the fresh output by its storage dtype's tolerance plus the error bound a lossy codec stored with it.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Iterator

import torch

from featstore.constants import DEFAULT_IMAGE_SIZE, NAMED_MODELS
from featstore.errors import StoreError
from featstore.formats.manifest import BuildSettings
from featstore.formats.record import Record, dtype_name, lossy_max_abs
from featstore.formats.locate import StoreLocation
from featstore.formats.keys import image_path_of
from featstore.verify.report import Finding, Report

# Relative error (max |stored - recomputed| / max |recomputed|) accepted per storage dtype.
RECOMPUTE_TOL = {"float32": 1e-3, "float16": 4e-3, "bfloat16": 1.6e-2, "float64": 1e-6}


def recorded_model(m: dict[str, Any]) -> str:
    """The model the manifest says the store was built with, when it can be loaded here (a built-in name or
    an existing path); StoreError otherwise."""
    recorded = str(m.get("vggt_model_path") or "")
    if recorded in NAMED_MODELS or (recorded and Path(recorded).exists()):
        return recorded
    where = f"the manifest's model {recorded!r} is not a built-in name or an existing path" if recorded else \
        "the manifest records no model"
    raise StoreError(f"--recompute needs --model PATH (the checkpoint the store was built with): {where}")


def recorded_precision(m: dict[str, Any]) -> Any:
    """The precision recipe the store records (fp32 for stores recorded before recipes, or with a legacy one)."""
    from featstore.model.precision import PRECISIONS

    return PRECISIONS.get(str(BuildSettings.of(m).precision), PRECISIONS["fp32"])


class Recomputer:
    """Computes records afresh: one extractor (model, layers, tokens) for the run, on one device, in the
    store's precision recipe, with its frame transform."""

    def __init__(self, model: Any, layers: tuple[int, ...], m: dict[str, Any], device: torch.device):
        from featstore.build.extract import Extractor
        from featstore.build.transform import load_transform

        settings = BuildSettings.of(m)
        self.recipe = recorded_precision(m)
        self.ext = Extractor(model, layers, torch.float32, settings.tokens or "patch",
                             input_dtype=self.recipe.input_dtype)
        self.device = device
        self.mode = settings.preprocess.get("mode") or "crop"
        self.opts = {"apply_exif": bool(settings.preprocess.get("apply_exif")),
                     "image_size": int(settings.preprocess.get("target_size") or DEFAULT_IMAGE_SIZE)}
        name = (settings.frame_transform or {}).get("name")
        self.transform = load_transform(name) if name else None

    def _image(self, key: str, data_root: str) -> torch.Tensor:
        from featstore.model.preprocess import preprocess_image

        return preprocess_image(image_path_of(key, data_root), self.mode, **self.opts)

    def _joint_frames(self, rec: Record, data_root: str) -> torch.Tensor:
        """A joint record's frames as the build fed them: through the frame transform when there is one."""
        from featstore.build.transform import apply_transform
        from featstore.model.preprocess import open_image, preprocess_image

        paths = [image_path_of(f, data_root) for f in rec.meta["frames"]]
        if self.transform is None:
            return torch.stack([preprocess_image(p, self.mode, **self.opts) for p in paths])
        images = [open_image(p) for p in paths]
        seen = apply_transform(self.transform, images, dict(rec.meta.get("annotation") or {}))
        return torch.stack([preprocess_image(im, self.mode, **self.opts) for im in seen])

    def features(self, rec: Record, data_root: str) -> dict[str, torch.Tensor]:
        """The record's tensors computed afresh (on the CPU), each with a leading batch dimension: its image; a
        sample record's frames streamed as training streams them (causal over frames, the kept frame's tokens);
        a joint record's frames through the model together."""
        with self.recipe.autocast(self.device):
            return self._features(rec, data_root)

    def _features(self, rec: Record, data_root: str) -> dict[str, torch.Tensor]:
        ext, context = self.ext, rec.meta.get("context")
        if context == "joint":
            from featstore.model.joint import joint_features

            frames = self._joint_frames(rec, data_root).to(self.device)
            out = joint_features(ext.model, frames, ext.layers, rec.meta.get("reference_frame", "first"), ext.tokens,
                                 self.recipe)
            return {n: out[i][None].float().cpu() for n, i in zip(ext.names, ext.layers)}  # [1, S, N, C]
        if context != "sample":
            out = ext.run(self._image(rec.key, data_root)[None].to(self.device))
            return {n: t.float().cpu() for n, t in out.items()}
        frames = list(rec.meta["frames"])
        order = frames if rec.meta.get("reference_frame", "first") == "first" else frames[::-1]
        images = torch.stack([self._image(f, data_root) for f in order])[None].to(self.device)
        with torch.inference_mode():
            out = ext.model(self.recipe.cast_input(images), layers=ext.layers, causal=True)
        start = int(ext.model.patch_start_idx) if ext.tokens == "patch" else 0
        return {n: out[i][:, -1:, start:].float().cpu() for n, i in zip(ext.names, ext.layers)}  # [1, 1, P, C]


@contextlib.contextmanager
def _true_float32() -> Iterator[None]:
    """Turn TF32 off for CUDA matmuls and convolutions while the block runs (a no-op on CPU)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def recompute(report: Report, location: StoreLocation, model_path: str, n: int, seed: int, data_root: str | None,
              device: str, rebuild: str) -> None:
    """Re-run the model on ``n`` seeded records on ``device`` and compare with the stored features (the worst
    error is reported)."""
    from featstore.build.extract import pick_device
    from featstore.model import load_vggt

    from featstore.read import open_location

    store = open_location(location, data_root=data_root)
    m = store.manifest
    names = [k for k, v in (m.get("tensors") or {}).items() if isinstance(v, dict) and v.get("layer") is not None]
    if not names:
        report.notes.append("recompute skipped: the manifest does not say which layers were stored")
        return
    dev = pick_device(device, f"--device {device}")
    model = load_vggt(model_path, device=dev, precision=recorded_precision(m))
    run = Recomputer(model, tuple(int(m["tensors"][k]["layer"]) for k in names), m, dev)
    keys = store.keys()
    chosen = random.Random(seed).sample(keys, min(n, len(keys)))
    worst, worst_key, tol_used = 0.0, None, None
    per_record: list[dict[str, Any]] = []  # every comparison, for `featstore report`'s histogram
    with _true_float32():
        for key in chosen:
            rec = store.record(key)
            findings, errors = compare_record(rec, run.features(rec, store.data_root), names, rebuild)
            report.add(*findings)
            for err, tol in errors:
                per_record.append({"key": key, "error": err, "tolerance": tol})
                tol_used = tol if tol_used is None else max(tol_used, tol)
                if worst_key is None or err > worst:
                    worst, worst_key = err, key
    report.recompute = {"checked": len(chosen), "worst_error": worst, "worst_key": worst_key, "tolerance": tol_used,
                        "errors": per_record, "model": model.fingerprint, "device": str(dev)}
    if m.get("model", {}).get("fingerprint") not in (None, model.fingerprint):
        report.notes.append(f"--model fingerprint {model.fingerprint[:12]} differs from the store's "
                            f"{m['model']['fingerprint'][:12]}")


def compare_record(rec: Record, fresh: dict[str, torch.Tensor], names: list[str], rebuild: str
                   ) -> tuple[list[Finding], list[tuple[float, float]]]:
    """Findings for the stored tensors ``names`` of ``rec`` against ``fresh`` ones, and (relative error, tolerance)
    per tensor compared."""
    findings, errors = [], []
    dt = rec.features.dtype
    for name in names:
        want = fresh[name][0].to(dt).float()
        got = rec.tensors[name].float()
        if want.shape != got.shape:
            findings.append(Finding("recompute", rec.key, f"tensor {name!r}: stored shape {list(got.shape)}, model "
                                                          f"gives {list(want.shape)}", f"re-run `{rebuild} "
                                                                                       f"--no-skip-existing`"))
            continue
        peak = float(want.abs().max().clamp_min(1e-12))
        err = float((want - got).abs().max()) / peak
        # A lossy record may differ by the bound it was written with.
        tol = RECOMPUTE_TOL.get(dtype_name(dt), 1e-3) + lossy_max_abs(rec, name) / peak
        errors.append((err, tol))
        if err > tol:
            findings.append(Finding("recompute", rec.key, f"tensor {name!r}: relative error {err:.3g} exceeds "
                                                          f"{tol:.3g} for {dtype_name(dt)} (stored error bound "
                                                          f"included)",
                                    "rebuild with the model this store claims, or check the --model given to verify"))
    return findings, errors
