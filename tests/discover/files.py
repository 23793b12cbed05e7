"""Small file makers of the discovery tests (real files in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path


def touch(path: Path, data: bytes = b"img") -> Path:
    """Create ``path`` (and its folders) holding ``data``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write_jsonl(path: Path, records: list) -> Path:
    """Write annotation records as UTF-8 JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def keys(found) -> list[str]:
    """The item keys of a discovery, in order."""
    return [i.key for i in found.items]
