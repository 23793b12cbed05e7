"""Per-sample context features: prefix sharing against JanusVLN's way (one sample at a time), same run.

    python benchmarks/context_bench.py            # tiny model, CPU, episodes of 20, 50 and 100 frames
    python benchmarks/context_bench.py --quick    # smoke test: small episodes, 14x14 frames
    python benchmarks/context_bench.py --model vggt-1b-random --device cuda --height 490 --width 644 \\
        --batch-size 8 --episodes 1 --lengths 20          # full size at JanusVLN's geometry on a GPU

Samples are JanusVLN episodes (history 8: step i streams frames range(i+1) or linspace(0, i, 9)). Frames
are random tensors prepared on the device before timing, so only the model and the executor are timed.
For each episode length the same samples run as: ``none`` at B=1 (JanusVLN's way: one sample at a time,
the baseline), ``none`` batched, ``prefix`` (samples that are prefixes of another share its pass) and
``tree`` (every shared prefix once). Printed: frame passes per sample, steps, samples/s, frame passes/s,
the ratio of samples/s to the baseline, and the plan's peak KV cache (frames, and bytes for VGGT-1B at
644 pixels: 1615 tokens, 23 cached layers for layer -2, bf16). Goal (issue 13): tree >= 1.6x.

    python benchmarks/context_bench.py --context joint [--quick]   # VG-LLM's joint samples (issue 17)

``--context joint``: a ScanNet-like annotation set (``--scenes`` scenes of ``--frames`` frames, ``--questions``
questions per scene, all naming the scene's one frame list). The same samples run as VG-LLM computes them (one
sample at a time, B=1: the baseline), batched (``--batch-size`` samples of one frame count per call), and
batched after deduplication (one record per frame list, featstore.discover.dedup); printed: samples/s, the
ratio to the baseline, and the dedup ratio (records stored / samples).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from featstore.build.context import PlanExecutor, kv_bytes_per_frame  # noqa: E402
from featstore.model import get_config, load_vggt  # noqa: E402
from featstore.discover.samples import Sample, episode_samples, make_sample  # noqa: E402
from featstore.build.schedule import build_forest, peak_cache_frames, plan_steps  # noqa: E402

JANUSVLN_FRAME_BYTES = kv_bytes_per_frame(get_config("vggt-1b"), (490, 644), 22, torch.bfloat16)
CONFIGS = (("none", 1, "JanusVLN's way (B=1)"), ("none", None, "none, batched"), ("prefix", None, "prefix"),
           ("tree", None, "tree"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: episodes of 12 and 20 frames, 14x14 frames, B=4")
    p.add_argument("--lengths", default="20,50,100", help="episode lengths (comma separated)")
    p.add_argument("--episodes", type=int, default=2, help="episodes per length")
    p.add_argument("--height", type=int, default=28)
    p.add_argument("--width", type=int, default=42)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--model", default="tiny", help="tiny | vggt-1b-random | a checkpoint path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights and activations (bfloat16 on a GPU, as a build runs there)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the tiny model's ops are small)")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per configuration (best is kept)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--context", choices=("sample", "joint"), default="sample",
                   help="sample: JanusVLN's streamed samples; joint: VG-LLM's joint samples")
    p.add_argument("--scenes", type=int, default=4, help="--context joint: scenes (one frame list each)")
    p.add_argument("--frames", type=int, default=8, help="--context joint: frames per scene")
    p.add_argument("--questions", type=int, default=6, help="--context joint: annotation records per scene")
    args = p.parse_args(argv)
    if args.quick and args.context == "joint":
        args.scenes, args.frames, args.questions, args.height, args.width, args.repeat = 2, 4, 3, 14, 14, 1
    elif args.quick:
        args.lengths, args.episodes, args.height, args.width, args.batch_size, args.repeat = "12,20", 1, 14, 14, 4, 1
    return args


def make_episodes(length: int, count: int, shape: tuple[int, int], device: torch.device,
                  dtype: torch.dtype) -> tuple[list[Sample], dict[str, torch.Tensor]]:
    """`count` JanusVLN episodes of `length` frames: their samples and a random frame per key on the device."""
    gen = torch.Generator().manual_seed(length)
    samples, frames = [], {}
    for e in range(count):
        keys = [f"len{length}/ep{e}/{i:04d}.jpg" for i in range(length)]
        samples += episode_samples(keys)
        frames.update((k, torch.rand(3, *shape, generator=gen).to(device, dtype)) for k in keys)
    return samples, frames


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plan(model, steps, frames: dict[str, torch.Tensor], device: torch.device) -> float:
    """Seconds to run the plan and touch every sample's features."""
    executor = PlanExecutor(model, (-2,))
    sync(device)
    start = time.perf_counter()
    count = sum(1 for _ in executor.run(steps, lambda st: torch.stack([frames[f] for f in st.distinct_frames])))
    sync(device)
    assert count == sum(len(st.samples()) for st in steps)
    return time.perf_counter() - start


def measure_length(model, args: argparse.Namespace, length: int, device: torch.device) -> list[dict]:
    """Every configuration on the same samples; the first is the baseline."""
    dtype = next(model.parameters()).dtype
    samples, frames = make_episodes(length, args.episodes, (args.height, args.width), device, dtype)
    plans = [(strategy, b or args.batch_size, label, plan_steps(samples, b or args.batch_size, strategy=strategy))
             for strategy, b, label in CONFIGS]
    best = {label: float("inf") for *_, label, _ in plans}
    time_plan(model, plans[-1][3][:4], frames, device)  # warm-up
    for _ in range(args.repeat):  # interleaved, so a noisy neighbour hits every configuration alike
        for strategy, b, label, steps in plans:
            best[label] = min(best[label], time_plan(model, steps, frames, device))
    rows = []
    for strategy, b, label, steps in plans:
        passes = build_forest(samples, strategy).num_nodes
        rows.append({"length": length, "config": label, "strategy": strategy, "batch": b, "samples": len(samples),
                     "passes_per_sample": passes / len(samples), "steps": len(steps),
                     "samples_per_s": len(samples) / best[label], "frame_passes_per_s": passes / best[label],
                     "peak_cache_frames": peak_cache_frames(steps)})
    for r in rows:
        r["ratio"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'len':>4} {'configuration':<22} {'B':>3} {'passes/sample':>13} {'steps':>6} {'samples/s':>10} "
          f"{'passes/s':>9} {'x JanusVLN':>10} {'peak cache':>10} {'at 644 bf16':>11}")
    for r in rows:
        gib = r["peak_cache_frames"] * JANUSVLN_FRAME_BYTES / 2 ** 30
        print(f"{r['length']:>4} {r['config']:<22} {r['batch']:>3} {r['passes_per_sample']:>13.2f} {r['steps']:>6} "
              f"{r['samples_per_s']:>10.1f} {r['frame_passes_per_s']:>9.1f} {r['ratio']:>9.2f}x "
              f"{r['peak_cache_frames']:>10} {gib:>8.1f} GiB")


def measure_joint(model, args: argparse.Namespace, device: torch.device) -> None:
    """VG-LLM's joint samples: B=1 per sample (baseline), batched, and batched over the deduplicated records."""
    from featstore.discover.dedup import dedup_samples
    from featstore.discover.samples import SampleItem
    from featstore.model import joint_features

    gen = torch.Generator().manual_seed(0)
    dtype = next(model.parameters()).dtype
    scenes = [torch.rand(args.frames, 3, args.height, args.width, generator=gen).to(device, dtype)
              for _ in range(args.scenes)]
    items = [SampleItem(make_sample([f"scene{s}/{i:03d}.jpg" for i in range(args.frames)], "first", f"q{s}-{q}"),
                        ()) for s in range(args.scenes) for q in range(args.questions)]
    records = dedup_samples(items)
    per_sample = [scenes[int(it.frames[0].split("/")[0][5:])] for it in items]
    per_record = [scenes[int(it.frames[0].split("/")[0][5:])] for it in records]

    def run(frames: list[torch.Tensor], batch: int) -> float:
        sync(device)
        start = time.perf_counter()
        for a in range(0, len(frames), batch):
            joint_features(model, torch.stack(frames[a:a + batch]), (-2,))
        sync(device)
        return time.perf_counter() - start

    run(per_record[:1], 1)  # warm-up
    best = {"VG-LLM's way (B=1)": float("inf"), "batched": float("inf"), "batched, deduplicated": float("inf")}
    for _ in range(args.repeat):
        best["VG-LLM's way (B=1)"] = min(best["VG-LLM's way (B=1)"], run(per_sample, 1))
        best["batched"] = min(best["batched"], run(per_sample, args.batch_size))
        best["batched, deduplicated"] = min(best["batched, deduplicated"], run(per_record, args.batch_size))
    base = len(items) / best["VG-LLM's way (B=1)"]
    print(f"{len(items)} samples ({args.scenes} scenes x {args.questions} questions, {args.frames} frames of "
          f"{args.height}x{args.width}); dedup: {len(records)} records / {len(items)} samples = "
          f"{len(records) / len(items):.3f}")
    for label, secs in best.items():
        print(f"  {label:<24} B={1 if 'B=1' in label else args.batch_size:>3} {len(items) / secs:>10.1f} samples/s "
              f"{len(items) / secs / base:>6.2f}x")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_vggt(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    if args.context == "joint":
        measure_joint(model, args, device)
        return 0
    print(f"model {args.model} ({args.dtype}) on {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, frames {args.height}x{args.width}, B={args.batch_size}, "
          f"{args.episodes} episode(s) per length, {torch.get_num_threads()} CPU thread(s)")
    print(f"KV cache per frame per sample, VGGT-1B at 644 (490x644, 1615 tokens, 23 layers, bf16): "
          f"{JANUSVLN_FRAME_BYTES / 2 ** 20:.1f} MiB")
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        rows += measure_length(model, args, length, device)
    print_rows(rows)
    for length in dict.fromkeys(r["length"] for r in rows):
        by = {r["config"]: r for r in rows if r["length"] == length}
        tree, batched = by["tree"], by["none, batched"]
        print(f"episodes of {length}: tree {tree['ratio']:.2f}x JanusVLN's way, "
              f"{tree['samples_per_s'] / batched['samples_per_s']:.2f}x batched one-pass-per-sample "
              f"(goal >= 1.6x)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows},
                                        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
