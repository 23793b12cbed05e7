"""Loader benchmark: every codec against per-image `torch.load`, on the same features in the same run.

    python benchmarks/loader_bench.py [--records 200] [--tokens 1369] [--dim 2048] [--json OUT] [--quick]
    python benchmarks/loader_bench.py --url s3://bucket/prefix [--storage-options JSON] | --s3-local

Writes per-image caches of smooth random bf16 features, then one shard store per codec (`featstore export
--format shards --codec C`). Sections, each with its baseline measured in the same run:

1. one process, warm page cache: `open_store(...).get` per codec vs per-image `torch.load` (records/s, ratio);
2. `zstd` get vs the codec's floor: the same records' zstd frames, held in memory, decompressed into a reused
   buffer and unshuffled into a fresh array (no read, no header, no lookup);
3. training setting: `stream` in a DataLoader with 2 workers (every tensor crosses a process boundary) per
   codec, int8 with `dequantize=False`, vs per-image `torch.load` in the same kind of DataLoader; the cost
   of dequantizing the int8 samples on the consumer is timed separately;
4. cold reads: the page cache of every file dropped (`posix_fadvise(DONTNEED)`, after the reader's shards
   are unmapped: a mapped page cannot be dropped) before each reader; MB/s read from disk and records/s,
   per-image vs each codec, (a) one process, (b) a DataLoader with workers (`stream`);
5. object storage (``--url s3://bucket/prefix [--storage-options JSON]``, or ``--s3-local`` for a moto S3
   server on 127.0.0.1 started here): the zstd store uploaded there, then ``open_store`` random access (one
   process) and ``stream`` (DataLoader) from the URL vs the same readers on local disk, ``stream`` with a
   shard cache (``cache_dir``) in its first epoch (downloading) and its second (from the cache), and the
   number of S3 requests one random-access record costs (goal: one ranged GET).

The issue's targets are printed last, as ratios measured in this run: `raw` get >= 0.9x per-image
`torch.load` (section 1), `zstd` get >= 0.9x its floor (section 2), and `stream` `int8` with
`dequantize=False` >= 1.3x per-image `torch.load` with 2 DataLoader workers (section 3).

`--quick` (or `--smoke`) is a smoke run (few small records) that checks the script end to end, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import featstore  # noqa: E402
from featstore.formats.layout import PER_IMAGE_MANIFEST
from featstore.export import export_to_shards  # noqa: E402
from featstore.formats.codecs import CODECS, unshuffle_into, unzstd_into  # noqa: E402
from featstore.formats.manifest import new_manifest, write_manifest
from featstore.formats.perimage import write_pt  # noqa: E402
from featstore.storage import parse_location, storage_options_from_json  # noqa: E402
from featstore.formats.record import Record, decode_header  # noqa: E402
from featstore.read import open_store, stream  # noqa: E402


def make_data(root: Path, n: int, tokens: int, dim: int) -> list[str]:
    """Per-image caches of smooth-ish random bf16 features (like activations, not white noise)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, tokens, dim, generator=g)
    keys = []
    for i in range(n):
        key = f"ep{i // 50:03d}/frame_{i:05d}.jpg"
        feats = (base + 0.5 * torch.randn(1, tokens, dim, generator=g)).to(torch.bfloat16)
        p = root / (key + ".vggt_cache.pt")
        p.parent.mkdir(parents=True, exist_ok=True)
        write_pt(p, Record(key, key, {"features": feats}, {"source": {"size": 1, "mtime_ns": 1}}), fsync=False)
        keys.append(key)
    write_manifest(root / PER_IMAGE_MANIFEST, new_manifest(layout="per-image", data_root=str(root),
                                                           model_path="synthetic", processed_images=n,
                                                           total_images=n, dtype="bfloat16"))
    return keys


def interleaved(readers: dict[str, Callable[[], int]], repeats: int,
                before: dict[str, Callable[[], None]] | None = None) -> dict[str, tuple[float, int]]:
    """Best (seconds, records) of each reader over ``repeats`` rounds, the readers taking turns within each
    round (after a warm-up round), so a machine whose load drifts during the run favours none of them."""
    best = {name: (float("inf"), 0) for name in readers}
    for rnd in range(repeats + 1):
        for name, fn in readers.items():
            if before is not None and name in before:
                before[name]()
            t = time.perf_counter()
            n = fn()
            sec = time.perf_counter() - t
            if rnd and sec < best[name][0]:
                best[name] = (sec, n)
    return best


def drop_cache(paths: list[Path]) -> None:
    """Evict files from the page cache (posix_fadvise DONTNEED after fsync; works without root)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepare(tmp: Path, n: int, tokens: int, dim: int, codecs: list[str]) -> list[str]:
    """Per-image caches and one shard store per codec under ``tmp`` (reused when a --work folder has them)."""
    stamp = tmp / "bench.json"
    want = {"records": n, "tokens": tokens, "dim": dim, "codecs": codecs}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return sorted(p.relative_to(tmp / "data").as_posix()[:-len(".vggt_cache.pt")]
                      for p in (tmp / "data").rglob("*.vggt_cache.pt"))
    keys = make_data(tmp / "data", n, tokens, dim)
    for c in codecs:
        export_to_shards(tmp / "data", tmp / c, shard_size=256_000_000, fsync=False, codec=c)
    stamp.write_text(json.dumps(want))
    return keys


class PerImage(torch.utils.data.Dataset):
    """Per-image caches read with torch.load, in the benchmark's shuffled order."""

    def __init__(self, root: Path, order: list[str]):
        self.root, self.order = root, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.load(self.root / (self.order[i] + ".vggt_cache.pt"), weights_only=True)["features"]


OPEN_STORES: dict[str, Any] = {}  # reader name -> its store (closed before a cold run: a mapped page stays cached)


def random_access(tmp: Path, order: list[str], codecs: list[str]) -> dict[str, Callable[[], int]]:
    """One-process readers: per-image torch.load and open_store(...).get per codec."""
    readers: dict[str, Callable[[], int]] = {}
    pi = PerImage(tmp / "data", order)
    readers["per-image torch.load"] = lambda: sum(1 for i in range(len(pi)) if pi[i] is not None)
    for c in codecs:
        store = OPEN_STORES[f"open_store {c}"] = open_store(tmp / c)
        readers[f"open_store {c}"] = (lambda s: lambda: sum(1 for k in order if s.get(k) is not None))(store)
    return readers


def cold(files: list[Path], store: Any = None) -> Callable[[], None]:
    """Before a cold run: unmap the reader's shards (posix_fadvise cannot evict mapped pages), drop the files."""
    def run() -> None:
        if store is not None:
            store.close()
        drop_cache(files)
    return run


def bare_zstd(tmp: Path, order: list[str]) -> Callable[[], int]:
    """The floor of the zstd codec: each record's frame, already in memory, decompressed into a reused buffer
    and unshuffled into a fresh output array (freed before the next, as a reader's caller drops its tensor)."""
    store = open_store(tmp / "zstd")
    frames = []
    for k in order:
        data = bytes(store.read_bytes(store.entry(k)))
        _, specs, pos = decode_header(data)
        frames.append((memoryview(data)[pos:pos + specs[0].zbytes], specs[0].nbytes))
    planes = np.empty(max((n for _, n in frames), default=0), np.uint8)

    def run() -> int:
        for frame, nbytes in frames:
            unzstd_into(frame, planes[:nbytes], "bench")
            out = np.empty(nbytes, np.uint8)
            unshuffle_into(planes[:nbytes], 2, out)
            del out  # else the next output is allocated while this one lives, on fresh pages every time
        return len(frames)
    return run


def loader_readers(tmp: Path, order: list[str], codecs: list[str], workers: int) -> dict[str, Callable[[], int]]:
    """DataLoader readers with ``workers`` processes: per-image torch.load and stream per codec."""
    def consume(make: Callable[[], Any]) -> Callable[[], int]:
        def run() -> int:
            dl = torch.utils.data.DataLoader(make(), batch_size=None, num_workers=workers)
            return sum(1 for _ in dl)
        return run

    readers = {"per-image torch.load": consume(lambda: PerImage(tmp / "data", order))}
    for c in codecs:
        readers[f"stream {c}"] = consume((lambda c: lambda: stream(tmp / c, shuffle_buffer=64))(c))
    if "int8" in codecs:
        readers["stream int8 dequantize=False"] = consume(lambda: stream(tmp / "int8", shuffle_buffer=64,
                                                                         dequantize=False))
    return readers


def dequantize_cost(tmp: Path, n: int) -> float:
    """Seconds per record to dequantize int8 samples on the consumer (CPU here; on a GPU in training)."""
    samples = [s for _, s in zip(range(n), stream(tmp / "int8", shuffle=False, dequantize=False))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for s in samples:
                featstore.dequantize(s)
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return best / max(1, len(samples))


def table(title: str, results: dict[str, tuple[float, int]], base: str, extra: dict[str, float] | None = None
          ) -> dict[str, Any]:
    """Print records/s and the ratio against ``base``; returns the rows."""
    print(f"\n{title}")
    print(f"{'reader':<34}{'records/s':>11}{'ratio':>9}" + (f"{'MB/s read':>11}" if extra else ""))
    base_rps = results[base][1] / results[base][0]
    rows = {}
    for name, (sec, n) in results.items():
        rps = n / sec
        rows[name] = {"records_per_s": rps, "ratio": rps / base_rps}
        line = f"{name:<34}{rps:>11.1f}{rps / base_rps:>8.2f}x"
        if extra:
            rows[name]["mb_per_s"] = extra[name] / sec / 1e6
            line += f"{extra[name] / sec / 1e6:>11.0f}"
        print(line)
    return rows


TARGETS = (  # (name, section, reader, baseline, at least)
    ("raw get vs per-image torch.load, one process", "random_access", "open_store raw", "per-image torch.load", 0.9),
    ("zstd get vs bare zstd decompress + unshuffle", "zstd_vs_bare", "open_store zstd",
     "bare zstd decompress + unshuffle", 0.9),
    ("stream int8 dequantize=False vs per-image, DataLoader", "dataloader", "stream int8 dequantize=False",
     "per-image torch.load", 1.3),
    ("raw get vs per-image torch.load, cold, one process", "cold", "open_store raw", "per-image torch.load", 0.9),
    ("stream raw vs per-image torch.load, cold, DataLoader", "cold_stream", "stream raw", "per-image torch.load", 0.9),
)


def targets(out: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Print the issue's target ratios from this run's sections; returns them by name."""
    print("\ntargets (ratios from this run)")
    found = {}
    for name, section, reader, base, goal in TARGETS:
        rows = out.get(section) or {}
        if reader in rows and base in rows:
            ratio = rows[reader]["ratio"]
            found[name] = {"ratio": ratio, "target": goal, "met": ratio >= goal}
            print(f"  {name:<56}{ratio:>6.2f}x  (target >= {goal}x: {'met' if ratio >= goal else 'NOT met'})")
    return found


def upload(store: Path, url: str, options: dict) -> None:
    """Copy a local shard store to ``url`` as a build publishes it: shards, then the index, the manifest last."""
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


def requests_per_record(url: str, options: dict, order: list[str], n: int = 50) -> float | None:
    """S3 requests sent per random-access lookup (after opening), counted with a botocore event hook."""
    store = open_store(url, storage_options=options)
    fs = store.storage.fs
    if not hasattr(fs, "connect"):
        return None
    sent: list[int] = []
    fs.connect().meta.events.register("before-send.s3", lambda **kw: sent.append(1))
    keys = order[:n]
    for k in keys:
        store.get(k)
    return len(sent) / max(1, len(keys))


def object_storage(tmp: Path, order: list[str], url: str, options: dict, workers: int, repeats: int) -> dict[str, Any]:
    """Section 5: the zstd store read from ``url`` vs from local disk, random access and stream."""
    upload(tmp / "zstd", url, options)
    local, remote = open_store(tmp / "zstd"), open_store(url, storage_options=options)

    def stream_run(where: Any, **kw: Any) -> Callable[[], int]:
        def run() -> int:
            dl = torch.utils.data.DataLoader(stream(where, shuffle_buffer=64, **kw), batch_size=None,
                                             num_workers=workers)
            return sum(1 for _ in dl)
        return run

    ra = interleaved({"open_store local disk": lambda: sum(1 for k in order if local.get(k) is not None),
                      "open_store URL": lambda: sum(1 for k in order if remote.get(k) is not None)}, repeats)
    warm, fresh = tmp / "cache-warm", tmp / "cache-fresh"
    stream_run(url, storage_options=options, cache_dir=warm)()  # fills the cache an epoch 2 reads from
    st = interleaved({"stream local disk": stream_run(tmp / "zstd"),
                      "stream URL": stream_run(url, storage_options=options),
                      "stream URL, cache: 1st epoch": stream_run(url, storage_options=options, cache_dir=fresh),
                      "stream URL, cache: 2nd epoch": stream_run(url, storage_options=options, cache_dir=warm)},
                     repeats, before={"stream URL, cache: 1st epoch": lambda: shutil.rmtree(fresh, ignore_errors=True)})
    where = parse_location(url).display
    out = {"random_access": table(f"5a. open_store from {where}, one process (vs local disk)", ra,
                                  "open_store local disk"),
           "stream": table(f"5b. stream from {where}, DataLoader {workers} workers (vs local disk)", st,
                           "stream local disk"),
           "requests_per_random_record": requests_per_record(url, options, order)}
    print(f"   S3 requests per random-access record: {out['requests_per_random_record']}")
    return out


def cold_sections(ra: dict[str, Callable[[], int]], files: dict[str, list[Path]],
                  loaders: dict[str, Callable[[], int]], args: argparse.Namespace) -> dict[str, Any]:
    """Section 4: every reader with its files dropped from the page cache (and its shards unmapped) first:
    one process (open_store), then a DataLoader with workers (stream)."""
    size = {name: float(sum(p.stat().st_size for p in f)) for name, f in files.items()}
    res = interleaved(ra, args.repeats, before={n: cold(files[n], OPEN_STORES.get(n)) for n in ra})
    out = {"cold": table("4a. cold page cache (unmapped, posix_fadvise DONTNEED before each run), one process",
                         res, "per-image torch.load", extra={n: size[n] for n in ra})}
    by_stream = {n: files[n.replace("stream", "open_store").replace(" dequantize=False", "")] for n in loaders}
    res = interleaved(loaders, args.repeats, before={n: cold(f) for n, f in by_stream.items()})
    out["cold_stream"] = table(f"4b. cold page cache, DataLoader {args.workers} workers (stream vs per-image)", res,
                               "per-image torch.load", extra={n: float(sum(p.stat().st_size for p in f))
                                                              for n, f in by_stream.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=1369, help="patch tokens per image (518x518 -> 1369)")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers in section 3")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codecs to compare")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--work", type=Path, help="keep the data here and reuse it next run (default: a temp folder)")
    ap.add_argument("--quick", "--smoke", action="store_true", help="smoke run: 12 small records, one repeat")
    ap.add_argument("--url", help="section 5: also read the zstd store from this fsspec URL (uploaded there first)")
    ap.add_argument("--storage-options", default="{}", help="JSON options for --url's backend (see docs/object-storage.md)")
    ap.add_argument("--s3-local", action="store_true", help="section 5 against a moto S3 server started here")
    ap.add_argument("--sections", default="1,2,3,4,5", help="comma-separated sections to run")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    url, options = args.url, storage_options_from_json(args.storage_options)
    if args.s3_local:
        url, options = local_s3()
    if url and "zstd" not in args.codecs.split(","):
        ap.error("--url / --s3-local read the zstd store: keep zstd in --codecs")
    if args.quick:
        args.records, args.tokens, args.dim, args.repeats = 12, 64, 128, 1
    codecs = [c for c in args.codecs.split(",") if c]
    with tempfile.TemporaryDirectory(dir=os.environ.get("FEATSTORE_BENCH_TMP")) as tmp_name:
        tmp = args.work or Path(tmp_name)
        keys = prepare(tmp, args.records, args.tokens, args.dim, codecs)
        sizes = {"per-image torch.load": sum(p.stat().st_size for p in (tmp / "data").rglob("*.pt"))}
        sizes.update({c: sum(p.stat().st_size for p in (tmp / c / "shards").glob("*.tar")) for c in codecs})
        order = keys[:]
        random.Random(0).shuffle(order)
        print(f"{args.records} records of [1, {args.tokens}, {args.dim}] bf16; MB per record on disk: "
              + ", ".join(f"{k.split()[0]} {v / args.records / 1e6:.2f}" for k, v in sizes.items()))
        out: dict[str, Any] = {"records": args.records, "shape": [1, args.tokens, args.dim],
                               "bytes_per_record": {k: v / args.records for k, v in sizes.items()}}
        ra = random_access(tmp, order, codecs)
        if "1" in sections:
            res = interleaved(ra, args.repeats)
            out["random_access"] = table("1. one process, warm cache (vs per-image torch.load)", res,
                                         "per-image torch.load")
        if "zstd" in codecs and "2" in sections:
            res2 = interleaved({"bare zstd decompress + unshuffle": bare_zstd(tmp, order),
                                "open_store zstd": ra["open_store zstd"]}, args.repeats)
            out["zstd_vs_bare"] = table("2. zstd codec vs bare decompress + unshuffle of the same bytes", res2,
                                        "bare zstd decompress + unshuffle")
        if "3" in sections:
            res3 = interleaved(loader_readers(tmp, order, codecs, args.workers), args.repeats)
            out["dataloader"] = table(f"3. DataLoader, {args.workers} workers (vs per-image torch.load)", res3,
                                      "per-image torch.load")
        if "int8" in codecs and "3" in sections:
            out["dequantize_ms_per_record"] = dequantize_cost(tmp, min(args.records, 50)) * 1e3
            print(f"   int8 dequantize on the consumer (CPU, 1 thread of the main process): "
                  f"{out['dequantize_ms_per_record']:.2f} ms/record, not included above")
        files = {"per-image torch.load": list((tmp / "data").rglob("*.pt"))}
        files.update({f"open_store {c}": list((tmp / c / "shards").glob("*.tar")) for c in codecs})
        if "4" in sections:
            out.update(cold_sections(ra, files, loader_readers(tmp, order, codecs, args.workers), args))
        if url and "5" in sections:
            out["object_storage"] = object_storage(tmp, order, url, options, args.workers, args.repeats)
        out["targets"] = targets(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
