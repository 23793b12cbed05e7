"""Loader benchmark: records/s and decoded GB/s for `stream`, `open_store` random access and per-image
`torch.load`, on the same features in the same run, with ratios against the per-image baseline.

    python benchmarks/loader_bench.py [--records 400] [--tokens 1369] [--dim 2048] [--dtype bfloat16]
    python benchmarks/loader_bench.py --url s3://bucket/prefix [--storage-options JSON]   # object storage
    python benchmarks/loader_bench.py --s3-local        # the same against a local moto S3 server

With ``--url`` (or ``--s3-local``) the shard store is also uploaded there, and ``stream`` and
``open_store`` read it back in the same run: their records/s are printed with the ratio against the same
reader on local disk, plus the number of S3 requests one random-access record costs (goal: one ranged GET).

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
from featstore.formats.storage import parse_location, storage_options_from_json  # noqa: E402
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


def upload(store: Path, url: str, options: dict) -> None:
    """Copy a local shard store to ``url``: shards, then index, then manifest."""
    dest = parse_location(url, options)
    for p in sorted((store / "shards").glob("*.tar")):
        dest.publish_file(f"shards/{p.name}", p)
    for name in ("index.fsi", "manifest.json"):
        dest.publish_file(name, store / name)


def local_s3() -> tuple[str, dict]:
    """Start moto's S3 server on 127.0.0.1 (a free port) in this process; returns (url, storage options)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3server import new_bucket, s3_server

    server = s3_server()
    return f"s3://{new_bucket(server)}/loader-bench", server.storage_options()


def requests_per_record(url: str, options: dict, keys: list[str], n: int = 50) -> float | None:
    """S3 requests sent per random-access lookup (after opening), counted with a botocore event hook."""
    store = open_store(url, storage_options=options)
    fs = store.storage.fs
    if not hasattr(fs, "connect"):
        return None
    sent = []
    fs.connect().meta.events.register("before-send.s3", lambda **kw: sent.append(1))
    for k in random.Random(1).sample(keys, min(n, len(keys))):
        store[k]
    return len(sent) / min(n, len(keys))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--tokens", type=int, default=1369, help="patch tokens per image (518x518 -> 1369)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for every reader")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--url", help="also read the store from this fsspec URL (uploaded there first)")
    ap.add_argument("--storage-options", default="{}", help="JSON options for --url's backend")
    ap.add_argument("--s3-local", action="store_true", help="--url on a local moto S3 server (needs moto[server])")
    args = ap.parse_args()
    url, options = args.url, storage_options_from_json(args.storage_options)
    if args.s3_local:
        url, options = local_s3()
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
            def __init__(self, where, storage_options=None):
                self.store = open_store(where, storage_options=storage_options)

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
            "open_store random": timed(consume(Random(tmp / "store")), args.repeats),
            "stream": timed(consume(stream(tmp / "store", shuffle_buffer=64)), args.repeats),
        }
        if url:
            upload(tmp / "store", url, options)
            results["open_store random (url)"] = timed(consume(Random(url, options)), args.repeats)
            results["stream (url)"] = timed(consume(stream(url, shuffle_buffer=64, storage_options=options)),
                                            args.repeats)
            per_record = requests_per_record(url, options, keys)
    base = results["per-image torch.load"]
    print(f"{args.records} records of [1, {args.tokens}, {args.dim}] {args.dtype}; {args.workers} workers; "
          f"on disk: per-image {pt_bytes / 1e6:.0f} MB, shards {shard_bytes / 1e6:.0f} MB "
          f"({shard_bytes / pt_bytes:.2f}x)")
    print(f"{'reader':<26}{'records/s':>12}{'decoded GB/s':>14}{'vs per-image':>14}")
    out = {}
    for name, (sec, n, b) in results.items():
        rps, gbs = n / sec, b / sec / 1e9
        out[name] = {"records_per_s": rps, "decoded_gb_per_s": gbs, "ratio_vs_per_image": (n / sec) / (base[1] / base[0])}
        print(f"{name:<26}{rps:>12.1f}{gbs:>14.3f}{out[name]['ratio_vs_per_image']:>13.2f}x")
    if url:
        for name in ("open_store random", "stream"):
            remote, local = out[f"{name} (url)"], out[name]
            remote["ratio_vs_local_disk"] = remote["records_per_s"] / local["records_per_s"]
            print(f"{name} from {parse_location(url).display}: {remote['ratio_vs_local_disk']:.2f}x of local disk")
        out["requests_per_random_record"] = per_record
        print(f"requests per random-access record: {per_record}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
