"""The build's ledger (featstore.build.ledger): one failure path for images and samples, the missing-images
ledger written and removed on real files; and the settings a build constructs (featstore.build.settings)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from featstore.build.ledger import Ledger, write_missing_ledger
from featstore.build.options import BuildOptions
from featstore.build.output import Output
from featstore.build.settings import requested_settings
from featstore.discover import MissingFrame
from featstore.formats.manifest import BuildSettings


def test_image_and_sample_failures_take_one_path_and_keep_their_ledger_fields(caplog):
    ledger = Ledger("image", show_progress=False)
    ledger.start_progress(3)
    ledger.fail("a.png", "/d/a.png", "OSError: truncated")
    ledger.fail("s1", "/d/b.png", "too big", frame="b.png")
    ledger.fail("c.png", "/d/c.png", None)
    ledger.close_progress()
    assert ledger.stats.failed == 3
    assert ledger.stats.failures == [
        {"key": "a.png", "path": "/d/a.png", "error": "OSError: truncated"},
        {"key": "s1", "frame": "b.png", "path": "/d/b.png", "error": "too big"},
        {"key": "c.png", "path": "/d/c.png", "error": "unknown"}]
    said = [r.getMessage() for r in caplog.records]
    assert "cannot use /d/a.png: OSError: truncated" in said and "cannot build sample s1: frame /d/b.png: too big" in said


def test_missing_ledger_is_written_then_removed_when_nothing_is_missing(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    out = Output(BuildOptions(data_root=data, model="tiny", out=tmp_path / "s"), data, 0)
    out.prepare()
    found = SimpleNamespace(missing=[MissingFrame("x.png", "/d/x.png", "a.jsonl", 3)])
    assert write_missing_ledger(out, found) == "missing.jsonl"
    assert [json.loads(ln) for ln in (tmp_path / "s" / "missing.jsonl").read_text().splitlines()] == [
        {"key": "x.png", "path": "/d/x.png", "annotation": "a.jsonl", "line": 3, "references": 1}]
    assert write_missing_ledger(out, SimpleNamespace(missing=[])) is None
    assert not (tmp_path / "s" / "missing.jsonl").exists()


def test_requested_settings_are_one_build_settings_with_every_binding_setting(tmp_path):
    opts = BuildOptions(data_root=tmp_path, model="tiny", apply_exif=True, image_size=644, codec="raw",
                        hash_inputs=True, context="sample", reference_frame="last")
    s = requested_settings(opts, torch.device("cpu"), (22, 23), torch.bfloat16)
    assert isinstance(s, BuildSettings) and s.model["fingerprint"] is None  # before the model loads
    assert s.preprocess == {"mode": "crop", "apply_exif": True, "target_size": 644, "multiple": 14}
    assert s.context == {"mode": "sample", "reference_frame": "last", "history": None}
    assert s.tensors == {"features": {"layer": 22, "dtype": "bfloat16", "codec": "raw"},
                         "layer_23": {"layer": 23, "dtype": "bfloat16", "codec": "raw"}}
    assert (s.codec, s.source_fingerprint, s.precision, s.compute, s.dtype) == (
        "raw", "sha256", "fp32", "float32-weights", "bfloat16")
    assert s.frame_transform == {"name": None, "sha256": None}
    assert BuildSettings.of(s.to_json()) == s  # what build.json holds reads back the same
