"""The tests' one helper module: small real image trees, the sample data copied to a test's folder, CLI runs in
process or as real subprocesses, real stores built and verified with the tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "sample"
SAMPLE_FILES = ("*.jpg", "*.png", "train.jsonl", "annotations.json")


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


def write_jsonl(path: Path, records: list) -> Path:
    """Write annotation records as JSON lines; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def touch(path: Path, data: bytes = b"img") -> Path:
    """Create ``path`` (and its folders) holding ``data`` (a file name is all discovery looks at)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def keys(found) -> list[str]:
    """The item keys of a discovery, in order."""
    return [i.key for i in found.items]


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


def copy_sample(dst: Path, src: Path = SAMPLE, patterns: tuple[str, ...] = SAMPLE_FILES) -> Path:
    """Copy the sample data set's own files (images, annotations) to ``dst``, and nothing a user's run of the
    README may have written there (stores, caches, manifests, ledgers): tests never depend on the checkout."""
    for pattern in patterns:
        for p in src.rglob(pattern):
            rel = p.relative_to(src)
            if p.is_file() and "vggt_featstore" not in rel.parts:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, dst / rel)
    return dst


def copy_images(dst: Path, drop: int = 0) -> Path:
    """Copy the sample images (no store, no annotations) to ``dst``; optionally drop the last ``drop`` images."""
    copy_sample(dst, patterns=("*.jpg", "*.png"))
    if drop:
        for p in sorted(dst.rglob("*.*"))[-drop:]:
            p.unlink()
    return dst


def build(data_root: Path, *args: str) -> None:
    """Run `featstore build` with the tiny model on CPU; fails the test on a non-zero exit."""
    from featstore.cli.main import main

    rc = main(["build", "--data-root", str(data_root), "--model", "tiny", "--device", "cpu", "--no-progress",
               "--num-workers", "0", "--writer-threads", "1", "--no-fsync", *args])
    assert rc == 0, f"build failed with {rc}"


def run_verify(path: Path, tmp: Path, *args: str) -> tuple[int, dict]:
    """Run `featstore verify --json`; returns (exit code, report)."""
    report = tmp / f"report-{len(list(tmp.glob('report-*')))}.json"
    from featstore.cli.main import main

    rc = main(["verify", str(path), "--json", str(report), "--no-progress", *args])
    return rc, json.loads(report.read_text())


def problem_keys(report: dict, kind: str) -> set[str]:
    """Keys named by problems of one kind."""
    return {p["key"] for p in report["problems"] if p["kind"] == kind}
