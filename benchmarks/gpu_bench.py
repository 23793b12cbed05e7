"""Everything a lent GPU session should measure, in one run of under 9 minutes (each part has its own limit).

    python benchmarks/gpu_bench.py            # on the GPU machine; prints every table
    python benchmarks/gpu_bench.py --smoke    # on CPU: runs both parts tiny, to check the script

Part 1: `gpu_model_bench.py` (full-size model, 518, B 64, bf16, eager and compiled, with torch's default
attention and with cuDNN attention first, plus the bf16 8192^3 matmul of the same run). Part 2:
`build_bench.py` with `vggt-1b-random` (end-to-end build vs model-only vs decode-only on the same images,
with the build's per-stage wait times; target ratio >= 0.9). Part 3: `context_bench.py` at JanusVLN's
geometry (490x644 frames, bf16): per-sample context features, prefix tree vs one sample at a time. Part 4:
`build_bench.py --context sample` (the per-sample build end to end vs its model-only rate at 644). Part 5:
`build_bench.py --model null` on the GPU (the pipeline without the model: decode-only vs end to end, with the
CPU budget per image of the GPU node's cores), written to ``--json-dir`` when given.
Copy the output into benchmarks/RESULTS.md with the card name.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], budget_s: float) -> int:
    """Run one benchmark part with a wall-clock budget, streaming its output."""
    print(f"\n$ {' '.join(cmd)}  (budget {budget_s:.0f} s)", flush=True)
    t = time.time()
    try:
        rc = subprocess.run(cmd, timeout=budget_s).returncode
    except subprocess.TimeoutExpired:
        print(f"[timeout after {budget_s:.0f} s]", flush=True)
        rc = 124
    print(f"[{time.time() - t:.1f} s, exit {rc}]", flush=True)
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    ap.add_argument("--json-dir", default=None, help="folder for the parts' JSON figures (the null pipeline's)")
    args = ap.parse_args()
    py = sys.executable
    null_json = ["--json", str(Path(args.json_dir) / "null_pipeline.json")] if args.json_dir else []
    if args.json_dir:
        Path(args.json_dir).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        rcs = [run([py, str(HERE / "gpu_model_bench.py"), "--smoke", "--sdpa", "flash"], 300),
               run([py, str(HERE / "build_bench.py"), "--n", "24", "--sizes-n", "0", "--writer-threads", "2"], 300),
               run([py, str(HERE / "context_bench.py"), "--quick"], 300),
               run([py, str(HERE / "build_bench.py"), "--context", "sample", "--n", "24", "--per-episode", "12",
                    "--image-size", "112", "--batch-size", "4"], 300),
               run([py, str(HERE / "build_bench.py"), "--model", "null", "--n", "8", "--size", "150x150",
                    "--image-size", "140", "--batch-size", "4", "--workers", "1", *null_json], 120)]
    else:
        model = [py, str(HERE / "gpu_model_bench.py"), "--sizes", "518", "--batches", "64"]
        rcs = [run(model, 70), run([*model, "--sdpa", "cudnn"], 70),
               run([py, str(HERE / "build_bench.py"), "--model", "vggt-1b-random", "--device", "cuda",
                    "--n", "1024", "--batch-size", "32", "--workers", "12", "--writer-threads", "8",
                    "--sizes-n", "0"], 110),
               run([py, str(HERE / "context_bench.py"), "--model", "vggt-1b-random", "--device", "cuda",
                    "--dtype", "bfloat16", "--height", "490", "--width", "644", "--batch-size", "8",
                    "--episodes", "1", "--lengths", "20,50", "--repeat", "1"], 110),
               run([py, str(HERE / "build_bench.py"), "--model", "vggt-1b-random", "--device", "cuda", "--context",
                    "sample", "--n", "200", "--per-episode", "50", "--image-size", "644", "--batch-size", "8",
                    "--workers", "12", "--writer-threads", "8"], 110),
               run([py, str(HERE / "build_bench.py"), "--model", "null", "--device", "cuda", "--n", "1024",
                    "--batch-size", "32", "--workers", "12", "--writer-threads", "8", *null_json], 60)]
    return max(rcs)


if __name__ == "__main__":
    raise SystemExit(main())
