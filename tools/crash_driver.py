"""SIGKILL a featstore build (and export) at many instants, resume after each, and prove nothing was lost.

For each scenario the driver builds a reference store without interruption, then builds the same images
into a second store while killing the process with SIGKILL at a schedule of crash points (see
``featstore/faults.py``), resuming after every kill. At the end it checks:

* ``featstore verify`` exits 0 on the resumed store;
* every key is present exactly once (index / cache files, and every shard member decodes);
* no temporary file is visible;
* every tensor equals the reference build's. The tiny model on CPU in fp32 is batch-invariant in
  practice, so equality is checked bit for bit; if a platform's kernels are not, ``--atol`` allows the
  fp32 rounding that a different batch composition causes, and the worst difference is reported.

Scenarios: ``shards`` (20 kills spread over the build: before any work, while a record is appended to a
temporary shard, while a shard is closed and renamed, between batches, while rank 0 writes the part
index, the index and the manifest, and before it cleans up), ``per-image`` (8 kills) and ``export``
(shards -> per-image, 4 kills; then per-image -> shards, 2 kills).

By default each run is a ``fork()`` of this (already imported) driver calling ``featstore.cli.main.main``,
a real process killed with a real SIGKILL but without paying the import of torch each time;
``--spawn`` runs ``python -m featstore`` instead. Usage::

    python tools/crash_driver.py --work /tmp/crash [--scenario all|shards|per-image|export] [--json out.json]

Exit status 0 when every check held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Kill schedules. Data-phase instants come first (each run still makes some progress), merge-phase ones last.
# atomic-before-rename:1 is build.json (before any work); in a run that reaches the merge, the atomic writes
# are build.json, part index, part summary, index.fsi, failures ledger, manifest.json (so :4 and :6 land on
# the rename of the store's index and manifest: the runs they kill have nothing left to build, so they write no
# build_stats/rank-*.json, which a run with a data loop writes after its last record).
SHARD_KILLS = [
    "atomic-before-rename:1", "record-appended:1", "shard-opened:1", "shard-before-rename:1",
    "shard-after-rename:1", "batch-queued:1", "record-appended:3", "shard-tar-closed:2",
    "shard-before-rename:2", "shard-after-rename:2", "batch-queued:3", "shard-opened:3",
    "shard-after-rename:3", "record-appended:5",
    "part-index-written", "merge-before-index", "atomic-before-rename:4", "merge-before-manifest",
    "atomic-before-rename:6", "merge-before-cleanup",
]
PER_IMAGE_KILLS = [
    "atomic-before-rename:1", "per-image-written:1", "batch-queued:1", "per-image-written:3",
    "atomic-before-rename:4", "batch-queued:2", "per-image-written:5", "part-index-written",
]
EXPORT_PER_IMAGE_KILLS = ["atomic-before-rename:1", "atomic-before-rename:3", "atomic-before-rename:6",
                          "atomic-before-rename:2"]
EXPORT_SHARD_KILLS = ["shard-before-rename:1", "atomic-before-rename:1"]


def make_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """Write ``n`` small random PNG images in two shapes under ``root``; returns their keys."""
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(seed)
    keys = []
    for i in range(n):
        key = f"ep{i // 5}/frame {i % 5:03d}.png"
        p = root / key
        p.parent.mkdir(parents=True, exist_ok=True)
        w, h = (70, 56) if i % 3 else (56, 70)
        Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        keys.append(key)
    return sorted(keys)


class Runner:
    """Runs ``featstore`` CLI commands as real processes (forked or spawned), optionally with a kill point."""

    def __init__(self, logdir: Path, spawn: bool = False):
        self.logdir, self.spawn, self.n = logdir, spawn, 0
        logdir.mkdir(parents=True, exist_ok=True)
        if not spawn:
            import featstore.cli.main  # noqa: F401  - import once, before any fork

    def __call__(self, argv: list[str], kill_at: str | None = None) -> tuple[int, str]:
        """Run one command; returns (exit status, or -9 when killed; its log text)."""
        self.n += 1
        log = self.logdir / f"{self.n:03d}-{argv[0]}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        env.pop("FEATSTORE_KILL_AT", None)
        if kill_at:
            env["FEATSTORE_KILL_AT"] = kill_at
        if self.spawn:
            with open(log, "w") as f:
                rc = subprocess.run([sys.executable, "-m", "featstore", *argv], stdout=f, stderr=subprocess.STDOUT,
                                    env=env, cwd=str(REPO)).returncode
            return rc, log.read_text()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # child: a fresh featstore process from here on
            code = 70
            try:
                os.environ.clear()
                os.environ.update(env)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                from featstore.cli.main import main

                code = main(argv)
            except BaseException:  # noqa: BLE001 - report, then leave without running the parent's atexit
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return rc, log.read_text()


    def call(self, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in a forked child (JSON result): the driver itself never runs torch, so forks stay safe."""
        if self.spawn:
            return fn(*args)
        self.n += 1
        res_path = self.logdir / f"{self.n:03d}-{fn.__name__}.json"
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                res_path.write_text(json.dumps(fn(*args), default=str))
                code = 0
            except BaseException:  # noqa: BLE001
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise SystemExit(f"check {fn.__name__} failed in its process (status {status})")
        return json.loads(res_path.read_text())


def build_argv(data: Path, out: Path, fmt: str, shard_size: str) -> list[str]:
    """The build command every run of a scenario uses (the reference build too)."""
    return ["build", "--data-root", str(data), "--out", str(out), "--format", fmt, "--model", "tiny", "--device",
            "cpu", "--no-progress", "--num-workers", "0", "--batch-size", "4", "--writer-threads", "2",
            "--shard-size", shard_size]


def kill_series(run: Runner, argv: list[str], kills: list[str], note: list[dict[str, Any]]) -> None:
    """Run ``argv`` once per kill point (each a resume of the last), then once to completion."""
    for spec in kills:
        t = time.time()
        rc, text = run(argv, spec)
        note.append({"kill_at": spec, "rc": rc, "killed": rc == -signal.SIGKILL, "seconds": round(time.time() - t, 2)})
        if rc not in (0, -signal.SIGKILL):
            note[-1]["log_tail"] = text[-1500:]
    rc, text = run(argv)
    note.append({"kill_at": None, "rc": rc, "killed": False, "log_tail": text[-800:] if rc else ""})


def temp_files(root: Path) -> list[str]:
    """Temporary files left visible under ``root``."""
    from featstore.runtime.fsutil import is_temp_name

    return [str(p) for p in root.rglob("*") if is_temp_name(p.name)]


def compare_stores(ref: Path, got: Path, atol: float) -> dict[str, Any]:
    """Compare every tensor of two stores: keys, bit equality, and the worst absolute difference."""
    import torch

    from featstore import open_store

    a, b = open_store(ref), open_store(got)
    ka, kb = sorted(a.keys()), sorted(b.keys())
    res: dict[str, Any] = {"keys_ref": len(ka), "keys": len(kb), "same_keys": ka == kb, "bit_exact": 0,
                           "max_abs_diff": 0.0, "mismatched": []}
    for k in set(ka) & set(kb):
        ra, rb = a.record(k), b.record(k)
        ok_all = list(ra.tensors) == list(rb.tensors)
        exact = ok_all
        for n, ta in ra.tensors.items():
            tb = rb.tensors.get(n)
            if tb is None or tb.dtype != ta.dtype or tb.shape != ta.shape:
                ok_all = exact = False
                continue
            if not torch.equal(ta, tb):
                exact = False
                d = float((ta.double() - tb.double()).abs().max())
                res["max_abs_diff"] = max(res["max_abs_diff"], d)
                ok_all = ok_all and d <= atol
        res["bit_exact"] += exact
        if not ok_all:
            res["mismatched"].append(k)
    a.close()
    b.close()
    return res


def shard_members_once(store: Path) -> dict[str, Any]:
    """Every member of every shard decodes; the index names each key once, pointing at a live member."""
    import tarfile

    from featstore.formats.index import Index
    from featstore.formats.keys import key_from_member
    from featstore.formats.shards import list_shards

    ix = Index(store / "index.fsi")
    keys = ix.keys()
    members: list[str] = []
    for s in list_shards(store / "shards"):
        with tarfile.open(store / "shards" / s) as t:
            members += [key_from_member(n) or n for n in t.getnames()]
    return {"index_keys": len(keys), "index_unique": len(set(keys)) == len(keys), "members": len(members),
            "members_unique": len(set(members)) == len(members)}


def verify_rc(run: Runner, store: Path) -> int:
    """Exit status of ``featstore verify`` on ``store``."""
    rc, text = run(["verify", str(store), "--no-progress", "--workers", "1"])
    if rc != 0:
        print(text[-3000:], file=sys.stderr)
    return rc


def scenario_build(run: Runner, work: Path, fmt: str, n_images: int, kills: list[str], atol: float) -> dict[str, Any]:
    """Reference build, then the killed-and-resumed build of the same images; returns the findings."""
    data = work / f"data-{fmt}"
    keys = make_images(data, n_images)
    shard_size = "1MB"
    ref, out = work / f"ref-{fmt}", work / f"crash-{fmt}"
    rc, text = run(build_argv(data, ref, fmt, shard_size))
    if rc != 0:
        raise SystemExit(f"reference build failed ({rc}):\n{text[-3000:]}")
    runs: list[dict[str, Any]] = []
    kill_series(run, build_argv(data, out, fmt, shard_size), kills, runs)
    res: dict[str, Any] = {"scenario": fmt, "images": n_images, "runs": runs,
                           "kills_planned": len(kills), "kills_done": sum(r["killed"] for r in runs),
                           "final_rc": runs[-1]["rc"], "temp_files": temp_files(out),
                           "verify_rc": verify_rc(run, out), "expected_keys": keys}
    res.update(compare=run.call(compare_stores, ref, out, atol))
    if fmt == "shards":
        res.update(members=run.call(shard_members_once, out))
    else:
        caches = sorted(str(p.relative_to(out))[: -len(".vggt_cache.pt")] for p in out.rglob("*.vggt_cache.pt"))
        res.update(cache_files=len(caches), cache_keys_ok=caches == keys)
    return res


def scenario_export(run: Runner, work: Path, shard_store: Path, atol: float) -> dict[str, Any]:
    """Kill ``featstore export`` in both directions, re-run, verify, and compare bit for bit with the source."""
    out_pi, out_sh = work / "export-per-image", work / "export-shards"
    runs: list[dict[str, Any]] = []
    kill_series(run, ["export", str(shard_store), "--format", "per-image", "--out", str(out_pi)],
                EXPORT_PER_IMAGE_KILLS, runs)
    res: dict[str, Any] = {"scenario": "export", "runs_per_image": runs,
                           "kills_done": sum(r["killed"] for r in runs), "final_rc": runs[-1]["rc"],
                           "temp_files": temp_files(out_pi), "verify_rc": verify_rc(run, out_pi),
                           "compare": run.call(compare_stores, shard_store, out_pi, atol)}
    # per-image -> shards: a killed export leaves a partial store that a re-run refuses to overwrite
    # (export into an empty folder); the documented recovery is to delete the folder and export again.
    runs2: list[dict[str, Any]] = []
    argv = ["export", str(out_pi), "--format", "shards", "--out", str(out_sh), "--shard-size", "1MB"]
    for spec in EXPORT_SHARD_KILLS:
        rc, _ = run(argv, spec)
        rc2, text = run(argv)
        runs2.append({"kill_at": spec, "rc": rc, "killed": rc == -signal.SIGKILL, "rerun_rc": rc2,
                      "rerun_refused": rc2 == 2 and "already holds a shard store" in text,
                      "rerun_temp_files": temp_files(out_sh) if rc2 == 0 else []})
        shutil.rmtree(out_sh, ignore_errors=True)
    rc, _ = run(argv)
    res.update(runs_shards=runs2, shards_final_rc=rc, shards_temp_files=temp_files(out_sh),
               shards_verify_rc=verify_rc(run, out_sh), shards_compare=run.call(compare_stores, shard_store, out_sh, atol))
    res["kills_done"] += sum(r["killed"] for r in runs2)
    return res


def problems_of(res: dict[str, Any]) -> list[str]:
    """Everything that did not hold in one scenario's findings."""
    p = []
    if res.get("kills_done", 0) < 0.9 * res.get("kills_planned", 0):
        p.append(f"only {res['kills_done']} of {res['kills_planned']} planned kills happened")
    for k in ("final_rc", "verify_rc", "shards_final_rc", "shards_verify_rc"):
        if res.get(k, 0) != 0:
            p.append(f"{k} = {res[k]}")
    for k in ("temp_files", "shards_temp_files"):
        if res.get(k):
            p.append(f"{k}: {res[k][:3]}")
    for r in res.get("runs_shards", []):
        if r["rerun_temp_files"] or r["rerun_rc"] not in (0, 2) or (r["rerun_rc"] == 2 and not r["rerun_refused"]):
            p.append(f"export --format shards re-run after a kill at {r['kill_at']}: {r}")
    for k in ("compare", "shards_compare"):
        c = res.get(k)
        if c and (not c["same_keys"] or c["mismatched"]):
            p.append(f"{k}: same_keys={c['same_keys']} mismatched={c['mismatched'][:3]}")
    m = res.get("members")
    if m and not (m["index_unique"] and m["members_unique"] and m["index_keys"] == len(res["expected_keys"])):
        p.append(f"shard members/index not exactly once: {m}")
    if "cache_keys_ok" in res and not res["cache_keys_ok"]:
        p.append("per-image cache files differ from the image keys")
    if res.get("compare") and "expected_keys" in res and res["compare"]["keys"] != len(res["expected_keys"]):
        p.append(f"store has {res['compare']['keys']} keys, expected {len(res['expected_keys'])}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; print a summary; exit 0 when every check held."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (emptied first)")
    ap.add_argument("--scenario", choices=("all", "shards", "per-image", "export"), default="all",
                    help="which scenarios to run (export needs the shards scenario's store and runs it too)")
    ap.add_argument("--images", type=int, default=48, help="images in the shard scenario (per-image uses half)")
    ap.add_argument("--kills", type=int, default=len(SHARD_KILLS),
                    help="use the first K kill points of each schedule (merge-phase points are always kept)")
    ap.add_argument("--atol", type=float, default=0.0,
                    help="allowed absolute difference from the reference (0: bit exact)")
    ap.add_argument("--spawn", action="store_true", help="run `python -m featstore` per command instead of fork()")
    ap.add_argument("--json", type=Path, help="write the findings here")
    args = ap.parse_args(argv)

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    run = Runner(args.work / "logs", spawn=args.spawn)
    t0 = time.time()

    def pick(kills: list[str], merge_tail: int) -> list[str]:
        data, tail = kills[:-merge_tail] if merge_tail else kills, kills[-merge_tail:] if merge_tail else []
        k = max(0, args.kills - len(tail))
        return data[:k] + tail

    results = []
    if args.scenario in ("all", "shards", "export"):
        results.append(scenario_build(run, args.work, "shards", args.images, pick(SHARD_KILLS, 6), args.atol))
    if args.scenario in ("all", "per-image"):
        results.append(scenario_build(run, args.work, "per-image", max(8, args.images // 2),
                                      pick(PER_IMAGE_KILLS, 1), args.atol))
    if args.scenario in ("all", "export"):
        results.append(scenario_export(run, args.work, args.work / "crash-shards", args.atol))
    ok = True
    for res in results:
        probs = problems_of(res)
        ok &= not probs
        c = res.get("compare", {})
        print(f"[{res['scenario']}] kills {res.get('kills_done')}/{res.get('kills_planned', res.get('kills_done'))}, "
              f"verify rc {res.get('verify_rc')}, keys {c.get('keys')}/{c.get('keys_ref')}, bit-exact "
              f"{c.get('bit_exact')}, max |diff| {c.get('max_abs_diff')}: {'OK' if not probs else '; '.join(probs)}")
    print(f"crash driver: {'OK' if ok else 'FAILED'} in {time.time() - t0:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
