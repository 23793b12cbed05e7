"""Everything a lent GPU session should measure, in one run of under 5 minutes.

    python benchmarks/gpu_bench.py            # on the GPU machine; prints every table
    python benchmarks/gpu_bench.py --smoke    # on CPU: runs both parts tiny, to check the script

Part 1: `gpu_model_bench.py` (full-size model, 518/504, B 32/64, bf16, eager and compiled, plus the
bf16 8192^3 matmul of the same run). Part 2: `build_bench.py` with `vggt-1b-random` (end-to-end build
vs model-only vs decode-only on the same images; target ratio >= 0.9). Copy the output into
benchmarks/RESULTS.md with the card name.
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
    args = ap.parse_args()
    py = sys.executable
    if args.smoke:
        rcs = [run([py, str(HERE / "gpu_model_bench.py"), "--smoke"], 300),
               run([py, str(HERE / "build_bench.py"), "--n", "24", "--sizes-n", "4"], 300)]
    else:
        rcs = [run([py, str(HERE / "gpu_model_bench.py")], 190),
               run([py, str(HERE / "build_bench.py"), "--model", "vggt-1b-random", "--device", "cuda",
                    "--n", "512", "--batch-size", "32", "--workers", "12", "--sizes-n", "16"], 100)]
    return max(rcs)


if __name__ == "__main__":
    raise SystemExit(main())
