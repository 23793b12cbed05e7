"""Bytes per record on disk, per store kind and codec, at 518 and 644 pixels, crop and pad.

    python benchmarks/store_sizes.py [--width 640 --height 480] [--records 4] [--dim 2048] [--frames 8]

For a frame of WIDTHxHEIGHT (R2R/RxR frames are 640x480), the token grid comes from featstore's own
preprocessing (`preprocessed_size`); records of `[1, P, dim]` bf16 features are written with featstore's
writers to a temporary folder and the files measured:

- per-image: `<image>.vggt_cache.pt` (what `--format per-image` writes; always uncompressed `torch.save`);
- shard store, one record per image (`--format shards --codec C`): shard bytes / records (tar headers and
  padding included; the index adds about 100 bytes per record);
- sample store (`--context sample`): one record per training sample holding the last frame's `[1, h*w, dim]`
  tokens and the sample's frame list (`--frames` keys) and grid;
- joint stores (every frame of a sample kept) are not written by featstore yet: a joint record would hold
  `frames x` the per-image tokens.

`raw` and `int8` sizes depend only on the shapes; `zstd` depends on the values: here synthetic
activation-like features (a shared random base plus noise, as benchmarks/loader_bench.py writes), so the
zstd column is indicative (benchmarks/RESULTS.md has the ratio measured on real VGGT-1B features).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featstore.formats.layout import SHARDS_DIR  # noqa: E402
from featstore.formats.perimage import write_pt  # noqa: E402
from featstore.formats.record import Record, encode_record  # noqa: E402
from featstore.formats.shards import ShardWriter  # noqa: E402
from featstore.model.preprocess import preprocessed_size  # noqa: E402

CODECS = ("raw", "zstd", "int8")


def features(tokens: int, dim: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, tokens, dim, generator=g)
    return [(base + 0.5 * torch.randn(1, tokens, dim, generator=g)).to(torch.bfloat16) for _ in range(n)]


def records(feats: list[torch.Tensor], grid: tuple[int, int], frames: int | None) -> list[Record]:
    out = []
    for i, f in enumerate(feats):
        key = f"episodes/ep{i:03d}/frame_{frames or 0:03d}.jpg"
        meta: dict = {"source": {"size": 123456, "mtime_ns": 1}}
        if frames:
            keys = [f"episodes/ep{i:03d}/frame_{k:03d}.jpg" for k in range(frames)]
            meta = {"context": "sample", "frames": keys, "grid": list(grid), "reference_frame": "first"}
            key = f"sample-{i:06d}"
        out.append(Record(key, key, {"features": f}, meta))
    return out


def shard_bytes(tmp: Path, recs: list[Record], codec: str) -> float:
    folder = tmp / f"{codec}-{len(list(tmp.iterdir()))}"
    with ShardWriter(folder / SHARDS_DIR, "vggt", 0, 0, fsync=False) as w:
        for r in recs:
            w.write(r.key, encode_record(r, codec=codec))
    return sum(p.stat().st_size for p in (folder / SHARDS_DIR).glob("*.tar")) / len(recs)


def per_image_bytes(tmp: Path, recs: list[Record]) -> float:
    return sum(write_pt(tmp / f"pi-{i}.vggt_cache.pt", r, fsync=False) for i, r in enumerate(recs)) / len(recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--records", type=int, default=4)
    ap.add_argument("--dim", type=int, default=2048, help="feature channels (VGGT-1B layer -2 patch tokens: 2048)")
    ap.add_argument("--frames", type=int, default=8, help="frames per training sample (sample store records)")
    args = ap.parse_args()
    print(f"{args.width}x{args.height} frames, [1, P, {args.dim}] bf16, MB (10^6 bytes) per record on disk\n")
    print("| size | mode | grid | tokens P | per-image .pt | shards raw | shards zstd | shards int8 "
          "| sample raw | sample zstd | sample int8 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        for size in (518, 644):
            for mode in ("crop", "pad"):
                h, w = preprocessed_size(args.width, args.height, mode, size)
                grid = (h // 14, w // 14)
                feats = features(grid[0] * grid[1], args.dim, args.records)
                images, samples = records(feats, grid, None), records(feats, grid, args.frames)
                cells = [per_image_bytes(tmp, images)] + [shard_bytes(tmp, images, c) for c in CODECS] + [
                    shard_bytes(tmp, samples, c) for c in CODECS]
                print(f"| {size} | {mode} | {grid[0]}x{grid[1]} | {grid[0] * grid[1]} | "
                      + " | ".join(f"{c / 1e6:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
