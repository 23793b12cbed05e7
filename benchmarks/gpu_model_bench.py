"""GPU throughput of the VGGT aggregator against a bf16 matmul measured in the same run.

    python benchmarks/gpu_model_bench.py                 # H100/H200: full size, 518 & 504, B 32 & 64, eager + compile
    python benchmarks/gpu_model_bench.py --smoke         # CPU: tiny model, tiny sizes (checks the script itself)

Model: "vggt-1b-random" (official VGGT-1B sizes, golden rule weights; speed does not depend on the
values). Each image is its own sequence ([B, 1, 3, H, W], as when caching per-image features), run to
the requested layer (default -2, the feature layer). FLOPs are counted analytically for the
layers actually run (patch conv, 24 DINO blocks, frame+global blocks up to the requested layer; 3.046
TFLOP per 518x518 image for all 72 blocks) and cross-checked with torch's FlopCounterMode on the same
call; TFLOP/s is divided by the bf16 8192^3 matmul rate of the same run to give the ratio.
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

from featstore.model import VGGTAggregator, VGGTConfig, load_vggt  # noqa: E402


def analytic_flops(cfg: VGGTConfig, h: int, w: int, layers_run: int, attention: bool = True) -> float:
    """Multiply-add FLOPs (x2) per image ([1,1,3,h,w]): patch conv, DINO blocks, `layers_run` frame+global pairs.

    `attention=False` leaves out q k^T and attn v (torch's FlopCounterMode does not count CPU SDPA).
    """
    n_patch = (h // cfg.patch_size) * (w // cfg.patch_size)
    c = cfg.embed_dim

    def block(n: int, mlp_ratio: float) -> float:
        linear = 2 * n * c * c * (3 + 1 + 2 * mlp_ratio)  # qkv, proj, fc1 + fc2
        attn = 2 * 2 * n * n * c if attention else 0  # q k^T and attn v
        return linear + attn

    conv = 2 * n_patch * c * cfg.in_chans * cfg.patch_size ** 2
    n_dino = 1 + cfg.dino_num_register_tokens + n_patch
    n_agg = cfg.patch_start_idx + n_patch
    return conv + cfg.dino_depth * block(n_dino, cfg.dino_mlp_ratio) + 2 * layers_run * block(n_agg, cfg.mlp_ratio)


def counted_flops(model: torch.nn.Module, images: torch.Tensor, layer: int) -> float:
    """FLOPs of one call, counted by torch.utils.flop_counter on the real operators."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(images, layers=(layer,))
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def matmul_rate(n: int, dtype: torch.dtype, device: torch.device, iters: int) -> float:
    """FLOP/s of an n x n x n matmul in `dtype`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sec = time_calls(lambda: torch.mm(a, b), device, warmup=3, iters=iters)
    return 2 * n ** 3 / sec


def compile_model(model: VGGTAggregator, scope: str, backend: str, mode: str | None = None):
    """Compiled callable: every transformer block compiled in place as the build does ("blocks",
    featstore.model.compile), or the whole model ("model")."""
    if scope == "model":
        return torch.compile(model, backend=backend, dynamic=False)
    from featstore.model.compile import compile_blocks

    compile_blocks(model, mode=mode, backend=backend)  # identical blocks share one compiled graph per shape
    return model


def feature_error(ref: dict[int, torch.Tensor], got: dict[int, torch.Tensor]) -> dict[int, dict[str, float]]:
    """Per layer: max abs and relative L2 of `got` against `ref` (float32)."""
    from featstore.model.fp8 import feature_error as error

    return error(ref, got)


def fp8_part(model, args, device, size: int, batch: int, backend: str, layers: list[int]) -> dict:
    """bf16 against FP8 block linears on the same batch: rate of each (compiled as --compile says) and the
    FP8 features' error against bf16 per layer in `layers`."""
    from featstore.model.fp8 import convert_fp8, fp8_backend

    images = torch.rand(batch, 1, 3, size, size, device=device, generator=None)
    compiled = args.compile != "off"
    run = compile_model(model, "blocks", backend, args.compile_mode) if compiled else model
    rows = {}
    for name in ("bf16", "fp8"):
        if name == "fp8":
            how = args.fp8_backend or fp8_backend(device)
            convert_fp8(model, how)
        with torch.no_grad():
            t = time.perf_counter()
            feats = run(images, layers=tuple(layers))
            sync(device)
            first = time.perf_counter() - t
            sec = time_calls(lambda: run(images, layers=(layers[-1],)), device, args.warmup or 2, args.iters or 5)
        rows[name] = {"img_per_s": batch / sec, "first_call_s": first,
                      "features": {i: f.float().cpu() for i, f in feats.items()}}
    err = feature_error(rows["bf16"]["features"], rows["fp8"]["features"])
    for r in rows.values():
        del r["features"]
    out = {"size": size, "batch": batch, "compiled": compiled, "fp8_backend": how, "bf16": rows["bf16"],
           "fp8": rows["fp8"], "speedup": rows["fp8"]["img_per_s"] / rows["bf16"]["img_per_s"], "error": err}
    print(f"fp8 ({how}) vs bf16 at {size}x{size} B={batch} ({'compiled' if compiled else 'eager'}): "
          f"bf16 {rows['bf16']['img_per_s']:.1f} img/s, fp8 {rows['fp8']['img_per_s']:.1f} img/s "
          f"({out['speedup']:.2f}x; first calls {rows['bf16']['first_call_s']:.1f} s / {rows['fp8']['first_call_s']:.1f} s)")
    for layer, e in err.items():
        print(f"  layer {layer}: rel L2 {e['rel_l2'] * 100:.3f}%, max abs {e['max_abs']:.4g} (features up to "
              f"{e['ref_max_abs']:.3g})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on CPU, small sizes, 2 iterations, eager compile backend (tests the script)")
    p.add_argument("--model", default=None, help='load_vggt source (default "vggt-1b-random"; "tiny" with --smoke)')
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="weights and activations dtype (default bfloat16)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="square image sides (default 518 504)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 32 64)")
    p.add_argument("--layer", type=int, default=-2, help="deepest layer computed (default -2, the feature layer)")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both",
                   help="run eager, torch.compile, or both (default both)")
    p.add_argument("--compile-scope", choices=["blocks", "model"], default="blocks",
                   help="compile each block (fast to compile, default) or the whole model")
    p.add_argument("--compile-backend", default=None, help='torch.compile backend (default "inductor"; "eager" with --smoke)')
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per configuration (default 2)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per configuration (default 5)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 matmul baseline (default 8192)")
    p.add_argument("--sdpa", choices=["default", "cudnn", "flash", "efficient"], default="default",
                   help="scaled_dot_product_attention backend tried first (default: torch's own priority)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode of the blocks (default: torch's)")
    p.add_argument("--fp8", action="store_true",
                   help="instead of the table: bf16 against FP8 block linears (torchao on CUDA, emulated on CPU) at "
                        "the first size and batch, rate of each and the FP8 feature error per layer of --fp8-layers")
    p.add_argument("--fp8-backend", choices=("torchao", "scaled_mm", "emulate"), default=None,
                   help="how FP8 matmuls run (default: torchao on CUDA, emulate on CPU; scaled_mm: torch._scaled_mm)")
    p.add_argument("--fp8-layers", default=None,
                   help="layers whose FP8 error is measured (default -13,-2; -2,-1 with --smoke)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = p.parse_args(argv)

    smoke = args.smoke
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not smoke else "cpu"))
    dtype = getattr(torch, args.dtype)
    source = args.model or ("tiny" if smoke else "vggt-1b-random")
    sizes = args.sizes or ([56, 42] if smoke else [518, 504])
    batches = args.batches or ([2] if smoke else [32, 64])
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 2)
    iters = args.iters if args.iters is not None else (2 if smoke else 5)
    mm_n = args.matmul_size or (256 if smoke else 8192)
    backend = args.compile_backend or ("eager" if smoke else "inductor")
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for name in ("recompile_limit", "cache_size_limit"):  # one entry per (block kind, shape)
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    with sdpa_priority(args.sdpa):
        if args.fp8:
            return measure_fp8(args, device, dtype, source, sizes[0], batches[0], backend)
        return measure(args, smoke, device, dtype, source, sizes, batches, warmup, iters, mm_n, backend, modes)


def measure_fp8(args, device, dtype, source, size, batch, backend) -> int:
    """The --fp8 part: print and (with --json) write `fp8_part`."""
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {dev_name}; torch {torch.__version__}; model {source}; fp8 against {args.dtype}")
    model = load_vggt(source, device=device, dtype=dtype)
    text = args.fp8_layers or ("-2,-1" if args.smoke else "-13,-2")
    layers = model.normalize_layers([int(x) for x in text.split(",")])
    res = fp8_part(model, args, device, size, batch, backend, layers)
    if args.json:
        args.json.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "model": source,
                                         "fp8": res}, indent=1))
    return 0


def sdpa_priority(choice: str):
    """A context that makes `choice` the first SDPA backend torch tries (the others stay as fallbacks)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice == "default":
        return contextlib.nullcontext()
    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[choice]
    rest = [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH) if b != first]
    return sdpa_kernel([first, *rest], set_priority=True)


def measure(args, smoke, device, dtype, source, sizes, batches, warmup, iters, mm_n, backend, modes) -> int:
    """Run every (compile, size, batch) configuration and print one line each."""
    t_start = time.perf_counter()
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {dev_name}; torch {torch.__version__}; dtype {args.dtype}; model {source}; sdpa {args.sdpa}")
    mm = matmul_rate(mm_n, dtype, device, iters=20 if not smoke else 3)
    print(f"matmul {mm_n}^3 {args.dtype}: {mm / 1e12:.1f} TFLOP/s")

    t0 = time.perf_counter()
    model = load_vggt(source, device=device, dtype=dtype)
    layer = model.normalize_layers(args.layer)[0]
    print(f"load {time.perf_counter() - t0:.1f} s; config {model.config.name}; layers run {layer + 1} of "
          f"{model.config.depth}")

    # Analytic count for what runs; FlopCounterMode once per size on the eager model as a cross-check.
    flops = {size: analytic_flops(model.config, size, size, layer + 1) for size in sizes}
    flop_check = {}
    for size in sizes:
        counted = counted_flops(model, torch.rand(1, 1, 3, size, size, device=device), layer)
        no_attn = analytic_flops(model.config, size, size, layer + 1, attention=False)
        flop_check[size] = {"analytic": flops[size], "analytic_without_attention": no_attn, "counted": counted}
        print(f"{size}x{size}: {flops[size] / 1e9:.6g} GFLOP/image analytic ({no_attn / 1e9:.6g} without "
              f"attention); FlopCounterMode {counted / 1e9:.6g} (counts attention on CUDA only)")
    results = []
    check = torch.rand(min(batches), 1, 3, sizes[0], sizes[0], device=device)
    with torch.no_grad():
        eager_feats = model(check, layers=(layer,))
    equality = None
    for compiled in modes:
        run = compile_model(model, args.compile_scope, backend, args.compile_mode) if compiled else model
        for size in sizes:
            flops_one = flops[size]
            for b in batches:
                images = torch.rand(b, 1, 3, size, size, device=device)
                t_c = time.perf_counter()
                with torch.no_grad():
                    run(images, layers=(layer,))  # first call: compiles when compiled
                sync(device)
                first = time.perf_counter() - t_c
                with torch.no_grad():
                    sec = time_calls(lambda: run(images, layers=(layer,)), device, warmup, iters)
                img_s = b / sec
                tflops = img_s * flops_one / 1e12
                row = {"compile": compiled, "size": size, "batch": b, "img_per_s": img_s, "ms_per_batch": sec * 1e3,
                       "tflops": tflops, "ratio_to_matmul": tflops * 1e12 / mm, "tflop_per_image": flops_one / 1e12,
                       "first_call_s": first}
                results.append(row)
                print(f"{'compile' if compiled else 'eager  '} {size}x{size} B={b:3d}: {img_s:8.1f} img/s "
                      f"{sec * 1e3:9.1f} ms/batch {tflops:7.1f} TFLOP/s ({row['ratio_to_matmul'] * 100:5.1f}% of "
                      f"matmul) [first call {first:.1f} s]")
        if compiled:
            with torch.no_grad():
                equality = feature_error(eager_feats, run(check, layers=(layer,)))[layer]
            print(f"compiled vs eager features ({sizes[0]}x{sizes[0]}, B={check.shape[0]}, layer {layer}): max abs "
                  f"{equality['max_abs']:.4g}, rel L2 {equality['rel_l2']:.3g} (features up to "
                  f"{equality['ref_max_abs']:.3g}; bf16 rounding: rel L2 ~1e-2 or less)")
    total = time.perf_counter() - t_start
    print(f"total {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": dev_name, "torch": torch.__version__, "dtype": args.dtype,
                                         "model": source, "layer": layer, "matmul_tflops": mm / 1e12,
                                         "compile_scope": args.compile_scope, "compile_backend": backend,
                                         "flop_check": flop_check, "results": results, "total_s": total,
                                         "compiled_vs_eager": equality}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
