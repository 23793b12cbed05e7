"""Helpers for build tests: small real image trees and CLI runs in-process or as real subprocesses."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_images(root: Path, n: int, *, size=(70, 56), prefix="ep", per_dir=4, seed=0, ext="png") -> list[str]:
    """Write ``n`` small real images under ``root`` in episode folders; returns their keys."""
    rng = np.random.RandomState(seed)
    keys = []
    for i in range(n):
        key = f"{prefix}{i // per_dir}/frame.{i % per_dir:03d}.{ext}"
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        w, h = size if i % 3 else (size[1], size[0])  # two shapes, so batches are formed per shape
        arr = rng.randint(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(p)
        keys.append(key)
    return sorted(keys)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write annotation records as JSON lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m featstore ...`` as a real process; returns the completed process (text output)."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONPATH", str(REPO))
    return subprocess.run([sys.executable, "-m", "featstore", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=str(REPO))


def build_args(data_root: Path, *extra: str) -> list[str]:
    """Common flags for a fast CPU build with the tiny model."""
    return ["build", "--data-root", str(data_root), "--model", "tiny", "--device", "cpu", "--no-progress",
            "--num-workers", "0", "--batch-size", "4", *extra]


@contextlib.contextmanager
def environment(env: dict | None):
    """Set environment variables (a value of None removes one) for the duration of a block."""
    old = dict(os.environ)
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def run_inproc(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the featstore CLI in this process (no interpreter start-up: fast); same result shape as run_cli.

    An uncaught exception is turned into a "Traceback" in stderr and exit status 1, as a real process shows it.
    """
    import traceback

    from featstore.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with environment(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        except Exception:
            err.write(traceback.format_exc())
            rc = 1
    return subprocess.CompletedProcess(["featstore", *args], rc, out.getvalue(), err.getvalue())
