"""Everything a lent GPU session should measure, in one run of under 9 minutes (each part has its own limit).

    python benchmarks/gpu_bench.py            # on the GPU machine; prints every table and the targets
    python benchmarks/gpu_bench.py --smoke    # on CPU: every part tiny, to check the script

Parts (issue 18's targets; each baseline is measured in the same run):
  model      `gpu_model_bench.py`: full-size model at 518, B 64, bf16, eager and compiled blocks (the build's
             featstore.model.compile), compiled features against eager (max abs, rel L2); target >= 165 img/s.
  fp8        `gpu_model_bench.py --fp8`: bf16 against FP8 block linears (torchao), rate and error per layer.
  build      `build_bench.py` with `vggt-1b-random`: per-image build end to end vs model-only vs decode-only
             (compile on by default on CUDA); target ratio >= 0.9 and >= 150 img/s.
  null       `build_bench.py --model null` on the GPU: the pipeline without the model (decode-only vs end to end,
             the CPU budget per image of the GPU node's cores), written to ``--json-dir`` when given.
  context    `context_bench.py` at JanusVLN's geometry (490x644, 50-frame episodes, bf16): JanusVLN's way (one
             sample at a time, eager) against the prefix tree with compiled blocks at a larger batch.
  build-ctx  `build_bench.py --context sample`: the per-sample build end to end; its samples/s over the
             `context` part's JanusVLN's way is target 3 (>= 8x).
  joint      `context_bench.py --context joint`: batched joint samples against B=1 (VG-LLM's way).
All children share one inductor cache folder (TORCHINDUCTOR_CACHE_DIR), so later parts reuse earlier compiles.
Copy the output into benchmarks/RESULTS.md with the card name.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOTAL_BUDGET_S = 540


@dataclass
class Part:
    name: str
    budget_s: float
    cmd: list[str]
    json: Path | None = None
    rc: int = 0
    stdout: str = ""
    seconds: float = 0.0


def run(part: Part, env: dict[str, str]) -> Part:
    """Run one part with its wall-clock budget, streaming and keeping its output."""
    print(f"\n== {part.name}\n$ {' '.join(part.cmd)}  (budget {part.budget_s:.0f} s)", flush=True)
    t = time.time()
    lines: list[str] = []
    proc = subprocess.Popen(part.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
            if time.time() - t > part.budget_s:
                raise subprocess.TimeoutExpired(part.cmd, part.budget_s)
        part.rc = proc.wait(timeout=max(1.0, part.budget_s - (time.time() - t)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"[timeout after {part.budget_s:.0f} s]", flush=True)
        part.rc = 124
    part.seconds, part.stdout = time.time() - t, "".join(lines)
    print(f"[{part.name}: {part.seconds:.1f} s, exit {part.rc}]", flush=True)
    return part


def model_parts(py: str, smoke: bool, tmp: Path) -> list[Part]:
    """Model-only eager vs compiled (target 2) and FP8 against bf16 (target 4)."""
    bench = [py, str(HERE / "gpu_model_bench.py")]
    size = ["--smoke", "--sizes", "28", "--iters", "1"] if smoke else ["--sizes", "518", "--batches", "64"]
    # torchao when it travelled with the tree (RESULTS.md, "how to run on the device"), else torch's own kernel
    how = [] if smoke or importlib.util.find_spec("torchao") else ["--fp8-backend", "scaled_mm"]
    return [Part("model", 90, [*bench, *size, "--json", str(tmp / "model.json")], tmp / "model.json"),
            Part("fp8", 80, [*bench, *size, "--fp8", *how, "--json", str(tmp / "fp8.json")], tmp / "fp8.json")]


def build_parts(py: str, smoke: bool, tmp: Path) -> list[Part]:
    """The per-image build end to end (target 1) and the pipeline with the null model (helper "perf"'s parts)."""
    bench = [py, str(HERE / "build_bench.py")]
    null_json = ["--json", str(tmp / "null_pipeline.json")]
    if smoke:
        cmd = [*bench, "--n", "16", "--sizes-n", "0", "--writer-threads", "2"]
        null = [*bench, "--model", "null", "--n", "8", "--size", "150x150", "--image-size", "140", "--batch-size",
                "4", "--workers", "1", *null_json]
    else:
        cmd = [*bench, "--model", "vggt-1b-random", "--device", "cuda", "--n", "1024", "--batch-size", "32",
               "--workers", "12", "--writer-threads", "8", "--sizes-n", "0"]
        null = [*bench, "--model", "null", "--device", "cuda", "--n", "1024", "--batch-size", "32", "--workers",
                "12", "--writer-threads", "8", *null_json]
    return [Part("build", 100, cmd), Part("null", 60, null, tmp / "null_pipeline.json")]


def context_parts(py: str, smoke: bool, tmp: Path) -> list[Part]:
    """Per-sample context: JanusVLN's way vs the compiled tree, the build end to end (target 3), joint."""
    ctx = [py, str(HERE / "context_bench.py")]
    if smoke:
        geo = ["--quick", "--compile", "--compile-backend", "eager"]
        build = [py, str(HERE / "build_bench.py"), "--context", "sample", "--n", "24", "--per-episode", "12",
                 "--image-size", "112", "--batch-size", "4"]
    else:
        geo = ["--model", "vggt-1b-random", "--device", "cuda", "--dtype", "bfloat16", "--height", "490", "--width",
               "644", "--batch-size", "16", "--episodes", "1", "--repeat", "1", "--compile"]
        build = [py, str(HERE / "build_bench.py"), "--model", "vggt-1b-random", "--device", "cuda", "--context",
                 "sample", "--n", "200", "--per-episode", "50", "--image-size", "644", "--batch-size", "16",
                 "--workers", "12", "--writer-threads", "8"]
    lengths = ["--lengths", "12"] if smoke else ["--lengths", "50"]
    joint_len = ["--lengths", "12"] if smoke else ["--lengths", "20"]
    return [Part("context", 100, [*ctx, *geo, *lengths, "--only", "tree", "--json", str(tmp / "context.json")],
                 tmp / "context.json"),
            Part("build-ctx", 80, build),
            Part("joint", 40, [*ctx, *geo, *joint_len, "--context", "joint", "--json", str(tmp / "joint.json")],
                 tmp / "joint.json")]


def _load(part: Part | None) -> dict | None:
    if part is None or part.rc != 0 or part.json is None or not part.json.is_file():
        return None
    return json.loads(part.json.read_text())


def _e2e_rate(part: Part | None) -> float | None:
    m = re.search(r"^end-to-end\s+([\d.]+) (?:img|samples)/s", part.stdout if part else "", re.M)
    return float(m.group(1)) if m else None


def summary(parts: dict[str, Part]) -> list[str]:
    """Issue 18's targets from the parts' outputs (each against its baseline of this run)."""
    out = []
    model = _load(parts.get("model"))
    if model:
        rows = {r["compile"]: r for r in model["results"]}
        if True in rows and False in rows:
            eq = model.get("compiled_vs_eager") or {}
            out.append(f"target 2, model-only compiled: {rows[True]['img_per_s']:.1f} img/s (>= 165), eager "
                       f"{rows[False]['img_per_s']:.1f} ({rows[True]['img_per_s'] / rows[False]['img_per_s']:.2f}x); "
                       f"compiled vs eager max abs {eq.get('max_abs', float('nan')):.4g}, rel L2 "
                       f"{eq.get('rel_l2', float('nan')):.3g}")
    fp8 = _load(parts.get("fp8"))
    if fp8:
        f = fp8["fp8"]
        errs = ", ".join(f"layer {k}: {v['rel_l2'] * 100:.2f}% / {v['max_abs']:.3g}" for k, v in f["error"].items())
        out.append(f"target 4, fp8 ({f['fp8_backend']}): {f['fp8']['img_per_s']:.1f} img/s vs bf16 "
                   f"{f['bf16']['img_per_s']:.1f} ({f['speedup']:.2f}x); rel L2 / max abs {errs}")
    ctx, e2e = _load(parts.get("context")), _e2e_rate(parts.get("build-ctx"))
    if ctx:
        base = next(r for r in ctx["results"] if r["batch"] == 1)
        tree = next((r for r in ctx["results"] if r["config"] == "tree"), None)
        line = f"target 3, JanusVLN's way {base['samples_per_s']:.2f} samples/s"
        if tree:
            line += f"; tree (compiled, B={tree['batch']}) {tree['samples_per_s']:.2f} ({tree['ratio']:.2f}x)"
        if e2e:
            line += f"; build end to end {e2e:.2f} samples/s = {e2e / base['samples_per_s']:.2f}x (>= 8x)"
        out.append(line)
    joint = _load(parts.get("joint"))
    if joint:
        for r in joint["results"]:
            if r["batch"] > 1:
                out.append(f"joint ({r['length']}-frame episodes): batched B={r['batch']} {r['samples_per_s']:.2f} "
                           f"samples/s = {r['ratio']:.2f}x one sample at a time")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every part tiny, on CPU")
    ap.add_argument("--parts", default=None, help="comma-separated part names to run (default: all)")
    ap.add_argument("--json-dir", default=None, help="keep the parts' JSON figures in this folder")
    args = ap.parse_args()
    py, start = sys.executable, time.time()
    env = dict(os.environ)
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "featstore" / "inductor"))
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(args.json_dir or tmp_s)
        tmp.mkdir(parents=True, exist_ok=True)
        todo = [*model_parts(py, args.smoke, tmp), *build_parts(py, args.smoke, tmp), *context_parts(py, args.smoke, tmp)]
        if args.parts:
            todo = [p for p in todo if p.name in args.parts.split(",")]
        done: dict[str, Part] = {}
        for part in todo:
            left = TOTAL_BUDGET_S - (time.time() - start)
            if left < 10:
                print(f"[{part.name}: skipped, {TOTAL_BUDGET_S} s spent]")
                continue
            part.budget_s = min(part.budget_s, left)
            done[part.name] = run(part, env)
        print(f"\n== summary ({time.time() - start:.0f} s in all)")
        for line in summary(done):
            print(line)
        for p in done.values():
            print(f"{p.name}: exit {p.rc}, {p.seconds:.1f} s")
    return max((p.rc for p in done.values()), default=0)


if __name__ == "__main__":
    raise SystemExit(main())
