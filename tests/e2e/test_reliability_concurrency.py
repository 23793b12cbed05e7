"""Concurrency and resource faults: the build lock with real processes, readers during a build, a full
disk (a real tmpfs when we are root), a read-only output and an unreadable data root."""

from __future__ import annotations

import ctypes
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from featstore.formats.layout import LOCK_NAME
from featstore.errors import LockError
from featstore.formats.index import Index
from featstore.build.locks import BuildLock, read_lock
from helpers import REPO, build_args, make_images, run_cli

IS_ROOT = os.geteuid() == 0
pytestmark = pytest.mark.slow  # several real build processes each (about 80 s together)


def popen_build(*args: str, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.Popen([sys.executable, "-m", "featstore", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=e, cwd=str(REPO))


def wait_for(pred, timeout=120.0, proc=None):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(0.02)
    return False


def verify_rc(store: Path) -> tuple[int, str]:
    r = run_cli("verify", str(store), "--no-progress", "--workers", "1")
    return r.returncode, r.stdout + r.stderr


def test_second_build_refuses_naming_the_running_job_then_first_finishes(tmp_path):
    keys = make_images(tmp_path / "d", 8)
    out = tmp_path / "d" / "vggt_featstore"
    first = popen_build(*build_args(tmp_path / "d"))
    try:
        assert wait_for(lambda: (out / LOCK_NAME).is_file() and read_lock(out / LOCK_NAME).get("pid"), proc=first)
        os.kill(first.pid, signal.SIGSTOP)  # hold it mid-build, lock taken
        owner = read_lock(out / LOCK_NAME)
        r = run_cli(*build_args(tmp_path / "d"))
        assert r.returncode == 2
        msg = r.stderr
        assert f"pid {first.pid}" in msg and f"host {socket.gethostname()}" in msg and owner["started"] in msg, msg
        assert "[ERROR] another featstore job is writing" in msg
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    assert not (out / LOCK_NAME).exists()
    rc, text = verify_rc(out)
    assert rc == 0, text
    from featstore import open_store

    assert sorted(open_store(out).keys()) == keys


def test_stale_lock_of_a_killed_build_is_taken_over(tmp_path):
    keys = make_images(tmp_path / "d", 6)
    out = tmp_path / "d" / "vggt_featstore"
    r = run_cli(*build_args(tmp_path / "d"), env={"FEATSTORE_KILL_AT": "record-appended:2"})
    assert r.returncode == -9
    dead = read_lock(out / LOCK_NAME)
    assert dead and dead["host"] == socket.gethostname()
    r = run_cli(*build_args(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert not (out / LOCK_NAME).exists()
    rc, text = verify_rc(out)
    assert rc == 0, text
    assert sorted(Index(out / "index.fsi").keys()) == keys


def _race(directory: str, q) -> None:
    lock = BuildLock(Path(directory))
    try:
        lock.acquire()
    except LockError:
        q.put("refused")
        return
    q.put("won")
    time.sleep(1.0)  # hold it while the others try
    lock.release()


def test_racing_takeover_of_a_stale_lock_has_one_winner(tmp_path):
    # A stale lock (dead pid on this host), then 6 processes try to take it over at the same moment.
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": p.pid, "started": "x"}))
    ctx = multiprocessing.get_context("fork")
    for _ in range(5):
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": p.pid, "started": "x"}))
        q = ctx.Queue()
        procs = [ctx.Process(target=_race, args=(str(tmp_path), q)) for _ in range(6)]
        for pr in procs:
            pr.start()
        for pr in procs:
            pr.join(30)
        results = sorted(q.get() for _ in procs)
        assert results.count("won") == 1, results


def test_readers_during_a_build_see_a_consistent_earlier_state(tmp_path):
    from featstore import open_store, stream

    first = make_images(tmp_path / "d", 8, seed=1)
    out = tmp_path / "d" / "vggt_featstore"
    assert run_cli(*build_args(tmp_path / "d", "--shard-size", "1MB")).returncode == 0
    make_images(tmp_path / "d", 16, prefix="more", seed=2)
    b = popen_build(*build_args(tmp_path / "d", "--shard-size", "1MB"))
    seen_sizes, samples = set(), 0
    try:
        while b.poll() is None:
            time.sleep(0.15)
            if b.poll() is not None:
                break
            os.kill(b.pid, signal.SIGSTOP)
            try:
                store = open_store(out)
                keys = store.keys()
                seen_sizes.add(len(keys))
                assert set(first) <= set(keys)
                for k in keys:  # every indexed record is complete and passes its checksum
                    assert store.record(k).features.numel() > 0
                store.close()
                assert sorted(s["key"] for s in stream(out, shuffle=False)) == sorted(keys)
                samples += 1
            finally:
                os.kill(b.pid, signal.SIGCONT)
    finally:
        if b.poll() is None:
            b.kill()
    assert b.wait() == 0, b.stdout.read()
    assert samples >= 3 and seen_sizes <= {8, 24}, (samples, seen_sizes)
    assert len(open_store(out).keys()) == 24


def test_verify_during_a_build_reports_it_in_progress(tmp_path):
    make_images(tmp_path / "d", 6)
    out = tmp_path / "d" / "vggt_featstore"
    assert run_cli(*build_args(tmp_path / "d")).returncode == 0
    make_images(tmp_path / "d", 6, prefix="more", seed=3)
    b = popen_build(*build_args(tmp_path / "d"))
    try:
        assert wait_for(lambda: (out / LOCK_NAME).is_file(), proc=b)
        os.kill(b.pid, signal.SIGSTOP)
        held = (out / LOCK_NAME).is_file()  # stopped: it can no longer finish and release the lock
        rc, text = verify_rc(out)
    finally:
        os.kill(b.pid, signal.SIGCONT)
    assert b.wait(timeout=300) == 0
    if held:  # the build is running: verify says so (exit 1), and finds no torn or corrupt record
        assert rc == 1 and "a build is running or was interrupted" in text and "corrupt           0" in text, text
    else:  # the build finished between seeing its lock and stopping it: the store verifies
        assert rc == 0, text
    rc, text = verify_rc(out)
    assert rc == 0, text


# --- resource faults ---------------------------------------------------------------------------------------

def _mount_tmpfs(where: Path, size: str, ro: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    mnt = tmp_path / "small"
    if not IS_ROOT or not _mount_tmpfs(mnt, "2M"):
        pytest.skip("needs root to mount a real 2 MB tmpfs (see test_disk_full_injected for the fallback)")
    yield mnt
    _umount(mnt)


@pytest.mark.parametrize("fmt", ["shards", "per-image"])
def test_disk_full_on_a_real_small_filesystem_then_resume(tmp_path, small_fs, fmt):
    keys = make_images(tmp_path / "d", 12)
    out = small_fs / "store"
    args = build_args(tmp_path / "d", "--format", fmt, "--out", str(out), "--shard-size", "1MB")
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("[ERROR] disk full")]
    assert err, r.stderr[-3000:]
    assert str(out) in err[0] and "needs" in err[0] and "bytes free there" in err[0], err[0]
    assert "Traceback" not in r.stderr
    # No torn file visible: no temporary files, and every visible file decodes.
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    from featstore.formats.perimage import read_pt
    from featstore.formats.shards import list_shards, scan_shard

    for s in list_shards(out / "shards"):
        scan_shard(out / "shards" / s)
    for p in out.rglob("*.vggt_cache.pt"):
        read_pt(p)
    assert subprocess.run(["mount", "-o", "remount,size=64M", str(small_fs)]).returncode == 0
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    rc, text = verify_rc(out)
    assert rc == 0, text
    from featstore import open_store

    assert sorted(open_store(out).keys()) == keys


def test_read_only_output_fails_before_any_work(tmp_path):
    make_images(tmp_path / "d", 2)
    ro = tmp_path / "ro"
    mounted = IS_ROOT and _mount_tmpfs(ro, "1M", ro=True)
    if not mounted:
        if IS_ROOT:
            pytest.skip("root without a read-only mount cannot make an unwritable folder")
        ro.mkdir()
        ro.chmod(0o555)
    try:
        for fmt in ("shards", "per-image"):
            r = run_cli(*build_args(tmp_path / "d", "--format", fmt, "--out", str(ro / "store")))
            assert r.returncode == 2, r.stderr
            assert "Traceback" not in r.stderr and str(ro / "store") in r.stderr and "writable" in r.stderr, r.stderr
            assert "Processing" not in r.stderr  # before any work
    finally:
        if mounted:
            _umount(ro)


def _drop_dac_capabilities() -> None:
    # Root ignores file modes through CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH; drop them from the bounding
    # set so the exec'd build obeys mode 000 like any user would.
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_cli_as_user(*args: str) -> subprocess.CompletedProcess:
    """run_cli, but as a process that file permissions apply to (root with DAC capabilities dropped)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "featstore", *args], capture_output=True, text=True, env=env,
                          cwd=str(REPO), timeout=300, preexec_fn=_drop_dac_capabilities if IS_ROOT else None)


def test_unreadable_data_root_fails_before_any_work(tmp_path):
    make_images(tmp_path / "d", 2)
    (tmp_path / "d").chmod(0o000)
    try:
        r = run_cli_as_user(*build_args(tmp_path / "d", "--out", str(tmp_path / "out")))
    finally:
        (tmp_path / "d").chmod(0o755)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(tmp_path / "d") in r.stderr and "readable" in r.stderr, r.stderr
    assert "Processing" not in r.stderr
