"""--help tells the truth in the form users type (issue 8)."""

from __future__ import annotations

import dataclasses
import re
import sys

import pytest

from helpers import run_inproc


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


# --- build defaults are defined once (BuildOptions), and every option has its flag ---------------------------

BUILD_ENV = {"DATA_ROOT": None, "VGGT_MODEL_PATH": None, "BATCH_SIZE": None, "DEVICE": None, "SKIP_EXISTING": None}


def test_build_with_no_flags_means_the_build_options_defaults():
    from featstore.cli.build import build_options_of
    from featstore.cli.main import make_parser
    from featstore.build.options import BuildOptions
    from helpers import environment

    with environment(BUILD_ENV):
        opts = build_options_of(make_parser().parse_args(["build"]))
    plain = BuildOptions(data_root=None, model=None)  # type: ignore[arg-type]
    differ = {f.name: (getattr(opts, f.name), getattr(plain, f.name)) for f in dataclasses.fields(BuildOptions)
              if f.name != "origins" and getattr(opts, f.name) != getattr(plain, f.name)}
    assert not differ, differ


def test_every_build_option_is_set_by_a_flag():
    from featstore.cli.main import make_parser
    from featstore.build.options import BuildOptions

    args = make_parser().parse_args(["build"])
    assert [f.name for f in dataclasses.fields(BuildOptions) if not hasattr(args, f.name)] == ["origins"]


def test_help_values_that_cannot_be_imported_cheaply_match_their_owners():
    from featstore.cli.args import CODEC_CHOICES
    from featstore.formats.codecs import CODECS
    from featstore.model.preprocess import DEFAULT_MAX_PIXELS

    assert CODEC_CHOICES == CODECS
    assert f"default: {DEFAULT_MAX_PIXELS}," in option_help(help_text("build"), "--max-pixels MAX_PIXELS")


# --- a command whose module fails to import fails loudly --------------------------------------------------------

def the_one_error(r) -> str:
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_export_whose_module_fails_to_import_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "featstore.export", None)  # importing it now raises ImportError
    assert "export" in run_inproc("--help").stdout  # still listed
    r = run_inproc("export", str(tmp_path), "--format", "shards", "--out", str(tmp_path / "out"))
    line = the_one_error(r)
    assert "importing featstore.export failed" in line and "ModuleNotFoundError" in line, line
    assert not (tmp_path / "out").exists()


def test_verify_whose_module_fails_to_import_stays_listed_and_names_the_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "featstore.verify", None)
    top = run_inproc("--help", env={"COLUMNS": "200"}).stdout
    assert all(re.search(rf"^\s+{c}\s", top, re.M) for c in ("build", "verify", "export", "merge")), top
    line = the_one_error(run_inproc("verify", str(tmp_path)))
    assert "importing featstore.verify failed" in line and "ModuleNotFoundError" in line, line


def test_precision_help_names_every_recipe_and_the_presets_say_theirs():
    from featstore.cli.build import PRECISION_HELP, PRESETS
    from featstore.model.precision import PRECISION_NAMES, PRECISIONS

    assert tuple(PRECISION_HELP) == PRECISION_NAMES and set(PRECISIONS) == set(PRECISION_HELP)
    text = "".join(help_text("build").split())  # argparse wraps at spaces and hyphens
    for name in PRECISION_NAMES:
        assert f"{name}:" in text
    assert "vgllm=--contextjoint--image-size518--preprocesscrop--layers=-2--reference-framefirst" \
           "--precisiondeepspeed-bf16(arecordwithspar_infoneeds--frame-transform)" in text
    assert PRESETS["janusvln"]["precision"] == PRESETS["vgllm"]["precision"] == "deepspeed-bf16"
