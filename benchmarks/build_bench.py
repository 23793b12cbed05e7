"""End-to-end build throughput against its own stages, measured in the same run on the same images.

    python benchmarks/build_bench.py                       # CPU: tiny model, 96 images
    python benchmarks/build_bench.py --model vggt-1b-random --device cuda --n 1024 --batch-size 32

    python benchmarks/build_bench.py --model null --n 192 --json out.json   # the pipeline without the model

Prints, for the same synthetic JPEG set:

* decode-only images/s (DataLoader workers: read + decode + preprocess, what the build's loader does),
* model-only images/s (preprocessed batches already on the device),
* end-to-end build images/s (the real pipelined loop writing zstd shards),

and the ratios end-to-end / model-only (GPU target >= 0.9: the pipeline hides decode and write) and
end-to-end / decode-only (on CPU the model is the bottleneck, so expect well below 1). Then bytes per
image for each output format and storage dtype, from real stores of the same images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
for _p in (REPO_ROOT, REPO_ROOT / "benchmarks"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from featstore.build.orchestrator import Build, BuildOptions  # noqa: E402
from featstore.build.context import PlanExecutor  # noqa: E402
from featstore.build.pipeline import (DecodeOptions, ImageDataset, StepDataset, WorkItem, image_loader,  # noqa: E402
                                      make_loader, shape_batches)
from featstore.model.preprocess import to_unit_float  # noqa: E402
from featstore.discover.samples import SampleItem, episode_samples  # noqa: E402
from featstore.build.schedule import plan_steps  # noqa: E402
from null_pipeline import null_main  # noqa: E402


def make_jpegs(root: Path, n: int, size: tuple[int, int], per_episode: int = 50) -> list[WorkItem]:
    """``n`` smooth-with-noise JPEGs (camera-like content, so decode cost is realistic)."""
    rng = np.random.RandomState(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    items = []
    for i in range(n):
        base = (np.sin(xx / (20 + i % 7)) + np.cos(yy / (15 + i % 5))) * 60 + 128
        img = np.stack([base, base[::-1], base[:, ::-1]], -1) + rng.normal(0, 12, (h, w, 3))
        p = root / f"ep{i // per_episode:03d}" / f"frame.{i % per_episode:03d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(p, quality=90)
        items.append(WorkItem(str(p.relative_to(root)), str(p)))
    return items


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_only(items: list[WorkItem], mode: str, workers: int, batch: int) -> float:
    """images/s of the build's decode stage alone (the build's loader and batching, nothing after them)."""
    t = time.perf_counter()
    return decoded_count(items, DecodeOptions(mode), workers, batch) / (time.perf_counter() - t)


def decoded_count(items: list[WorkItem], opts: DecodeOptions, workers: int, batch: int) -> int:
    """Images the build's loader and batching deliver, nothing after them."""
    return sum(b.images.shape[0] for b in shape_batches(image_loader(items, opts, batch, workers), batch,
                                                        lambda d: None))


def model_only(b: Build, items: list[WorkItem], mode: str, batch: int) -> float:
    """images/s of the model alone on batches already preprocessed and resident on the device."""
    loader = make_loader(ImageDataset(items, DecodeOptions(mode)), 0)
    batches = [x.images.to(b.device) for x in shape_batches(loader, batch, lambda d: None)]
    b.extractor.run(batches[0])  # warm-up (kernels, compile)
    sync(b.device)
    t = time.perf_counter()
    for x in batches:
        b.extractor.run(x)
    sync(b.device)
    return sum(x.shape[0] for x in batches) / (time.perf_counter() - t)


def end_to_end(opts: BuildOptions, items: list[WorkItem], model: torch.nn.Module) -> float:
    """images/s of the real build loop (decode, infer, compress, write overlapped) into a fresh store.

    Also prints where the pipeline's threads waited (the build's own stage counters)."""
    b = Build(opts)
    b.load_model(model)
    b.prepare_output()
    b.extractor.run(torch.zeros(1, 3, 518, 518, device=b.device))  # same warm-up as model_only
    sync(b.device)
    t = time.perf_counter()
    b.run_loop(items)
    sync(b.device)
    rate = b.stats.processed / (time.perf_counter() - t)
    stages = ", ".join(f"{k} {v:.2f}" for k, v in sorted(b.stats.stage_seconds.items()))
    print(f"  end-to-end stage seconds: {stages}")
    return rate


def store_bytes(opts: BuildOptions, items: list[WorkItem], model: torch.nn.Module) -> float:
    """Bytes per image of a finished store in ``opts.format`` (records only, not index or manifest)."""
    b = Build(opts)
    b.load_model(model)
    b.prepare_output()
    b.run_loop(items)
    out = Path(opts.out)  # type: ignore[arg-type]
    files = list(out.rglob("*.tar")) if opts.format == "shards" else list(out.rglob("*.vggt_cache.pt"))
    return sum(f.stat().st_size for f in files) / max(1, b.stats.processed)


def episode_items(items: list[WorkItem], history: int) -> list[SampleItem]:
    """JanusVLN's training samples of the generated episodes (one per frame, history rule)."""
    by_episode: dict[str, list[WorkItem]] = {}
    for it in items:
        by_episode.setdefault(it.key.split("/")[0], []).append(it)
    out = []
    for frames in by_episode.values():
        path = {it.key: it.path for it in frames}
        out += [SampleItem(s, tuple(path[k] for k in s.frames)) for s in episode_samples([it.key for it in frames], history)]
    return out


def context_rates(b: Build, opts: BuildOptions, samples: list[SampleItem], workers: int) -> tuple[float, float, float]:
    """samples/s of the context build's stages on the same samples: decode-only (each step's frames), model-only
    (the plan on frames already on the device) and end-to-end (the real loop into a fresh store)."""
    todo, sizes = b.frame_sizes(samples)
    steps = plan_steps([it.sample for it in todo], opts.batch_size, sizes.__getitem__)
    paths = {k: p for it in todo for k, p in zip(it.sample.frames, it.paths)}
    t = time.perf_counter()
    decoded = list(make_loader(StepDataset(steps, paths, b.decode_options()), workers))
    dec = len(samples) / (time.perf_counter() - t)
    frames = [to_unit_float(d.images.to(b.device)) for d in decoded]
    executor = PlanExecutor(b.model, b.layers, b.store_dtype)
    sync(b.device)
    t = time.perf_counter()
    sum(1 for _ in executor.run(steps, frames))
    sync(b.device)
    mod = len(samples) / (time.perf_counter() - t)
    e = Build(opts)
    e.load_model(b.model)
    e.prepare_output()
    sync(e.device)
    t = time.perf_counter()
    e.run_sample_loop(samples)
    sync(e.device)
    e2e = e.stats.processed / (time.perf_counter() - t)
    print("  end-to-end stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(e.stats.stage_seconds.items())))
    return dec, mod, e2e


def context_main(args: argparse.Namespace, root: Path, tmp: str, items: list[WorkItem]) -> None:
    """The --context sample comparison (JanusVLN samples of the generated episodes)."""
    samples = episode_items(items, args.history)

    def opts(out: str) -> BuildOptions:
        return BuildOptions(data_root=root, model=args.model, out=Path(tmp) / out, device=args.device,
                            batch_size=args.batch_size, num_workers=args.workers, preprocess=args.preprocess,
                            image_size=args.image_size, context="sample", history=args.history, dtype=args.dtype,
                            progress=False, fsync=False, **({"writer_threads": args.writer_threads}
                                                            if args.writer_threads else {}))

    b = Build(opts("probe"))
    b.first_image = items[0].path  # compile (auto: on CUDA) warms up before the timed runs
    b.load_model()
    dec, mod, e2e = context_rates(b, opts("e2e"), samples, args.workers)
    card = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else "cpu"
    print(f"device {card} | model {args.model} | --context sample | {len(samples)} samples of {args.n // args.per_episode} "
          f"episodes ({args.n} frames {args.size} -> {args.preprocess} {args.image_size}) | batch {args.batch_size} | "
          f"workers {args.workers} | store dtype {b.store_dtype}")
    print(f"decode-only   {dec:9.2f} samples/s")
    print(f"model-only    {mod:9.2f} samples/s")
    print(f"end-to-end    {e2e:9.2f} samples/s")
    print(f"ratio end-to-end / model-only  = {e2e / mod:.3f}")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, vggt-1b-random, a checkpoint, or null: the stand-in "
                    "model (decode-only vs end to end and the CPU budget per image; 640x640 sources by default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=96, help="images")
    ap.add_argument("--size", default="640x480", help="source image size WxH")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--preprocess", default="crop")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--sizes-n", type=int, default=16, help="images for the bytes-per-image table (0: skip it)")
    ap.add_argument("--writer-threads", type=int, default=None, help="encode threads of the build (default: the build's)")
    ap.add_argument("--out-dir", default=None, help="where the stores are written (default: a temporary folder)")
    ap.add_argument("--context", choices=("image", "sample"), default="image",
                    help="sample: compare the per-sample context build's stages instead (JanusVLN samples of the "
                         "generated episodes)")
    ap.add_argument("--image-size", type=int, default=518, help="preprocessing target size (JanusVLN: 644)")
    ap.add_argument("--history", type=int, default=8, help="--context sample: JanusVLN's history frames")
    ap.add_argument("--per-episode", type=int, default=50, help="frames per generated episode")
    ap.add_argument("--json", default=None, help="--model null: write the figures to this JSON file")
    args = ap.parse_args()
    if args.model == "null" and args.size == "640x480":
        args.size = "640x640"  # crop -> 518x518: full-size [1, 1369, 2048] outputs
    return args


def main() -> None:
    args = parse_args()
    w, h = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory(dir=args.out_dir) as tmp:
        root = Path(tmp) / "data"
        items = make_jpegs(root, args.n, (w, h), args.per_episode)
        if args.context == "sample":
            return context_main(args, root, tmp, items)
        if args.model == "null":
            return null_main(args, root, tmp, items)

        def opts(out: str, **kw) -> BuildOptions:
            base = dict(data_root=root, model=args.model, out=Path(tmp) / out, device=args.device,
                        batch_size=args.batch_size, num_workers=args.workers, preprocess=args.preprocess,
                        dtype=args.dtype, compile=args.compile or "auto", progress=False, fsync=False)
            if args.writer_threads:
                base["writer_threads"] = args.writer_threads
            base.update(kw)
            return BuildOptions(**base)

        b = Build(opts("probe"))
        b.first_image = items[0].path  # compile (auto: on CUDA) warms up at the images' shape
        b.load_model()
        dec = decode_only(items, args.preprocess, args.workers, args.batch_size)
        mod = model_only(b, items, args.preprocess, args.batch_size)
        e2e = end_to_end(opts("e2e"), items, b.model)
        dev = b.device
        card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        print(f"device {card} | model {args.model} | {args.n} images {args.size} -> {args.preprocess} | "
              f"batch {args.batch_size} | workers {args.workers} | store dtype {b.store_dtype}")
        print(f"decode-only   {dec:9.2f} img/s")
        print(f"model-only    {mod:9.2f} img/s")
        print(f"end-to-end    {e2e:9.2f} img/s")
        print(f"ratio end-to-end / model-only  = {e2e / mod:.3f}   (GPU target >= 0.9)")
        print(f"ratio end-to-end / decode-only = {e2e / dec:.3f}")
        sub = items[: args.sizes_n]
        if not sub:
            return
        print(f"bytes per image ({args.model}, {len(sub)} images):")
        for fmt in ("shards", "per-image"):
            for dt in ("float32", "bfloat16", "float16"):
                bpi = store_bytes(opts(f"sz-{fmt}-{dt}", format=fmt, dtype=dt), sub, b.model)
                print(f"  {fmt:9s} {dt:8s} {bpi / 1e6:8.3f} MB")


if __name__ == "__main__":
    main()
