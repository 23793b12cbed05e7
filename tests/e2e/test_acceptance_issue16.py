"""Acceptance for issue 16 not covered elsewhere: the public names under "What must not change" import.
(The resume bug, codec-per-record and hash-inputs policy: tests/build/test_settings_bind.py.)"""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("module, name", [
    ("featstore", "open_store"), ("featstore", "stream"), ("featstore", "load_vggt"),
    ("featstore", "preprocess_image"), ("featstore", "load_cached_vggt_features"),
    ("featstore", "load_sample_features"), ("featstore", "dequantize"), ("featstore.loader", "decode_sample"),
])
def test_public_names_import(module, name):
    assert callable(getattr(importlib.import_module(module), name))
