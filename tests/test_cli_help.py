"""--help tells the truth in the form users type (issue 8)."""

from __future__ import annotations

import re

import pytest

from tests.buildutil import run_inproc


def help_text(command: str, env: dict | None = None) -> str:
    r = run_inproc(command, "--help", env=dict({"COLUMNS": "200"}, **(env or {})))
    assert r.returncode == 0
    return r.stdout.split("options:", 1)[1]  # the option list, without the usage line


def option_help(text: str, flag: str) -> str:
    """The help of one option: its line and the indented lines continuing it, joined."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.strip().startswith(flag))
    text = " ".join(lines[start].split())
    for ln in lines[start + 1:]:
        if ln.startswith("  -") or not ln.startswith("      "):
            break
        sep = "" if text.endswith("-") else " "  # argparse wraps after a hyphen
        text += sep + " ".join(ln.split())
    return text


def test_build_help_defaults_in_user_form():
    text = help_text("build", env={"DEVICE": "cuda:7", "BATCH_SIZE": "3", "DATA_ROOT": "/somewhere/else"})
    assert "(default: -2)" in option_help(text, "--layers LAYERS")
    assert "(default: 1GB)" in option_help(text, "--shard-size SHARD_SIZE")
    assert "(default: none)" in option_help(text, "--image-list IMAGE_LIST")
    assert "$DATA_ROOT" in option_help(text, "--data-root DATA_ROOT")
    assert "$VGGT_MODEL_PATH" in option_help(text, "--model MODEL")
    assert "default: 16, or $BATCH_SIZE" in option_help(text, "--batch-size BATCH_SIZE")
    assert "default: cuda:0, or $DEVICE" in option_help(text, "--device DEVICE")
    assert "machine-dependent" in option_help(text, "--num-workers NUM_WORKERS")
    assert "machine-dependent" in option_help(text, "--dtype {float32,bfloat16,float16}")
    # The help describes the defaults, not this shell's environment.
    assert "cuda:7" not in text and "/somewhere/else" not in text and "default: 3)" not in text
    assert "(1000000000" not in text and "(-2,)" not in text
    assert "content (sha256) decides" in option_help(text, "--rebuild-stale")


def test_verify_help_machine_dependent_workers_and_json():
    text = help_text("verify")
    assert "machine-dependent" in option_help(text, "--workers WORKERS")
    assert "--json -" in option_help(text, "--json [REPORT]")
    assert "default: the model the manifest records" in option_help(text, "--model MODEL")


@pytest.mark.parametrize("argv", [["build", "--layers", "a,b"], ["build", "--bogus"], ["frobnicate"]])
def test_command_line_errors_are_one_error_line(argv):
    r = run_inproc(*argv)
    assert r.returncode == 2 and r.stderr.startswith("[ERROR] ") and len(r.stderr.splitlines()) == 1, r.stderr
