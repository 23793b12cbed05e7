"""Hostile and broken inputs, all in ONE build: the build goes on, every bad input is in the failures
ledger with its reason, every good-but-odd input is processed, and a decompression bomb is refused with
bounded memory."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, build_args, make_images
from test_reliability_concurrency import IS_ROOT, run_cli_as_user


def png_bomb(path: Path, side: int = 20000) -> None:
    """A real, valid 1-bit greyscale PNG of side x side pixels (about 50 MB of zero rows, deflated to ~50 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + side // 8)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def hostile_tree(d: Path) -> dict[str, str]:
    """Create every input of the issue's list under ``d``; returns name -> expected outcome."""
    good = make_images(d, 4)
    rng = np.random.RandomState(0)
    rgb = rng.randint(0, 256, (40, 50, 3), dtype=np.uint8)
    (d / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")
    (d / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.png").write_text("this is not an image\n")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((rng.randint(0, 65536, (30, 40))).astype(np.uint16)).save(d / "sixteen.png")
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = 0
    pal.save(d / "palette.png", transparency=0)
    Image.fromarray(rgb).convert("LA").save(d / "la.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    Image.fromarray(rgb).save(d / "exif.jpg", exif=exif.tobytes())
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "one.png")
    Image.fromarray(rng.randint(0, 256, (10, 5000, 3), dtype=np.uint8)).save(d / "wide.png")
    png_bomb(d / "bomb.png")
    os.symlink(d, d / "loop")  # a symlink loop in the data root
    Image.fromarray(rgb).save(d / "unreadable.png")
    (d / "unreadable.png").chmod(0o000)
    bad_name = os.fsencode(str(d)) + b"/bad\xffname.png"
    with open(bad_name, "wb") as f:
        Image.fromarray(rgb).save(f, "PNG")
    (d / "folder.jpg").mkdir()
    os.symlink(d / good[0], d / "alias.png")  # the same image reached through two paths: one item,
    good[0] = "alias.png"  # keyed by the smaller key (sources.py's documented rule)
    return {"zero.jpg": "fail", "truncated.jpg": "fail", "text.png": "fail", "bomb.png": "fail",
            "unreadable.png": "fail", "cmyk.jpg": "ok", "sixteen.png": "ok", "palette.png": "ok", "la.png": "ok",
            "exif.jpg": "ok", "one.png": "ok", "wide.png": "ok", "bad\udcffname.png": "ok",
            **{k: "ok" for k in good}}


@pytest.mark.slow  # a real build process without DAC capabilities (about 10 s)
def test_every_hostile_input_in_one_build(tmp_path):
    d = tmp_path / "d"
    expected = hostile_tree(d)
    out = tmp_path / "out"
    r = run_cli_as_user(*build_args(d, "--out", str(out), "--max-pixels", "50000000", "--apply-exif"))
    assert r.returncode == 1, r.stderr[-3000:]  # failures recorded, so the exit status says so
    assert "Traceback" not in r.stderr
    ledger = {f["key"]: f["error"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    fails = {k for k, v in expected.items() if v == "fail"}
    assert set(ledger) == fails, ledger
    assert "50,000,000" in ledger["bomb.png"] and "400,000,000" in ledger["bomb.png"], ledger["bomb.png"]
    assert "Permission denied" in ledger["unreadable.png"] or not IS_ROOT
    assert all(ledger.values())
    from featstore import open_store

    store = open_store(out)
    keys = set(store.keys())
    assert keys == {k for k, v in expected.items() if v == "ok"}, keys ^ {k for k, v in expected.items() if v == "ok"}
    assert not any(k.startswith("loop/") for k in keys)  # the loop is not followed
    assert store.record("wide.png").features.shape[1] > 0 and store.record("one.png").features.shape[1] > 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["failed"] == len(fails) and m["processed_images"] == len(keys)


@pytest.mark.slow  # a separate process, to measure its peak memory (about 5 s)
def test_decompression_bomb_refused_with_bounded_memory(tmp_path):
    png_bomb(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    code = f"""
import resource, sys
from featstore.model.preprocess import preprocess_image
from featstore.errors import ImageError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    preprocess_image({str(tmp_path / 'bomb.png')!r}, max_pixels=50_000_000)
    print("ACCEPTED")
except ImageError as e:
    print("REFUSED", e)
print("GROWTH_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert "REFUSED" in r.stdout and "20000x20000" in r.stdout, r.stdout + r.stderr
    growth_kb = int(r.stdout.split("GROWTH_KB")[1])
    assert growth_kb < 20_000, f"peak RSS grew {growth_kb} KB refusing a 400 Mpixel bomb"
