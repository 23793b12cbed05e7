"""One definition of a stale record, shared by `build --rebuild-stale` and `verify` (issue 8): records built
with --hash-inputs are judged by content, the others by size and mtime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featstore.formats.staleness import file_sha256, source_changed
from helpers import build_args, make_images, run_inproc
from helpers import problem_keys, run_verify


def rewrite_same_size_same_mtime(path: Path) -> None:
    """New pixels, same byte size (BMP is uncompressed) and the old mtime: only the content tells."""
    st = path.stat()
    arr = np.asarray(Image.open(path)).copy()
    arr[0, 0] = 255 - arr[0, 0]
    Image.fromarray(arr).save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def touch_later(path: Path) -> None:
    """Same content, a newer mtime."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))


def test_source_changed_rule(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"abcd")
    st = p.stat()
    by_stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    by_content = dict(by_stat, sha256=file_sha256(p))
    assert not source_changed(p, by_stat) and not source_changed(p, by_content)
    touch_later(p)
    assert source_changed(p, by_stat) and not source_changed(p, by_content)
    p.write_bytes(b"abce")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not source_changed(p, by_stat) and source_changed(p, by_content)
    p.write_bytes(b"abcde")
    assert source_changed(p, dict(by_content, sha256="0" * 64))
    with pytest.raises(OSError):
        source_changed(tmp_path / "gone", by_stat)


@pytest.mark.parametrize("fmt", ["shards", "per-image"])
def test_build_and_verify_agree_with_hash_inputs(tmp_path, fmt):
    data = tmp_path / "d"
    keys = make_images(data, 4, ext="bmp")
    args = build_args(data, "--format", fmt, "--hash-inputs")
    assert run_inproc(*args).returncode == 0
    store = data / "vggt_featstore" if fmt == "shards" else data
    touch_later(data / keys[0])                      # same content: not stale
    rewrite_same_size_same_mtime(data / keys[1])     # new content behind the same size and mtime: stale
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "stale") == {keys[1]}, rep["problems"]
    assert "content (sha256)" in next(p["message"] for p in rep["problems"] if p["kind"] == "stale")
    r = run_inproc(*args, "--rebuild-stale")
    assert r.returncode == 0 and "stale rebuilt 1" in r.stderr and "processed 1" in r.stderr, r.stderr
    rc, rep = run_verify(store, tmp_path)
    assert rc == 0, rep["problems"]


@pytest.mark.parametrize("fmt", ["shards", "per-image"])
def test_build_and_verify_agree_by_size_and_mtime(tmp_path, fmt):
    data = tmp_path / "d"
    keys = make_images(data, 4, ext="bmp")
    args = build_args(data, "--format", fmt)
    assert run_inproc(*args).returncode == 0
    store = data / "vggt_featstore" if fmt == "shards" else data
    touch_later(data / keys[0])
    rewrite_same_size_same_mtime(data / keys[1])     # invisible without a content hash, by definition
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "stale") == {keys[0]}, rep["problems"]
    r = run_inproc(*args, "--rebuild-stale")
    assert r.returncode == 0 and "stale rebuilt 1" in r.stderr, r.stderr
    rc, rep = run_verify(store, tmp_path)
    assert rc == 0, rep["problems"]
