"""Issue 20 acceptance: `featstore report STORE [-o report.html] [--samples N] [--seed S]` with --verify and
--recompute N, and the `featstore[report]` extra. Pages, ids and bad inputs are covered in tests/report."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from helpers import REPO_ROOT


def test_report_command_line_is_spelled_as_the_issue_gives_it():
    proc = subprocess.run([sys.executable, "-m", "featstore", "report", "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for part in ("[-o OUT]", "[--samples N]", "[--seed SEED]", "[--verify]", "[--recompute N]", "store",
                 "default: report.html", "(default: 8)", "featstore[report]"):
        assert part in text, part


def test_report_extra_is_matplotlib():
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["report"])
