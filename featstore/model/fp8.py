"""Opt-in FP8 matmuls (``--precision fp8``): NOT a training-exact recipe, never a default, never in a preset.

The linear layers of every transformer block (qkv, proj, fc1, fc2 of the DINO, frame and global blocks) run as
float8 e4m3 matmuls with a scale per weight row and per token of the input (dynamic, from each call's amax),
accumulating in float32; everything else stays bf16. On CUDA GPUs with FP8 tensor cores (compute capability
>= 8.9) through torchao (optional dependency: ``pip install 'featstore[fp8]'``); elsewhere an exact emulation
(the same e4m3 casts and scales, the product in float32) gives the same feature error, at no speed-up.
Benchmarks may also pick ``scaled_mm``: the same matmul through torch's own ``torch._scaled_mm``.
`feature_error` measures features against the bf16 model's, per layer.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from featstore.errors import OptionError

E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BACKENDS = ("torchao", "scaled_mm", "emulate")
_MIN_SCALE = 1e-12


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every nn.Linear inside a transformer block (the patch conv stays bf16)."""
    from featstore.model.layers import Block

    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, Block):
            out += [(f"{name}.{n}", m) for n, m in mod.named_modules() if isinstance(m, nn.Linear)]
    return out


def fp8_backend(device: torch.device | str) -> str:
    """``torchao`` on CUDA with FP8 tensor cores, ``emulate`` on CPU; OptionError where neither applies."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "emulate"
    cap = torch.cuda.get_device_capability(dev)
    if cap < (8, 9):
        raise OptionError(f"--precision fp8 needs a GPU with FP8 tensor cores (compute capability >= 8.9, e.g. "
                          f"L4, H100, H200); {torch.cuda.get_device_name(dev)} is {cap[0]}.{cap[1]}: use "
                          "--precision bf16")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise OptionError("--precision fp8 on CUDA needs torchao, which is not installed: pip install "
                          "'featstore[fp8]' (or pip install torchao>=0.18.0), or use --precision bf16") from None
    return "torchao"


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` [..., K] as float8 e4m3 values and float32 scales [..., 1], one per row (amax / 448)."""
    t32 = t.float()
    scale = (t32.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp_min(_MIN_SCALE)
    return (t32 / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class EmulatedFp8Linear(nn.Module):
    """A linear layer computed as torchao's rowwise FP8 matmul is: e4m3 weight (scale per output row) times
    e4m3 input (scale per token), products summed in float32, scales and bias applied, cast to the input dtype."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w8, w_scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", w_scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = quantize_rows(x)
        out = (x8.float() @ self.weight_fp8.float().t()) * x_scale * self.weight_scale.t()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype)


class ScaledMmFp8Linear(EmulatedFp8Linear):
    """The same rowwise FP8 matmul through torch's own kernel (``torch._scaled_mm``, FP8 tensor cores on
    CUDA; also runs on CPU): the path torchao takes, without torchao."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x8, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
        bias = None if self.bias is None else self.bias.to(out_dtype)
        out = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale.t(), bias=bias,
                               out_dtype=out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def convert_fp8(model: nn.Module, backend: str | None = None) -> int:
    """Make `model`'s (bf16) block linears FP8 in place (`backend`: see `fp8_backend`); returns how many."""
    backend = backend or fp8_backend(next(model.parameters()).device)
    if backend not in BACKENDS:
        raise OptionError(f"fp8 backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    names = block_linears(model)
    if backend == "torchao":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        wanted = {id(m) for _, m in names}
        quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=lambda m, _fqn: id(m) in wanted)
        return len(names)
    kind = ScaledMmFp8Linear if backend == "scaled_mm" else EmulatedFp8Linear
    for name, linear in names:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, kind(linear))
    return len(names)


def feature_error(ref: Mapping[int, torch.Tensor], got: Mapping[int, torch.Tensor]) -> dict[int, dict[str, Any]]:
    """Per layer: relative L2 (||got - ref|| / ||ref||) and max abs error of `got` against `ref`, in float32."""
    out = {}
    for layer, r in ref.items():
        d = got[layer].float() - r.float()
        out[int(layer)] = {"rel_l2": (d.norm() / r.float().norm().clamp_min(1e-30)).item(),
                           "max_abs": d.abs().max().item(), "ref_max_abs": r.float().abs().max().item()}
    return out
