"""Check the full-size VGGT-1B aggregator (golden rule weights) against the official outputs.

    python tools/check_full_model.py [--golden tests/golden] [--tolerance 1e-4] [--all-fingerprints]

Builds "vggt-1b-random" (rule weights for every aggregator key), runs tests/golden/full/input
(1x1x3x392x518) in float32 on CPU and compares layer-22 patch tokens, layer-23 patch tokens and
layer-23 special tokens with full/expected. Exit status 0 when every max abs error <= tolerance.
Needs about 8 GB of RAM; takes about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from featstore.model import load_vggt  # noqa: E402


def check_full_model(golden: Path, all_fingerprints: bool = False) -> dict:
    """Run the full-size check; returns {"max_abs": {name: err}, "seconds": {...}, "fingerprint_mismatches": n}."""
    t0 = time.perf_counter()
    model = load_vggt("vggt-1b-random", device="cpu", dtype=torch.float32)
    t_build = time.perf_counter() - t0
    mismatches = -1
    if all_fingerprints:
        fps = json.loads((golden / "full" / "weight_fingerprints.json").read_text())["keys"]
        mismatches = sum(
            hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() != fps["aggregator." + k]["sha256_f32le"]
            for k, t in model.state_dict().items())
    images = load_file(str(golden / "full" / "input.safetensors"))["images"]
    expected = load_file(str(golden / "full" / "expected.safetensors"))
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model(images, layers=(22, 23))
    t_forward = time.perf_counter() - t1
    s = model.patch_start_idx
    ours = {"layer22_patch_tokens": out[22][:, :, s:], "layer23_patch_tokens": out[23][:, :, s:],
            "layer23_special_tokens": out[23][:, :, :s]}
    errors = {}
    for name, t in ours.items():
        if t.shape != expected[name].shape:
            raise AssertionError(f"{name}: shape {list(t.shape)} != expected {list(expected[name].shape)}")
        errors[name] = (t - expected[name]).abs().max().item()
    return {"max_abs": errors, "seconds": {"build": t_build, "forward": t_forward},
            "fingerprint_mismatches": mismatches, "fingerprint": model.fingerprint}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--golden", type=Path, default=REPO_ROOT / "tests" / "golden",
                        help="golden reference folder (default: tests/golden in the checkout)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs error allowed (default 1e-4)")
    parser.add_argument("--all-fingerprints", action="store_true",
                        help="also compare all 1210 aggregator weights with full/weight_fingerprints.json")
    args = parser.parse_args(argv)
    result = check_full_model(args.golden, args.all_fingerprints)
    ok = all(e <= args.tolerance for e in result["max_abs"].values()) and result["fingerprint_mismatches"] <= 0
    for name, err in result["max_abs"].items():
        print(f"{name:24s} max abs err {err:.3e}  {'ok' if err <= args.tolerance else 'FAIL'}")
    if result["fingerprint_mismatches"] >= 0:
        print(f"weight fingerprints: {result['fingerprint_mismatches']} mismatches of 1210")
    print(f"build {result['seconds']['build']:.1f} s, forward {result['seconds']['forward']:.1f} s; "
          f"model fingerprint {result['fingerprint']}")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
