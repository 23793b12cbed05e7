"""Issue 18 acceptance (CPU parts): the public names of the build's compile and fp8 options, spelled as the issue
gives them. The null-model JSON keys and gpu_bench --smoke are covered in tests/bench (slow)."""

from __future__ import annotations

import subprocess
import sys

from featstore.cli.build import PRESETS
from helpers import REPO_ROOT


def _help(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "featstore", *argv, "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())


def test_compile_is_auto_by_default_on_for_cuda_with_a_flag_to_turn_it_off():
    text = _help("build")
    assert "--compile [{auto,on,off}]" in text and "(default: auto)" in text
    assert "auto: on for CUDA devices" in text and "--no-compile" in text


def test_fp8_is_opt_in_and_in_no_preset():
    text = _help("build")
    assert "--precision {fp32,bf16,amp,deepspeed-bf16,fp8}" in text
    assert PRESETS and all(p.get("precision") != "fp8" for p in PRESETS.values())
