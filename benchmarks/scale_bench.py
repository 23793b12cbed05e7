"""Scale benchmark: a synthetic store of N small records (default 1,000,000).

Measures, each in a fresh process so peak memory is the step's own (VmHWM from /proc, which exec resets;
ru_maxrss would carry the parent's peak across exec on Linux):
* index open time (target < 1 s) and random lookup latency p50/p99 from page cache (target p99 < 1 ms),
  against the same store at N/10 (the ratio shows open time does not grow with N);
* full ``featstore verify`` time and peak memory at N and at N/10 (flat memory: ratio close to 1);
* source discovery (``discover_images``) over a tree of N empty ``.jpg`` files and N/10 (< 60 s, flat memory);
* ``stream``'s epoch plan: peak memory of each of 2 spawned DataLoader workers streaming the store, beyond
  a fresh process that imported torch and featstore (target < 100 MB at 1M records);
* ``featstore plan`` of a JanusVLN-like annotation set (``--plan-samples``, default 612,000 samples of synthetic
  R2R-style episodes, each sample the JanusVLN history of one step, ``--assume-size 640x480``, no image
  files): time and peak memory (targets < 30 s, < 1 GB), against the same plan at a tenth of the samples.

    python benchmarks/scale_bench.py --n 1000000 --work /tmp/scale [--skip-verify] [--skip-discovery] [--quick]
    python benchmarks/scale_bench.py --only-plan [--plan-samples 612000]

Synthetic records are real featstore records (the one codec) with a [1, 4, 8] float16 features tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_store(out: Path, n: int) -> float:
    """Write ``n`` synthetic records into shards + index + manifest at ``out``; returns seconds."""
    import torch

    from featstore.formats.index import write_index
    from featstore.formats.layout import INDEX_NAME
    from featstore.formats.manifest import new_manifest, write_manifest
    from featstore.formats.record import Record, encode_record
    from featstore.formats.shards import ShardWriter
    from featstore.runtime.fsutil import file_sha256 as sha256_file

    t0 = time.time()
    # 16 MB shards hold ~10k of these tiny records (a real 1 GB shard holds ~250 records of ~4 MB).
    # verify works shard by shard, so its working set follows records per shard, not the store's size.
    closed: list = []
    w = ShardWriter(out / "shards", "vggt", 0, 0, 16 << 20, fsync=False, post=closed.append)
    feats = torch.arange(32, dtype=torch.float16).reshape(1, 4, 8)
    meta = {"layers": {"features": 0}, "model": "synthetic", "preprocess": "crop", "tokens": "patch",
            "source": {"size": 1, "mtime_ns": 1}}
    for i in range(n):
        key = f"ep{i // 1000:05d}/frame.{i % 1000:04d}.jpg"
        w.write(key, encode_record(Record(key, key, {"features": feats}, meta)))
    w.close_shard()
    names = [s.info.name for s in closed]
    write_index(out / INDEX_NAME, names, ((i, e) for i, s in enumerate(closed) for e in s.entries))
    m = new_manifest(layout="shards", data_root="", model_path="synthetic", dtype="float16",
                     tensors={"features": {"layer": 0, "dtype": "float16"}}, layers=[0])
    m["model"]["fingerprint"] = "synthetic"
    m["preprocess"]["mode"] = "crop"
    m.update(total_images=n, processed_images=n, complete=True, feature_shapes={"[1, 4, 8]": n},
             counts=dict(m["counts"], records=n, processed=n),
             shards=[{"name": i.name, "records": i.records, "bytes": i.bytes, "sha256": i.sha256}
                     for i in (s.info for s in closed)],
             index={"name": INDEX_NAME, "records": n, "bytes": (out / INDEX_NAME).stat().st_size,
                    "sha256": sha256_file(out / INDEX_NAME)})
    write_manifest(out / "manifest.json", m)
    return time.time() - t0


HWM = """
def hwm_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
"""

LOOKUP = HWM + """
import json, random, resource, sys, time
t0 = time.perf_counter()
from featstore.formats.index import Index
t_import = time.perf_counter()
ix = Index(sys.argv[1] + "/index.fsi")
t_open = time.perf_counter() - t_import
n = len(ix)
rng = random.Random(0)
keys = [f"ep{i // 1000:05d}/frame.{i % 1000:04d}.jpg" for i in (rng.randrange(n) for _ in range(20000))]
for k in keys[:2000]:
    ix.get(k)  # warm the page cache
lat = []
for k in keys:
    t = time.perf_counter()
    e = ix.get(k)
    lat.append(time.perf_counter() - t)
    assert e is not None
lat.sort()
print(json.dumps({"open_s": t_open, "lookup_p50_us": lat[len(lat) // 2] * 1e6,
                  "lookup_p99_us": lat[int(len(lat) * 0.99)] * 1e6,
                  "maxrss_mb": hwm_mb()}))
"""

DISCOVER = HWM + """
import json, resource, sys, time
from featstore.discover import discover_images
base = hwm_mb()
t = time.time()
d = discover_images(sys.argv[1])
print(json.dumps({"seconds": time.time() - t, "items": len(d.items),
                  "maxrss_mb": hwm_mb(), "growth_mb": hwm_mb() - base}))
"""


def py(code_or_args: list[str]) -> tuple[str, float, float]:
    """Run python with args; returns (stdout, seconds, child peak RSS MB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.time()
    r = subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, cwd=str(REPO),
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    secs = time.time() - t
    if r.returncode not in (0, 1):
        raise SystemExit(f"{code_or_args[:3]} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return r.stdout, secs, max(after, before) / 1024


def verify_run(store: Path) -> dict:
    code = ("import resource, subprocess, sys, time, json; t=time.time(); "
            "r=subprocess.run([sys.executable,'-m','featstore','verify',sys.argv[1],'--no-progress'],"
            "capture_output=True,text=True); "
            "print(json.dumps({'rc': r.returncode, 'seconds': time.time()-t, "
            "'maxrss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024, 'tail': r.stdout[-300:]}))")
    out, _, _ = py(["-c", code, str(store)])
    return json.loads(out)


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_report(sample: dict) -> dict:
    """collate_fn run inside each DataLoader worker: the sample's key and the worker's own peak memory."""
    import torch

    return {"key": sample["key"], "worker": torch.utils.data.get_worker_info().id, "hwm_mb": _status_mb("VmHWM"),
            "anon_mb": _status_mb("RssAnon"), "file_mb": _status_mb("RssFile")}


def stream_workers(store: str, samples: int) -> None:
    """Stream ``samples`` records with 2 spawned workers; print the import baseline and each worker's peak."""
    import torch

    import featstore.read  # noqa: F401  (the baseline includes it, as the workers do)

    base, base_anon = _status_mb("VmHWM"), _status_mb("RssAnon")
    ds = featstore.read.stream(store, shuffle=True, shuffle_buffer=1000)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=worker_report,
                                     multiprocessing_context="spawn")
    peak: dict[int, float] = {}
    last: dict[int, dict] = {}
    for i, r in enumerate(dl):
        peak[r["worker"]] = max(peak.get(r["worker"], 0.0), r["hwm_mb"])
        last[r["worker"]] = r
        if i + 1 >= samples:
            break
    print(json.dumps({"import_hwm_mb": base, "worker_hwm_mb": peak, "worker_growth_mb": max(peak.values()) - base,
                      # file-backed: index pages mapped by the lookups (page cache, shared, reclaimable)
                      "worker_file_mb": max(r["file_mb"] for r in last.values()),
                      "worker_anon_growth_mb": max(r["anon_mb"] for r in last.values()) - base_anon}))


def stream_run(store: Path, samples: int = 2000) -> dict:
    out, _, _ = py([str(Path(__file__).resolve()), "--stream-worker", str(store), "--samples", str(samples)])
    return json.loads(out.strip().splitlines()[-1])


def make_tree(root: Path, n: int) -> float:
    t = time.time()
    for i in range(0, n, 1000):
        d = root / f"ep{i // 1000:05d}"
        d.mkdir(parents=True)
        for j in range(min(1000, n - i)):
            (d / f"f{j:04d}.jpg").touch()
    return time.time() - t


PLAN = HWM + """
import json, sys, time, contextlib, io, resource
from featstore.cli.main import main
base = hwm_mb()
t = time.time()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(["plan", "--data-root", sys.argv[1], "--annotations", sys.argv[2], "--assume-size", "640x480",
               "--model", "vggt-1b-random", "--preset", "janusvln", "--json", "-"])
doc = json.loads(out.getvalue())
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rc": rc, "seconds": time.time() - t, "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_mb": hwm_mb(),
                  "import_mb": base,
                  **{k: doc[k] for k in ("samples", "records", "frames_decoded", "frame_passes",
                                         "frame_passes_without_sharing", "bytes")}, "gpu_hours": doc["gpu"]["hours"]}))
"""


def make_janusvln_annotations(path: Path, samples: int, seed: int = 0) -> float:
    """JanusVLN-like training annotations: R2R-style episodes of 30-120 frames, one sample per step whose
    ``images`` are JanusVLN's history frames of that step (8 history frames), until ``samples``; seconds."""
    import random

    from featstore.discover.samples import janusvln_history

    t = time.time()
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        done, ep = 0, 0
        while done < samples:
            frames = [f"R2R/images/ep_{ep:06d}/frame_{i:04d}.jpg" for i in range(rng.randint(30, 120))]
            for i in range(min(len(frames), samples - done)):
                rec = {"id": f"ep{ep}_{i}", "images": [frames[j] for j in janusvln_history(i)],
                       "conversations": [{"from": "human", "value": "Walk to the kitchen and stop by the sink."},
                                         {"from": "gpt", "value": "MOVE_FORWARD"}]}
                f.write(json.dumps(rec) + "\n")
            done += min(len(frames), samples - done)
            ep += 1
    return time.time() - t


def plan_run(work: Path, samples: int) -> dict:
    """The plan of ``samples`` synthetic JanusVLN samples (in its own process: its own peak memory)."""
    ann = work / "janusvln" / "train.jsonl"
    made = make_janusvln_annotations(ann, samples)
    out, _, _ = py(["-c", PLAN, str(ann.parent), str(ann)])
    r = json.loads(out.strip().splitlines()[-1])
    r["make_s"] = round(made, 1)
    shutil.rmtree(ann.parent)
    return r


def plan_report(work: Path, samples: int) -> None:
    """Plan at samples/10 and at samples; print both and the targets."""
    small, full = plan_run(work, max(1, samples // 10)), plan_run(work, samples)
    print(json.dumps({"plan_small": small, "plan_full": full}))
    print(f"\nplan of {full['samples']:,} JanusVLN samples ({full['records']:,} records, {full['frame_passes']:,} "
          f"frame passes, {full['frame_passes_without_sharing']:,} without sharing): {full['seconds']:.1f} s "
          f"({full['cpu_s']:.1f} s of CPU; target < 30 s; x{full['seconds'] / max(small['seconds'], 1e-9):.1f} vs "
          f"N/10), peak RSS "
          f"{full['maxrss_mb']:.0f} MB (target < 1024 MB; {full['import_mb']:.0f} MB before the plan; N/10: "
          f"{small['maxrss_mb']:.0f} MB); projected zstd {full['bytes']['zstd'] / 1e12:.2f} TB, int8 "
          f"{full['bytes']['int8'] / 1e12:.2f} TB, raw {full['bytes']['raw'] / 1e12:.2f} TB, "
          f"{full['gpu_hours']:.1f} GPU hours (H200)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="records (and files) at full scale")
    ap.add_argument("--work", type=Path, default=Path("/tmp/featstore-scale"), help="scratch folder (emptied)")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--skip-discovery", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=2000, stream workers only")
    ap.add_argument("--plan-samples", type=int, default=612_000, help="samples of the plan measurement")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--only-plan", action="store_true", help="measure the plan only")
    ap.add_argument("--stream-worker", help=argparse.SUPPRESS)  # internal: the stream measurement's own process
    ap.add_argument("--samples", type=int, default=2000, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.stream_worker:
        stream_workers(args.stream_worker, args.samples)
        return 0
    if args.quick:
        args.n, args.skip_verify, args.skip_discovery, args.plan_samples = 2000, True, True, 6120
    shutil.rmtree(args.work, ignore_errors=True)
    if args.only_plan:
        plan_report(args.work, args.plan_samples)
        return 0
    res: dict = {"n": args.n}
    for label, n in (("small", max(1, args.n // 10)), ("full", args.n)):
        store = args.work / f"store-{label}"
        r: dict = {"n": n, "make_s": round(make_store(store, n), 1)}
        out, _, _ = py(["-c", LOOKUP, str(store)])
        r.update(json.loads(out))
        if not args.skip_verify:
            r["verify"] = verify_run(store)
        if not args.skip_stream:
            r["stream"] = stream_run(store, min(n, 2000))
        if not args.skip_discovery:
            tree = args.work / f"tree-{label}"
            r["tree_make_s"] = round(make_tree(tree, n), 1)
            out, _, _ = py(["-c", DISCOVER, str(tree)])
            r["discovery"] = json.loads(out)
            shutil.rmtree(tree)
        res[label] = r
        print(json.dumps({label: r}), flush=True)
    f, s = res["full"], res["small"]
    print(f"\nindex open {f['open_s'] * 1000:.1f} ms at N={f['n']:,} (x{f['open_s'] / max(s['open_s'], 1e-9):.2f} vs N/10); "
          f"lookup p50 {f['lookup_p50_us']:.1f} us, p99 {f['lookup_p99_us']:.1f} us")
    if "verify" in f:
        print(f"verify {f['verify']['seconds']:.1f} s (rc {f['verify']['rc']}), peak RSS {f['verify']['maxrss_mb']:.0f} MB "
              f"(x{f['verify']['maxrss_mb'] / s['verify']['maxrss_mb']:.2f} vs N/10)")
    if "stream" in f:
        st = f["stream"]
        print(f"stream: each of 2 DataLoader workers peaks {st['worker_growth_mb']:.0f} MB above a fresh import of "
              f"torch + featstore ({st['import_hwm_mb']:.0f} MB) at N={f['n']:,} (N/10: "
              f"{s['stream']['worker_growth_mb']:.0f} MB); after {min(f['n'], 2000)} samples its private (anonymous) "
              f"memory is {st['worker_anon_growth_mb']:.0f} MB above the import, and {st['worker_file_mb']:.0f} MB "
              f"is file-backed (mapped index and library pages, shared and reclaimable)")
    if "discovery" in f:
        print(f"discovery {f['discovery']['seconds']:.1f} s over {f['discovery']['items']:,} files, peak RSS "
              f"{f['discovery']['maxrss_mb']:.0f} MB (x{f['discovery']['maxrss_mb'] / s['discovery']['maxrss_mb']:.2f} vs N/10)")
    if not args.skip_plan:
        plan_report(args.work, args.plan_samples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
