"""verify against the build's recorded sources, checks it did not run, fix hints that work, undecodable images,
--json -, and --recompute with the manifest's model (issue 8)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest

from featstore.formats.manifest import read_manifest
from helpers import build_args, make_images, run_inproc, write_jsonl
from helpers import problem_keys, run_verify


@pytest.fixture(scope="module")
def small_store(tmp_path_factory) -> Path:
    """A shard store of 3 scanned images (copy it before changing it)."""
    root = tmp_path_factory.mktemp("small")
    make_images(root / "d", 3)
    assert run_inproc(*build_args(root / "d", "--out", str(root / "store"))).returncode == 0
    return root / "store"


def annotated_root(root: Path) -> list[str]:
    """10 images, 6 of them named by annotations in subfolders (one through data_path), plus a missing one."""
    keys = make_images(root, 10)
    (root / "R2R").mkdir()
    (root / "R2R" / "annotations.json").write_text(json.dumps([{"images": keys[:3]}, {"image": keys[3]}]))
    rel = [k.split("/", 1)[1] for k in keys[4:6]]  # ep1/... -> relative to the data_path folder
    write_jsonl(root / "seed" / "train.jsonl", [{"data_path": "ep1", "images": rel},
                                                 {"image": "nowhere/x.png"}])
    return keys[:6]


def test_verify_compares_with_the_recorded_sources(tmp_path):
    data = tmp_path / "d"
    wanted = annotated_root(data)
    assert run_inproc(*build_args(data, "--format", "per-image")).returncode == 0
    assert run_inproc(*build_args(data, "--out", str(tmp_path / "store"))).returncode == 0
    for store in (data, tmp_path / "store"):
        rc, rep = run_verify(store, tmp_path)
        assert rc == 0, rep["problems"]
        assert rep["counts"]["listed_images"] == len(wanted) and "missing" not in rep["skipped"]
        assert rep["info"]["annotated images that do not exist (each listed in "
                           + read_manifest(sorted(store.glob("*manifest.json"))[0])["missing_ledger"] + ")"] == 1
    # An annotated image without its feature is found; unreferenced images never count.
    (data / f"{wanted[4]}.vggt_cache.pt").unlink()
    rc, rep = run_verify(data, tmp_path)
    assert rc == 1 and problem_keys(rep, "missing") == {wanted[4]}, rep["problems"]


def test_checks_that_did_not_run_are_skipped_not_ok(small_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(small_store, store)
    m = json.loads((store / "manifest.json").read_text())
    m["sources"] = None  # a store from before sources were recorded
    (store / "manifest.json").write_text(json.dumps(m))
    r = run_inproc("verify", str(store), "--no-progress")
    assert r.returncode == 0, r.stdout
    lines = {ln.split()[1]: ln.split()[0] for ln in r.stdout.splitlines() if ln.startswith("  ")
             and len(ln.split()) > 2 and ln.split()[0] in ("ok", "skipped", "FAIL")}
    assert lines["missing"] == "skipped" and lines["recompute"] == "skipped" and lines["corrupt"] == "ok", r.stdout
    rc, rep = run_verify(store, tmp_path)
    assert set(rep["skipped"]) == {"missing", "recompute"} and "--data-root" in rep["skipped"]["missing"]
    rc, rep = run_verify(store, tmp_path, "--data-root", m["data_root"], "--recompute", "1")
    assert rc == 0 and rep["skipped"] == {} and rep["counts"]["listed_images"] == 3, rep


def test_fix_hint_reproduces_non_default_settings_and_works(tmp_path):
    data = tmp_path / "d"
    keys = make_images(data, 4)
    write_jsonl(data / "lists" / "train.jsonl", [{"images": keys[:3]}])
    settings = ["--preprocess", "pad", "--layers=-1,0", "--tokens", "all", "--hash-inputs", "--dtype", "bfloat16",
                "--annotations", str(data / "lists" / "train.jsonl")]
    store = tmp_path / "store"
    assert run_inproc(*build_args(data, "--out", str(store), *settings)).returncode == 0
    (data / keys[0]).write_bytes((data / keys[3]).read_bytes())  # new content: stale
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "stale") == {keys[0]}
    fix = next(p["fix"] for p in rep["problems"] if p["kind"] == "stale")
    command = shlex.split(fix.split("`")[1])
    for flag in ("--preprocess", "pad", "--layers=1,0", "--tokens", "all", "--hash-inputs", "--dtype", "bfloat16",
                 "--annotations", "--rebuild-stale"):
        assert flag in command, fix
    assert command[:2] == ["featstore", "build"]
    r = run_inproc(*command[1:], "--device", "cpu", "--num-workers", "0", "--no-progress")
    assert r.returncode == 0 and "stale rebuilt 1" in r.stderr, r.stderr
    rc, rep = run_verify(store, tmp_path)
    assert rc == 0, rep["problems"]


def test_undecodable_images_are_reported_as_such(tmp_path):
    data = tmp_path / "d"
    keys = make_images(data, 4)
    (data / "ep9").mkdir()
    (data / "ep9" / "broken.png").write_text("not a png")
    assert run_inproc(*build_args(data, "--format", "per-image", "--allow-failures", "1")).returncode == 0
    good = (data / keys[1]).read_bytes()
    (data / keys[1]).write_bytes(good[: len(good) // 4])  # truncated after the build: not in the ledger
    (data / f"{keys[1]}.vggt_cache.pt").unlink()
    rc, rep = run_verify(data, tmp_path)
    assert rc == 1 and problem_keys(rep, "undecodable") == {"ep9/broken.png", keys[1]}, rep["problems"]
    assert problem_keys(rep, "missing") == set()
    for p in (p for p in rep["problems"] if p["kind"] == "undecodable"):
        assert "cannot be decoded" in p["message"] and p["fix"].startswith("replace the image")


def test_json_to_stdout_and_bare_json_is_an_error(small_store, tmp_path):
    store = small_store
    r = run_inproc("verify", str(store), "--json", "-", "--no-progress")
    assert r.returncode == 0
    doc = json.loads(r.stdout)
    assert doc["ok"] and doc["records_checked"] == 3 and "OK: every check passed" in r.stderr
    r = run_inproc("verify", str(store), "--no-progress", "--json")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("[ERROR] --json needs a value: give a file path for the report, or - to write it "
                                "to stdout")
    r = run_inproc("verify", str(tmp_path / "nowhere"), "--json", "-")
    assert r.returncode == 2 and json.loads(r.stdout)["exit_code"] == 2


def test_recompute_uses_the_manifests_model(small_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(small_store, store)
    rc, rep = run_verify(store, tmp_path, "--recompute", "2")
    assert rc == 0 and rep["recompute"]["checked"] == 2, rep
    assert any("manifest's model tiny" in n for n in rep["notes"])
    m = json.loads((store / "manifest.json").read_text())
    m["vggt_model_path"] = str(tmp_path / "gone" / "VGGT-1B")
    (store / "manifest.json").write_text(json.dumps(m))
    r = run_inproc("verify", str(store), "--recompute", "2", "--no-progress")
    assert r.returncode == 2 and "--recompute needs --model PATH" in r.stderr and "gone/VGGT-1B" in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]) == 1


@pytest.mark.parametrize("bad", [["--workers", "0"], ["--sample", "0"], ["--recompute", "-1"]])
def test_bad_verify_numbers(tmp_path, bad):
    r = run_inproc("verify", str(tmp_path), *bad)
    assert r.returncode == 2 and r.stderr.startswith(f"[ERROR] {bad[0]} {bad[1]}: expected an integer"), r.stderr


def test_orphan_feature_whose_image_left_the_annotations(tmp_path):
    data = tmp_path / "d"
    keys = make_images(data, 3)
    ann = data / "lists" / "train.jsonl"
    write_jsonl(ann, [{"images": keys}])
    store = tmp_path / "store"
    assert run_inproc(*build_args(data, "--out", str(store), "--annotations", str(ann))).returncode == 0
    write_jsonl(ann, [{"images": keys[:2]}])  # the third image still exists, unchanged, but nothing lists it
    rc, rep = run_verify(store, tmp_path)
    assert rc == 1 and problem_keys(rep, "orphan") == {keys[2]}, rep["problems"]
    assert next(p for p in rep["problems"] if p["kind"] == "orphan")["message"].endswith("not in the source listing")


def test_bad_verify_device_is_one_error_line(tmp_path):
    r = run_inproc("verify", str(tmp_path), "--device", "gpu")
    assert r.returncode == 2 and r.stderr.startswith("[ERROR] --device gpu: not a device"), r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stdout == ""


def test_recompute_runs_on_the_chosen_device(small_store, tmp_path):
    import torch

    r = run_inproc("verify", str(small_store), "--recompute", "1", "--device", "cuda", "--json", "-", "--no-progress")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["recompute"]["checked"] == 1, r.stderr
    if torch.cuda.is_available():
        assert doc["recompute"]["device"] == "cuda"
    else:
        assert doc["recompute"]["device"] == "cpu" and "falling back to cpu" in r.stderr
    r = run_inproc("verify", str(small_store), "--recompute", "1", "--json", "-", "--no-progress")
    assert r.returncode == 0 and json.loads(r.stdout)["recompute"]["device"] == "cpu"  # the default
