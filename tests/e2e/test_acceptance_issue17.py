"""Acceptance for issue 17 not covered elsewhere: --precision's four recipes and both presets as the issue spells
them, each part overridable, and --help naming them. (Builds, joint, dedup, transform, verify, export:
tests/build/test_build_joint.py, tests/build/test_build_dedup.py, tests/model/test_model_recipes.py.)"""

from __future__ import annotations

import argparse

import pytest

from helpers import run_inproc
from featstore.cli.build import add_build_parser, apply_preset


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_build_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["build", "--data-root", "d", "--out", "o", *argv])
    apply_preset(args)
    return args


@pytest.mark.parametrize("preset, context, size", [("janusvln", "sample", 644), ("vgllm", "joint", 518)])
def test_presets_expand_as_the_issue_says(preset, context, size):
    a = parse("--preset", preset)
    assert (a.context, a.image_size, a.preprocess, tuple(a.layers), a.reference_frame, a.precision) == \
        (context, size, "crop", (-2,), "first", "deepspeed-bf16")


def test_each_part_of_a_preset_is_overridable():
    a = parse("--preset", "vgllm", "--context", "sample", "--image-size", "280", "--preprocess", "pad",
              "--layers=-1", "--reference-frame", "last", "--precision", "fp32")
    assert (a.context, a.image_size, a.preprocess, tuple(a.layers), a.reference_frame, a.precision) == \
        ("sample", 280, "pad", (-1,), "last", "fp32")


@pytest.mark.parametrize("recipe", ["fp32", "bf16", "amp", "deepspeed-bf16"])
def test_precision_accepts_each_recipe(recipe):
    assert parse("--precision", recipe).precision == recipe


def test_help_names_the_recipes_the_presets_and_spar_info():
    r = run_inproc("build", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    for word in ("fp32", "bf16", "amp", "deepspeed-bf16", "vgllm", "janusvln", "--frame-transform", "spar_info"):
        assert word in text, word
