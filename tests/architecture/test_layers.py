"""The package's layout rules, read from the source: rooms import only rooms below them, sizes stay small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "featstore"

#: Rooms that hold what is on disk and where the bytes live: they know nothing of the pipeline above them.
LOW_ROOMS = ("formats", "storage")
#: What a low room may import besides itself and each other.
BELOW_ALL = {"featstore", "featstore.errors", "featstore.constants", "featstore.runtime", "featstore.__version__"}
HIGH_ROOMS = ("build", "read", "cli", "discover", "verify", "report", "export", "model")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _room(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Every featstore module a file imports, at the top or inside functions."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m == "featstore" or m.startswith("featstore.")}


def _target_room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("path", [p for p in _modules() if _room(p) in LOW_ROOMS], ids=lambda p: p.name)
def test_low_rooms_import_nothing_above_them(path):
    bad = sorted(m for m in _imports(path)
                 if _target_room(m) not in (None, *LOW_ROOMS) and not any(
                     m == b or m.startswith(b + ".") for b in BELOW_ALL - {"featstore"}))
    assert bad == [], f"{path.relative_to(PACKAGE)} imports {bad}: formats/ and storage/ sit below the pipeline"


def test_nothing_imports_the_command_line():
    users = sorted(str(p.relative_to(PACKAGE)) for p in _modules()
                   if _room(p) != "cli" and p.name != "__main__.py"
                   and any(_target_room(m) == "cli" for m in _imports(p)))
    assert users == []


def test_writers_do_not_import_the_reader():
    writers = [p for p in _modules() if _room(p) in ("build", "formats", "storage")]
    users = sorted(str(p.relative_to(PACKAGE)) for p in writers
                   if any(_target_room(m) in ("read", "loader") for m in _imports(p)))
    assert users == []


def test_at_most_six_modules_flat_at_the_top():
    flat = sorted(p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(flat) <= 6, flat


def test_sizes_stay_small():
    """No module over 400 lines, no function over 50, no class over 200."""
    over = []
    for p in _modules():
        src = p.read_text(encoding="utf-8")
        rel = p.relative_to(PACKAGE)
        if src.count("\n") > 400:
            over.append(f"{rel}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            n = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and n > 50:
                over.append(f"{rel}:{node.name}: function of {n} lines")
            if isinstance(node, ast.ClassDef) and n > 200:
                over.append(f"{rel}:{node.name}: class of {n} lines")
    assert over == []


def test_export_opens_stores_through_the_one_opener():
    """export converts a store it reads: through the public opener, never the reader's classes."""
    used = sorted(m for m in _imports(PACKAGE / "export.py") if _target_room(m) in ("read", "loader"))
    assert all(m.rsplit(".", 1)[-1] in ("read", "open_store", "locate_store") for m in used), used
