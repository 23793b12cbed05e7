"""Loader benchmark: records/s and decoded GB/s for `stream`, `open_store` random access and per-image
`torch.load`, on the same features in the same run, with ratios against the per-image baseline.

    python benchmarks/loader_bench.py [--records 400] [--tokens 1369] [--dim 2048] [--dtype bfloat16]

Builds a synthetic store (random features of the given shape) through featstore's own writers: a shard
store (ShardWriter + index + manifest, via `featstore export` from per-image files) and the per-image
caches it came from. Page cache is warm for every reader (each is run once before timing).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from featstore.export import export_to_shards  # noqa: E402
from featstore.formats.manifest import PER_IMAGE_MANIFEST, new_manifest, write_manifest  # noqa: E402
from featstore.formats.perimage import write_pt  # noqa: E402
from featstore.formats.record import Record, parse_dtype  # noqa: E402
from featstore.loader import open_store, stream  # noqa: E402


def make_data(root: Path, n: int, tokens: int, dim: int, dtype: torch.dtype) -> list[str]:
    """Per-image caches of smooth-ish random features (like real activations, not white noise)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, tokens, dim, generator=g)
    keys = []
    for i in range(n):
        key = f"ep{i // 50:03d}/frame_{i:05d}.jpg"
        feats = (base + 0.5 * torch.randn(1, tokens, dim, generator=g)).to(dtype)
        rec = Record(key, key, {"features": feats}, {"source": {"size": 1, "mtime_ns": 1}})
        p = root / (key + ".vggt_cache.pt")
        p.parent.mkdir(parents=True, exist_ok=True)
        write_pt(p, rec, fsync=False)
        keys.append(key)
    m = new_manifest(layout="per-image", data_root=str(root), model_path="synthetic", processed_images=n,
                     total_images=n, dtype=str(dtype).removeprefix("torch."))
    write_manifest(root / PER_IMAGE_MANIFEST, m)
    return keys


def timed(fn, repeats: int) -> tuple[float, int, int]:
    """Best-of-``repeats`` seconds, records and decoded bytes of ``fn()`` (which returns (records, bytes))."""
    fn()  # warm the page cache and imports
    best, recs, nbytes = float("inf"), 0, 0
    for _ in range(repeats):
        t = time.perf_counter()
        recs, nbytes = fn()
        best = min(best, time.perf_counter() - t)
    return best, recs, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=1369, help="patch tokens per image (518x518 -> 1369)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for every reader")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keys = make_data(tmp / "data", args.records, args.tokens, args.dim, parse_dtype(args.dtype))
        export_to_shards(tmp / "data", tmp / "store", shard_size=256_000_000, fsync=False)
        pt_bytes = sum(p.stat().st_size for p in (tmp / "data").rglob("*.pt"))
        shard_bytes = sum(p.stat().st_size for p in (tmp / "store" / "shards").glob("*.tar"))
        order = keys[:]
        random.Random(0).shuffle(order)

        class PerImage(torch.utils.data.Dataset):
            def __len__(self):
                return len(order)

            def __getitem__(self, i):
                return torch.load(tmp / "data" / (order[i] + ".vggt_cache.pt"), weights_only=True)["features"]

        class Random(torch.utils.data.Dataset):
            def __init__(self):
                self.store = open_store(tmp / "store")

            def __len__(self):
                return len(order)

            def __getitem__(self, i):
                return self.store[order[i]]

        def consume(ds):
            def run():
                dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=args.workers)
                n = b = 0
                for x in dl:
                    t = x["features"] if isinstance(x, dict) else x
                    n, b = n + 1, b + t.numel() * t.element_size()
                return n, b
            return run

        results = {
            "per-image torch.load": timed(consume(PerImage()), args.repeats),
            "open_store random": timed(consume(Random()), args.repeats),
            "stream": timed(consume(stream(tmp / "store", shuffle_buffer=64)), args.repeats),
        }
    base = results["per-image torch.load"]
    print(f"{args.records} records of [1, {args.tokens}, {args.dim}] {args.dtype}; {args.workers} workers; "
          f"on disk: per-image {pt_bytes / 1e6:.0f} MB, shards {shard_bytes / 1e6:.0f} MB "
          f"({shard_bytes / pt_bytes:.2f}x)")
    print(f"{'reader':<22}{'records/s':>12}{'decoded GB/s':>14}{'vs per-image':>14}")
    out = {}
    for name, (sec, n, b) in results.items():
        rps, gbs = n / sec, b / sec / 1e9
        out[name] = {"records_per_s": rps, "decoded_gb_per_s": gbs, "ratio_vs_per_image": (n / sec) / (base[1] / base[0])}
        print(f"{name:<22}{rps:>12.1f}{gbs:>14.3f}{out[name]['ratio_vs_per_image']:>13.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
