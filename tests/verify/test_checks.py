"""verify's pure record checks, one by one: a record built in memory against Expectations, no store on disk."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from featstore.formats.record import Record, encode_record
from featstore.verify.checks import (Expectations, check_provenance, check_record, check_record_bytes,
                                     check_sample_record, check_source_image, check_tensors)
from featstore.verify.report import INFO_NO_FINGERPRINT

SHAPE = "[1, 6, 8]"  # formats.manifest.shape_key of a [1, 6, 8] tensor


def expect(**kw) -> Expectations:
    base = dict(dtypes={"features": "float32"}, layers={"features": 22}, shapes=frozenset({SHAPE}),
                model="m" * 64, preprocess="crop", tokens="patch", context="image", data_root=None,
                rebuild="featstore build --data-root D")
    base.update(kw)
    return Expectations(**base)


def record(key: str = "a.jpg", t: torch.Tensor | None = None, **meta) -> Record:
    base = {"model": "m" * 64, "layers": {"features": 22}, "preprocess": "crop", "tokens": "patch"}
    base.update(meta)
    return Record(key, key, {"features": torch.zeros(1, 6, 8) if t is None else t}, base)


def kinds(found) -> list[str]:
    return [f.kind for f in found]


def test_a_matching_record_has_no_findings():
    found, info = check_record(record(), expect(), "a.jpg")
    assert found == [] and not info


def test_tensors_dtype_nonfinite_and_shape():
    assert kinds(check_tensors(record(t=torch.zeros(1, 6, 8, dtype=torch.bfloat16)), expect(), "a")) == ["layout"]
    t = torch.zeros(1, 6, 8)
    t[0, 1, 2], t[0, 3, 4] = float("nan"), float("inf")
    found = check_tensors(record(t=t), expect(), "a")
    assert kinds(found) == ["nonfinite"] and "2 NaN/Inf" in found[0].detail
    found = check_tensors(record(t=torch.zeros(1, 7, 8)), expect(), "a")
    assert kinds(found) == ["layout"] and "[1, 7, 8]" in found[0].detail


@pytest.mark.parametrize("field,value,word", [("model", "x" * 64, "model fingerprint"),
                                              ("layers", {"features": 21}, "layers"),
                                              ("preprocess", "pad", "preprocess"),
                                              ("tokens", "all", "tokens")])
def test_provenance_names_the_field_that_differs(field, value, word):
    found = check_provenance(record(**{field: value}), expect(), "a")
    assert kinds(found) == ["provenance"] and word in found[0].detail


def test_provenance_of_a_record_that_notes_nothing_is_not_a_mismatch():
    rec = Record("a", "a", {"features": torch.zeros(1, 6, 8)}, {"model": "m" * 64})
    assert check_provenance(rec, expect(), "a") == []


def test_source_image_orphan_stale_and_unfingerprinted(tmp_path):
    img = tmp_path / "a.jpg"
    img.write_bytes(b"12345")
    st = os.stat(img)
    ex = expect(data_root=str(tmp_path))
    fresh = record(source={"size": st.st_size, "mtime_ns": st.st_mtime_ns})
    assert check_source_image(fresh, ex, "a.jpg") == ([], True)
    assert check_source_image(record(), ex, "a.jpg") == ([], False)  # no fingerprint: not checkable
    img.write_bytes(b"123456")
    found, _ = check_source_image(fresh, ex, "a.jpg")
    assert kinds(found) == ["stale"] and "--rebuild-stale" in found[0].fix
    img.unlink()
    assert kinds(check_source_image(fresh, ex, "a.jpg")[0]) == ["orphan"]
    _, info = check_record(record(), ex, "a.jpg")
    assert info[INFO_NO_FINGERPRINT] == 0  # an orphan is reported, not counted as unfingerprinted


def test_sample_record_grid_and_frames(tmp_path):
    ex = expect(context="sample", shapes=frozenset())
    ok = record(t=torch.zeros(1, 6, 8), frames=["f0.jpg", "f1.jpg"], kept=1, grid=[2, 3])
    assert check_sample_record(ok, ex, "s") == []
    assert kinds(check_sample_record(dataclasses.replace(ok, meta={**ok.meta, "grid": [2, 4]}), ex, "s")) == ["layout"]
    assert kinds(check_sample_record(dataclasses.replace(ok, meta={**ok.meta, "kept": 2}), ex, "s")) == ["layout"]
    with_root = dataclasses.replace(ex, data_root=str(tmp_path))
    found = check_sample_record(ok, with_root, "s")
    assert kinds(found) == ["orphan"] and "f0.jpg" in found[0].detail
    for f in ("f0.jpg", "f1.jpg"):
        (tmp_path / f).write_bytes(b"x")
    notes = [{"size": 1, "mtime_ns": os.stat(tmp_path / f).st_mtime_ns} for f in ("f0.jpg", "f1.jpg")]
    noted = dataclasses.replace(ok, meta={**ok.meta, "frame_sources": notes})
    assert check_sample_record(noted, with_root, "s") == []
    (tmp_path / "f1.jpg").write_bytes(b"xy")
    assert kinds(check_sample_record(noted, with_root, "s")) == ["stale"]


def test_record_bytes_corrupt_and_wrong_key():
    data = encode_record(record("a.jpg"))
    assert check_record_bytes("a.jpg", data, expect(), "fix", "shard-0.tar")[0] == []
    found, _ = check_record_bytes("b.jpg", data, expect(), "fix", "shard-0.tar")
    assert kinds(found) == ["corrupt"] and "'a.jpg'" in found[0].detail
    damaged = bytearray(data)
    damaged[-3] ^= 0xFF
    found, _ = check_record_bytes("a.jpg", bytes(damaged), expect(), "fix", "shard-0.tar")
    assert kinds(found) == ["corrupt"] and found[0].detail.startswith("shard-0.tar")
