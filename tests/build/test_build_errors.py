"""Bad flags, environment values, checkpoints and output folders: one [ERROR] line naming the value and the fix,
exit 2, nothing left behind; an empty store never locks its settings (issue 8)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from featstore.formats.manifest import read_manifest
from helpers import REPO, build_args, make_images, run_inproc

IS_ROOT = os.geteuid() == 0
BASE = ["--no-progress", "--num-workers", "0"]


def tree(root: Path) -> dict[str, int]:
    """Every file and folder under root, with each file's mtime (to prove nothing was written)."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else 0 for p in root.rglob("*")}


def the_error(r: subprocess.CompletedProcess) -> str:
    """The single [ERROR] line of a failed run (and no traceback)."""
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR]")]
    assert len(errors) == 1, r.stderr
    return errors[0]


CASES = {
    "layers-out-of-range": (["--layers", "99"], {}, ["--layers 99", "out of range", "use -2..1"]),
    "layers-repeated": (["--layers", "0,0"], {}, ["--layers 0,0", "requested twice"]),
    "layers-not-numbers": (["--layers", "x"], {}, ["--layers", "'x'", "comma-separated integers"]),
    "num-workers": (["--num-workers", "-1"], {}, ["--num-workers=-1", "at least 0"]),
    "zstd-level": (["--zstd-level", "99"], {}, ["--zstd-level 99", "from 1 to 22"]),
    "batch-size-flag": (["--batch-size", "0"], {}, ["--batch-size 0", "at least 1"]),
    "device-env": ([], {"DEVICE": "gpu"}, ["DEVICE=gpu", "use cpu, cuda or cuda:N"]),
    "device-flag": (["--device", "gpu"], {"DEVICE": "cpu"}, ["--device gpu", "use cpu, cuda or cuda:N"]),
    "batch-size-env": ([], {"BATCH_SIZE": "abc"}, ["BATCH_SIZE='abc'", "not an integer", "--batch-size"]),
    "skip-existing-env": ([], {"SKIP_EXISTING": "maybe"}, ["SKIP_EXISTING='maybe'", "true or false"]),
    "part": (["--num-parts", "2", "--part", "2"], {}, ["--part 2", "from 0 to 1"]),
    "rank-env": ([], {"RANK": "3", "WORLD_SIZE": None}, ["RANK=3 is outside WORLD_SIZE=1", "unset"]),
    "world-size-env": ([], {"WORLD_SIZE": "two"}, ["WORLD_SIZE='two'", "not an integer", "torchrun"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_value_is_one_error_line_and_leaves_nothing(tmp_path, case):
    flags, env, expected = CASES[case]
    data = tmp_path / "d"
    make_images(data, 2)
    out = tmp_path / "store"
    args = ["build", "--data-root", str(data), "--model", "tiny", *BASE, "--out", str(out)]
    if "DEVICE" not in env:
        args += ["--device", "cpu"]
    env = {"DEVICE": None, "BATCH_SIZE": None, "SKIP_EXISTING": None, **env}
    before = tree(tmp_path)
    line = the_error(run_inproc(*args, *flags, env=env))
    for text in expected:
        assert text in line, line
    assert tree(tmp_path) == before and not out.exists()


def test_a_flag_wins_over_a_bad_environment_value(tmp_path):
    data = tmp_path / "d"
    make_images(data, 1)
    r = run_inproc(*build_args(data), env={"BATCH_SIZE": "abc", "SKIP_EXISTING": "maybe", "DEVICE": "gpu"})
    assert r.returncode == 2 and "SKIP_EXISTING" in the_error(r)  # --batch-size and --device were given
    r = run_inproc(*build_args(data, "--skip-existing"), env={"BATCH_SIZE": "abc", "SKIP_EXISTING": "maybe"})
    assert r.returncode == 0, r.stderr


def test_bad_values_into_an_existing_store_change_nothing(tmp_path):
    data = tmp_path / "d"
    make_images(data, 3)
    assert run_inproc(*build_args(data)).returncode == 0
    before = tree(tmp_path)
    for flags in (["--layers", "99"], ["--zstd-level", "0"], ["--layers", "1,-1"]):
        the_error(run_inproc(*build_args(data, *flags)))
    assert tree(tmp_path) == before


def test_messages_name_the_flag_or_variable_the_user_set(tmp_path):
    data = tmp_path / "d"
    make_images(data, 1)
    gone = tmp_path / "no-model"
    line = the_error(run_inproc(*build_args(data)[:3], "--model", str(gone), *BASE))
    assert line.startswith(f"[ERROR] --model {gone} not found") and "--model tiny" in line
    line = the_error(run_inproc("build", "--data-root", str(data), *BASE, env={"VGGT_MODEL_PATH": str(gone)}))
    assert line.startswith(f"[ERROR] VGGT_MODEL_PATH={gone} not found")
    line = the_error(run_inproc("build", "--model", "tiny", *BASE, env={"DATA_ROOT": str(tmp_path / "nope")}))
    assert line.startswith(f"[ERROR] DATA_ROOT={tmp_path / 'nope'} is not a readable directory")
    line = the_error(run_inproc("build", "--model", "tiny", *BASE, env={"DATA_ROOT": None}))
    assert "--data-root is required" in line and "DATA_ROOT" in line


def test_unreadable_checkpoint(tmp_path):
    data = tmp_path / "d"
    make_images(data, 2)
    ckpt = tmp_path / "VGGT-1B"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(os.urandom(4096))
    line = the_error(run_inproc(*build_args(data, "--model", str(ckpt))))
    assert str(ckpt / "model.pt") in line and "corrupt or truncated" in line and "re-download" in line
    assert not (data / "vggt_featstore").exists()
    (ckpt / "model.pt").unlink()
    line = the_error(run_inproc(*build_args(data, "--model", str(ckpt))))
    assert f"VGGT checkpoint not found in directory {ckpt}" in line


def _mount_ro_tmpfs(where: Path) -> bool:
    where.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M,ro", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def test_read_only_output_folder(tmp_path):
    data = tmp_path / "d"
    make_images(data, 2)
    ro = tmp_path / "ro"
    mounted = IS_ROOT and _mount_ro_tmpfs(ro)
    if not mounted:
        if IS_ROOT:
            pytest.skip("root without a read-only mount cannot make an unwritable folder")
        ro.mkdir(exist_ok=True)
        ro.chmod(0o555)
    try:
        for out in (ro, ro / "store"):
            for fmt in ("shards", "per-image"):
                line = the_error(run_inproc(*build_args(data, "--format", fmt, "--out", str(out))))
                assert f"output folder {out} is not writable" in line and "choose a writable --out" in line
        assert list(ro.iterdir()) == []
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], capture_output=True)


def test_an_empty_store_never_locks_its_settings(tmp_path):
    """Bug: a build that stored nothing (every image failed) still refused a rerun with other settings."""
    data = tmp_path / "d"
    data.mkdir()
    (data / "bad.png").write_text("not an image")
    for fmt, manifest in (("shards", tmp_path / "store" / "manifest.json"),
                          ("per-image", tmp_path / "caches" / "vggt_cache_manifest.json")):
        out = str(manifest.parent)
        r = run_inproc(*build_args(data, "--format", fmt, "--out", out, "--dtype", "float32"))
        assert r.returncode == 1 and read_manifest(manifest)["processed_images"] == 0, r.stderr
        (data / "good.png").write_bytes((tmp_path / "src" / make_images(tmp_path / "src", 1)[0]).read_bytes())
        r = run_inproc(*build_args(data, "--format", fmt, "--out", out, "--dtype", "bfloat16",
                                   "--allow-failures", "1"))
        assert r.returncode == 0 and "processed 1" in r.stderr, r.stderr
        m = read_manifest(manifest)
        assert m["dtype"] == "bfloat16" and m["processed_images"] == 1
        # A store with records does lock them.
        line = the_error(run_inproc(*build_args(data, "--format", fmt, "--out", out, "--dtype", "float32")))
        assert "built with other settings" in line and "dtype" in line
        (data / "good.png").unlink()


@pytest.mark.parametrize("unset", ["VGGT_MODEL_PATH", "DATA_ROOT"])
def test_run_precompute_script_errors_in_the_same_style(tmp_path, unset):
    env = {k: v for k, v in os.environ.items() if k not in ("VGGT_MODEL_PATH", "DATA_ROOT")}
    env.update({"VGGT_MODEL_PATH": "tiny", "DATA_ROOT": str(tmp_path)})
    del env[unset]
    r = subprocess.run(["bash", str(REPO / "tools" / "run_precompute.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(f"[ERROR] {unset} is not set: set it to ") and len(r.stderr.splitlines()) == 1


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the fallback warning needs a machine without CUDA")
def test_cpu_fallback_warning_names_what_the_user_set(tmp_path):
    data = tmp_path / "d"
    make_images(data, 1)
    args = ["build", "--data-root", str(data), "--model", "tiny", *BASE]
    r = run_inproc(*args, "--device", "cuda:0", env={"DEVICE": None})
    assert r.returncode == 0 and "[WARN] --device cuda:0 requested but no CUDA GPU" in r.stderr, r.stderr
    r = run_inproc(*args, env={"DEVICE": "cuda"})
    assert r.returncode == 0 and "[WARN] DEVICE=cuda requested but no CUDA GPU" in r.stderr, r.stderr
