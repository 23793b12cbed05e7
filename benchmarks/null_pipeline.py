"""``build_bench.py --model null``: the build pipeline without the model, and the CPU each image costs.

Decode-only (the build's loader and batching) and end to end (the real loop with the stand-in model: decode,
batching, device copies, encode, write) on the same images and workers; then a CPU budget per image from
per-thread and per-process CPU times, the capacity those costs allow on the cores used, and where the rest
of the cores' time went (other processes on the machine, idle).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from cpu_budget import GilProbe, ProcessProbe, Span, cores_used, encode_breakdown, measure
from featstore.build.orchestrator import Build, BuildOptions
from featstore.build.pipeline import DecodeOptions, WorkItem

MAIN_TARGET_MS = 1.0
CAPACITY_TARGET = 0.9


def run_e2e(opts: BuildOptions, items: list[WorkItem]) -> tuple[Build, Span]:
    """The real build loop into a fresh store with the null model; its build and the CPU it took."""
    b = Build(opts)
    b.load_model()
    b.prepare_output()
    size = opts.image_size
    b.extractor.run(torch.zeros(1, 3, size, size, dtype=torch.uint8, device=b.device))  # warm-up
    with GilProbe() as probe, ProcessProbe() as os_probe:
        _, span = measure(lambda: b.run_loop(items))
    b.gil_delays_ms = {"in_process": probe.summary_ms(), "own_process": os_probe.summary_ms()}  # type: ignore
    return b, span


def budget(b: Build, e2e: Span, n: int) -> dict[str, float]:
    """ms of CPU per image of each part of the end-to-end run."""
    st = b.stats.stage_seconds
    encode, writer = st.get("writer_encode_cpu", 0.0), st.get("writer_thread_cpu", 0.0)
    parts = {"main_thread": e2e.main, "decode_workers": e2e.children, "encode": encode, "write": writer,
             "other_threads": max(0.0, e2e.process - e2e.main - encode - writer)}
    return {k: v * 1e3 / n for k, v in parts.items()}


def report(args: argparse.Namespace, n: int, dec: Span, e2e: Span, b: Build, enc: dict[str, float]) -> dict[str, Any]:
    """Print the tables and return the JSON figures."""
    cores = cores_used()
    per = budget(b, e2e, n)
    total_ms = sum(per.values())
    capacity = cores * 1e3 / total_ms
    rate, dec_rate = n / e2e.wall, n / dec.wall
    print(f"device {b.device} | model null | {n} images {args.size} -> {args.preprocess} "
          f"{tuple(b.stats.shapes)} | batch {args.batch_size} | workers {args.workers} | writer threads "
          f"{b.opts.writer_threads} | store dtype {b.store_dtype} | cores {cores}")
    print(f"decode-only   {dec_rate:9.2f} img/s   (decode CPU {dec.children * 1e3 / n:.2f} ms/img in the workers, "
          f"main thread {dec.main * 1e3 / n:.2f} ms/img)")
    print(f"end-to-end    {rate:9.2f} img/s   (ratio to decode-only {rate / dec_rate:.3f})")
    print("CPU budget per image (ms of CPU, end-to-end run):")
    for k, v in per.items():
        print(f"  {k:15s} {v:8.2f}")
    print(f"  {'total':15s} {total_ms:8.2f}")
    print(f"capacity on {cores} cores: {capacity:.2f} img/s; end-to-end / capacity = {rate / capacity:.3f} "
          f"(target >= {CAPACITY_TARGET}); main thread {per['main_thread']:.3f} ms/img (target <= {MAIN_TARGET_MS})")
    avail = cores * e2e.wall
    ours = e2e.process + e2e.children
    left = max(1e-9, 1 - e2e.others / avail)  # the share of the cores other processes left this run
    print(f"capacity on the CPU other processes left ({left:.0%} of {cores} cores): {capacity * left:.2f} img/s; "
          f"end-to-end / that = {rate / (capacity * left):.3f}")
    print(f"where the cores' {avail:.2f} s went: this build {ours:.2f} s ({ours / avail:.0%}), other processes "
          f"{e2e.others:.2f} s ({e2e.others / avail:.0%}), idle {max(0.0, avail - ours - e2e.others):.2f} s "
          f"({max(0.0, avail - ours - e2e.others) / avail:.0%})")
    gil = b.gil_delays_ms  # type: ignore[attr-defined]
    for where, d in (("in this process (GIL + OS)", gil["in_process"]), ("in a process of its own (OS)", gil["own_process"])):
        print(f"probe thread waking every 1 ms {where}: late by p50 {d['p50']:.2f}, p99 {d['p99']:.2f}, "
              f"max {d['max']:.1f} ms")
    print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(b.stats.stage_seconds.items())))
    print("encode passes of one record (ms of one core): " + ", ".join(f"{k} {v:.2f}" for k, v in enc.items()))
    return {"images": n, "cores": cores, "main_thread_cpu_ms_per_image": per["main_thread"],
            "decode_cpu_ms_per_image": per["decode_workers"], "encode_cpu_ms_per_image": per["encode"],
            "write_cpu_ms_per_image": per["write"], "other_cpu_ms_per_image": per["other_threads"],
            "total_cpu_ms_per_image": total_ms, "decode_only_cpu_ms_per_image": dec.children * 1e3 / n,
            "e2e_images_per_s": rate, "decode_only_images_per_s": dec_rate, "capacity_images_per_s": capacity,
            "e2e_over_capacity": rate / capacity, "others_cpu_share": e2e.others / avail,
            "e2e_over_available_capacity": rate / (capacity * left),
            "targets": {"main_thread_cpu_ms_per_image": {"target": MAIN_TARGET_MS, "met": per["main_thread"] <= MAIN_TARGET_MS},
                        "e2e_over_capacity": {"target": CAPACITY_TARGET, "met": rate / capacity >= CAPACITY_TARGET}},
            "stage_seconds": dict(b.stats.stage_seconds), "encode_record_ms": enc, "gil_probe_late_ms": gil}


def null_main(args: argparse.Namespace, root: Path, tmp: str, items: list[WorkItem]) -> None:
    """Decode-only vs end to end with the null model, and the CPU budget per image."""
    from build_bench import decoded_count

    opts = BuildOptions(data_root=root, model="null", out=Path(tmp) / "e2e", device=args.device,
                        batch_size=args.batch_size, num_workers=args.workers, preprocess=args.preprocess,
                        image_size=args.image_size, dtype=args.dtype or "bfloat16", progress=False, fsync=False,
                        **({"writer_threads": args.writer_threads} if args.writer_threads else {}))
    decode = DecodeOptions(args.preprocess, args.image_size)
    n, dec = measure(lambda: decoded_count(items, decode, args.workers, args.batch_size))
    b, e2e = run_e2e(opts, items)
    assert b.stats.processed == n == len(items), (b.stats.processed, n)
    size = args.image_size
    feats = b.model(torch.zeros(1, 1, 3, size, size), layers=(0,))[0][0, :, b.model.patch_start_idx:]
    res = report(args, n, dec, e2e, b, encode_breakdown(feats.to(b.store_dtype).cpu().contiguous()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
