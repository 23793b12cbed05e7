"""The compression ratios ``featstore plan`` projects store sizes with, measured on real model outputs.

    python benchmarks/plan_ratios.py [--golden tests/golden]

For each feature set (the golden full-size VGGT-1B layer 22 and 23 patch tokens of one 392x518 crop, and the
golden tiny model's tokens), each storage dtype and each shard codec, it encodes one record with the shipped
record format (``formats.record.encode_record``, zstd level 1) and prints the encoded bytes per feature value
(the tensor payload over the number of values, scales included) and the bytes of the record's framing
(header and metadata). The baseline of every ratio is the raw codec of the same dtype, measured in the same
run. ``featstore/build/plan_data.py`` records the full-size layer 22 numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from featstore.formats.record import Record, encode_record  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CODECS = ("raw", "zstd", "int8")


def feature_sets(golden: Path) -> dict[str, torch.Tensor]:
    """[1, P, C] patch tokens of the golden outputs of the official code."""
    from safetensors.torch import load_file

    full = load_file(str(golden / "full" / "expected.safetensors"))
    tiny = load_file(str(golden / "tiny" / "b1s1.safetensors"))
    return {"full-size L22": full["layer22_patch_tokens"][0], "full-size L23": full["layer23_patch_tokens"][0],
            "tiny": tiny["output.1"][0, :, 5:]}


def measure(t: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    """dtype -> codec -> {bytes_per_value, framing_bytes} for one record holding ``t``."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    meta = {"context": "sample", "frames": [f"episode_000/frame_{i:04d}.jpg" for i in range(9)],
            "reference_frame": "first", "layers": [22], "preprocess": {"mode": "crop", "target_size": 644}}
    empty = Record("k", "p", {"features": torch.zeros(1, 0, t.shape[-1])}, meta)
    for name, dtype in DTYPES.items():
        rec = Record("sample-" + "0" * 32, "episode_000/frame_0008.jpg", {"features": t.to(dtype)}, meta)
        out[name] = {}
        for codec in CODECS:
            framing = len(encode_record(empty, codec=codec))
            size = len(encode_record(rec, codec=codec))
            out[name][codec] = {"bytes_per_value": (size - framing) / t.numel(), "framing_bytes": framing}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--golden", type=Path, default=REPO / "tests" / "golden")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    results = {name: measure(t) for name, t in feature_sets(args.golden).items()}
    print("| features | dtype | raw B/value | zstd B/value (ratio to raw) | int8 B/value (ratio to raw) | framing B |")
    print("|---|---|---|---|---|---|")
    for name, by_dtype in results.items():
        for dtype, c in by_dtype.items():
            raw = c["raw"]["bytes_per_value"]
            print(f"| {name} | {dtype} | {raw:.3f} | {c['zstd']['bytes_per_value']:.3f} "
                  f"({c['zstd']['bytes_per_value'] / raw:.3f}) | {c['int8']['bytes_per_value']:.3f} "
                  f"({c['int8']['bytes_per_value'] / raw:.3f}) | {c['zstd']['framing_bytes']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
