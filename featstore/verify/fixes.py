"""What verify tells the user to do: the ``featstore build`` command that resumes a store (its sources and
every non-default setting, so it runs as printed) and the fix texts shared by several checks."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any


def rebuild_command(m: dict[str, Any], out: Path | str | None, per_image: bool) -> str:
    """The `featstore build` command that resumes the store ``m`` describes: its data root, model, sources and
    every setting that differs from the defaults (dtype always: its default depends on the machine)."""
    root = m.get("data_root") or "DATA_ROOT"
    args = ["featstore build", "--data-root", shlex.quote(str(root)), "--model",
            shlex.quote(str(m.get("vggt_model_path") or "MODEL"))]
    if per_image:
        args += ["--format", "per-image"] + (["--out", shlex.quote(str(m["cache_root"]))] if m.get("cache_root") else [])
    elif out is not None:
        args += ["--out", shlex.quote(str(out))]
    return " ".join(args + source_flags(m, str(root)) + setting_flags(m))


def source_flags(m: dict[str, Any], root: str) -> list[str]:
    """The flags repeating the sources the build recorded (none for a scan or auto-discovered annotations)."""
    src = m.get("sources") or {}
    flags = []
    if not src.get("auto") and not src.get("scan"):
        for a in src.get("annotations") or []:
            flags += ["--annotations", shlex.quote(os.path.join(root, a["file"]))]
        if src.get("image_list"):
            flags += ["--image-list", shlex.quote(os.path.join(root, src["image_list"]["file"]))]
    if src.get("data_path"):
        flags += ["--data-path", shlex.quote(src["data_path"])]
    return flags


def setting_flags(m: dict[str, Any]) -> list[str]:
    """The flags repeating the build settings that differ from the defaults."""
    flags = []
    pre = m.get("preprocess") or {}
    if pre.get("mode") not in (None, "crop"):
        flags += ["--preprocess", str(pre["mode"])]
    if pre.get("apply_exif"):
        flags.append("--apply-exif")
    if m.get("dtype"):
        flags += ["--dtype", str(m["dtype"])]
    depth = ((m.get("model") or {}).get("config") or {}).get("depth")
    layers = [int(i) for i in m.get("layers") or []]
    if layers and (not isinstance(depth, int) or layers != [depth - 2]):
        flags.append("--layers=" + ",".join(map(str, layers)))
    if m.get("tokens") == "all":
        flags += ["--tokens", "all"]
    if m.get("source_fingerprint") == "sha256":
        flags.append("--hash-inputs")
    return flags


def rebuild_records(rebuild: str) -> str:
    """Fix for records whose content is wrong."""
    return f"re-run `{rebuild} --no-skip-existing` (or delete the record's shard/file, merge, and resume)"


def rebuild_shard(shard: str, rebuild: str) -> str:
    """Fix for a broken shard: drop it, merge, and let the build redo its records."""
    return f"delete shards/{shard}, run `featstore merge STORE`, then re-run `{rebuild}` to rebuild its records"


def merge(root: Path | str) -> str:
    """Fix for an index or manifest that disagrees with the shards."""
    return f"run `featstore merge {root}`"
