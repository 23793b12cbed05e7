"""`featstore report` on real stores built with the tiny model: every section, sample stores' frames, lossy
stores' bounds, verify's findings, and bad input (a page saying what it could not show, or one [ERROR] line)."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch

from featstore.formats.record import Record
from featstore.report.maps import colour_views, record_view
from featstore.report.page import SECTION_IDS
from helpers import run_inproc
from helpers import build, copy_images, copy_sample


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """An image store (zstd, 4 images) and a sample store (int8) of the sample data."""
    root = tmp_path_factory.mktemp("report")
    images = copy_images(root / "images", drop=8)
    build(images)
    samples = copy_sample(root / "samples")
    build(samples, "--context", "sample", "--codec", "int8")
    return {"images": images / "vggt_featstore", "samples": samples / "vggt_featstore", "root": root}


def _report(store, out, *args):
    r = run_inproc("report", str(store), "-o", str(out), *args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return out.read_text(encoding="utf-8"), r


def _section(page: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


def test_image_store_page_has_every_section_and_needs_no_network(stores, tmp_path):
    page, r = _report(stores["images"], tmp_path / "r.html", "--samples", "3")
    assert "report written to" in r.stderr
    for sid in SECTION_IDS:
        _section(page, sid)
    maps = _section(page, "feature-maps")
    assert maps.count('class="map figure"') == 3 and maps.count('class="frame"') == 3
    assert "3 of 4 records, chosen with seed 0" in maps
    assert "Over all 4 records; 4 read" in _section(page, "distributions")
    assert "0 of 4 records hold NaN or Inf" in page
    assert "lossless" in _section(page, "codec-error")
    prov = _section(page, "provenance")
    assert "fe398e250e91" in prov and "crop, size 518" in prov and "fp32 (compute float32-weights, stored float32)" in prov
    thr = _section(page, "throughput")
    assert 'alt="records per second over time and stage seconds"' in thr and "<td>4</td>" in thr.replace(" class=v", "")
    assert "not run: pass --verify" in _section(page, "verify")
    # self-contained: every image inline, nothing fetched from anywhere
    assert not re.search(r'(src|href)="(?!data:)', page) and "http://" not in page and "https://" not in page


def test_sample_store_shows_every_frame_with_the_kept_one_and_its_codec_bounds(stores, tmp_path):
    page, _ = _report(stores["samples"], tmp_path / "s.html", "--samples", "2", "--seed", "1")
    maps = _section(page, "feature-maps")
    assert maps.count('class="record"') == 2
    assert maps.count('class="frame"') >= 5  # 4 frames of an annotated sample (+ 1 of a single-image one)
    assert maps.count("<b>(kept)</b>") == 2 and maps.count('class="map figure"') == 2
    assert "sample, grid 28x37" in maps
    codec = _section(page, "codec-error")
    assert 'alt="codec error bounds"' in codec and "int8" in codec and "0 records exceed" in codec
    assert "first" in _section(page, "provenance")  # reference frame


@pytest.mark.slow  # verify's worker processes and a model run: about 10-20 s
def test_verify_and_recompute_are_shown(stores, tmp_path):
    page, _ = _report(stores["samples"], tmp_path / "v.html", "--verify", "--recompute", "2")
    v = _section(page, "verify")
    assert "every check passed" in v and "Recompute: 2 records on cpu" in v and 'alt="recompute differences"' in v


def test_joint_records_get_a_map_per_frame(stores):
    data = stores["samples"].parent
    frames = ["episodes/episode_000/frame.000.jpg", "episodes/episode_000/frame.001.jpg",
              "episodes/episode_000/frame.002.jpg"]
    feats = torch.randn(3, 28 * 37, 16)
    rec = Record("joint", str(data / frames[-1]), {"features": feats}, {"frames": frames, "grid": [28, 37]})
    pre = {"mode": "crop", "target_size": 518}
    view = record_view(rec, str(data), pre, 14)
    colour_views([view])
    assert view.kind == "joint" and [t.map_index for t in view.tiles] == [0, 1, 2]
    assert all(t.map_png and t.frame_png for t in view.tiles) and not any(t.kept for t in view.tiles)
    one = record_view(Record("s", "p", {"features": feats[:1]}, {"frames": frames, "kept": 2, "grid": [28, 37]}),
                      str(data), pre, 14)
    assert one.kind == "sample" and [t.kept for t in one.tiles] == [False, False, True]


def test_zero_records_page_says_so(tmp_path):
    data = tmp_path / "bad"
    (data / "ep").mkdir(parents=True)
    for i in range(2):
        (data / "ep" / f"f{i}.jpg").write_bytes(b"not an image")
    r = run_inproc("build", "--data-root", str(data), "--model", "tiny", "--device", "cpu", "--no-progress",
                   "--num-workers", "0")
    assert r.returncode == 1
    page, _ = _report(data / "vggt_featstore", tmp_path / "z.html")
    assert "the store holds no records: there is no feature map to show" in page
    assert "there is nothing to measure" in page
    prov = _section(page, "provenance")
    assert "Failures: 2" in prov and "ep/f0.jpg" in prov


def test_missing_shards_page_names_them(stores, tmp_path):
    store = shutil.copytree(stores["images"], tmp_path / "store")
    for p in (store / "shards").glob("*.tar"):
        p.unlink()
    page, r = _report(store, tmp_path / "m.html")
    assert "could not read 4 of 4 chosen records" in _section(page, "feature-maps")
    assert "No such file" in page and "no record could be read" in page
    assert "could not be decoded" in r.stderr and "fe398e250e91" in _section(page, "provenance")


def test_legacy_caches_without_manifest(tmp_path):
    data = copy_images(tmp_path / "legacy", drop=9)
    for p in sorted(data.rglob("*.*")):
        torch.save({"features": torch.randn(1, 28 * 37, 32), "path": str(p)}, str(p) + ".vggt_cache.pt")
    page, _ = _report(data, tmp_path / "l.html", "--samples", "2")
    assert "no manifest: a folder of legacy per-image caches" in page
    assert "grid not recorded: inferred" in page and _section(page, "feature-maps").count('class="map figure"') == 2
    prov = _section(page, "provenance")
    for field in ("model", "preprocessing", "precision", "codec"):
        assert f"<td>{field}</td><td class=v>not recorded</td>" in prov
    assert "<td>records</td><td class=v>3</td>" in prov


@pytest.mark.parametrize("argv,expected", [
    (["report", "/nonexistent/store"], "does not exist"),
    (["report", "STORE", "--samples", "0"], "--samples 0"),
    (["report", "STORE", "--recompute", "2"], "add --verify"),
    (["report", "STORE", "-o", "TMP"], "is a folder"),
])
def test_bad_command_lines_are_one_error_line(stores, tmp_path, argv, expected):
    argv = [str(stores["images"]) if a == "STORE" else str(tmp_path) if a == "TMP" else a for a in argv]
    r = run_inproc(*argv)
    assert r.returncode == 2 and r.stderr.startswith("[ERROR] ") and len(r.stderr.splitlines()) == 1, r.stderr
    assert expected in r.stderr


def test_without_matplotlib_one_error_line_says_how_to_install(stores, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    r = run_inproc("report", str(stores["images"]), "-o", str(tmp_path / "x.html"))
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("[ERROR] ") and "pip install 'featstore[report]'" in r.stderr
    assert not (tmp_path / "x.html").exists()
