"""Issue 19 acceptance: `featstore plan` takes the same flags as build, `build --dry-run` and the plan flags are
spelled as the issue gives them, and the benchmarks' flags exist. Behaviour is covered in tests/read, tests/build."""

from __future__ import annotations

import pytest

import inspect
import re
import subprocess
import sys

from featstore import stream
from helpers import REPO_ROOT


def _run(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _flags(text: str) -> set[str]:
    return {f for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text) if not f.endswith("-")}  # "-" : wrapped


def test_plan_has_the_same_flags_as_build_and_build_has_dry_run():
    build, plan = _flags(_run("-m", "featstore", "build")), _flags(_run("-m", "featstore", "plan"))
    assert build - {"--dry-run"} <= plan, build - plan
    assert {"--dry-run", "--assume-size", "--rate", "--json"} <= build
    assert {"--assume-size", "--rate", "--json"} <= plan
    text = " ".join(_run("-m", "featstore", "plan").split())
    assert "--assume-size WxH" in text and "--json PATH|-" in text


def test_stream_takes_the_issue_keywords():
    params = inspect.signature(stream).parameters
    for name in ("cache_dir", "cache_limit", "batch_size", "bucket_by_shape", "drop_last"):
        assert name in params, name


@pytest.mark.slow  # a few seconds (compile or benchmark processes)
def test_loader_bench_has_url_and_scale_bench_exists():
    assert "--url" in _flags(_run(str(REPO_ROOT / "benchmarks" / "loader_bench.py")))
    assert "--assume-size" in (REPO_ROOT / "benchmarks" / "scale_bench.py").read_text()
