"""The golden deterministic weight rule (tests/golden/README.md section 3), for tests and benchmarks.

Each tensor is seeded by the SHA-256 of its full-model key (e.g. "aggregator.camera_token"), drawn
with torch's CPU `randn`, then v = a + b*r in float32: (1, 0.05) for LayerNorm weights, (0.1, 0.02)
for LayerScale gammas, (0, 0.02) for everything else.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from featstore.model.config import VGGTConfig, get_config

_LAYERNORM_PARENTS = frozenset({
    "norm", "norm1", "norm2", "q_norm", "k_norm", "norm_context", "token_norm", "trunk_norm", "fmap_norm",
    "input_norm", "output_norm",
})


def rule_seed(key: str) -> int:
    """First 8 bytes of sha256(key) as little-endian uint64, modulo 2^63."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") % (1 << 63)


def rule_affine(key: str) -> tuple[float, float]:
    """(a, b) of v = a + b*r for this key."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _LAYERNORM_PARENTS:
        return 1.0, 0.05
    if key.endswith(".ls1.gamma") or key.endswith(".ls2.gamma"):
        return 0.1, 0.02
    return 0.0, 0.02


def fill_rule_(t: torch.Tensor, key: str) -> torch.Tensor:
    """Fill the float32 CPU tensor `t` in place with the rule value for `key` (the full-model key)."""
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise ValueError("the weight rule fills float32 CPU tensors only")
    g = torch.Generator(device="cpu").manual_seed(rule_seed(key))
    a, b = rule_affine(key)
    with torch.no_grad():
        torch.randn(t.shape, generator=g, dtype=torch.float32, out=t)
        t.mul_(b)  # rounds b*r to float32 first ...
        if a:
            t.add_(a)  # ... then adds a in float32, as the rule specifies
    return t


def rule_tensor(key: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """A new float32 tensor of `shape` holding the rule value for `key`."""
    return fill_rule_(torch.empty(tuple(shape), dtype=torch.float32), key)


def _threads(threads: int | None) -> int:
    return max(1, threads if threads is not None else min(8, os.cpu_count() or 1))


def fill_module_with_rule_(module: nn.Module, prefix: str = "aggregator.", threads: int | None = None) -> None:
    """Fill every state_dict tensor of `module` (float32, CPU) in place; seeds come from prefix + key."""
    items = list(module.state_dict(keep_vars=True).items())
    with ThreadPoolExecutor(_threads(threads)) as pool:  # randn releases the GIL: tensors fill in parallel
        list(pool.map(lambda kv: fill_rule_(kv[1].data, prefix + kv[0]), items))


def rule_state_dict(config: VGGTConfig | str, prefix: str = "aggregator.",
                    threads: int | None = None) -> dict[str, torch.Tensor]:
    """{module key: float32 tensor} for every aggregator key of `config`, seeded by prefix + key.

    Keys are the VGGTAggregator's own (no prefix), in state_dict order.
    """
    from featstore.model.aggregator import VGGTAggregator

    cfg = get_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VGGTAggregator(cfg).state_dict().items()}
    out = {k: torch.empty(tuple(s), dtype=torch.float32) for k, s in shapes.items()}
    with ThreadPoolExecutor(_threads(threads)) as pool:
        list(pool.map(lambda k: fill_rule_(out[k], prefix + k), out))
    return out
