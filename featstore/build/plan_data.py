"""The measured numbers ``featstore plan`` projects with: bytes per feature value per codec and dtype, the bytes
a record costs besides its values, and model rates per GPU. Each number says where it was measured; a new
measurement replaces the number and its note here (and nowhere else)."""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

#: Encoded bytes per feature value (scales included) by codec and storage dtype: the golden full-size VGGT-1B
#: layer 22 patch tokens of one 392x518 crop (tests/golden/full), one record, zstd level 1.
CODEC_BYTES_PER_VALUE = MappingProxyType({
    "raw": MappingProxyType({"float32": 4.0, "bfloat16": 2.0, "float16": 2.0}),
    "zstd": MappingProxyType({"float32": 3.271, "bfloat16": 1.270, "float16": 1.648}),
    "int8": MappingProxyType({"float32": 0.919, "bfloat16": 0.919, "float16": 0.919}),
})
CODEC_MEASURED_IN = ("benchmarks/plan_ratios.py on the golden full-size layer 22 features (2026-12-02; "
                     "benchmarks/RESULTS.md, 'Plan: bytes per value')")

#: Bytes a shard record costs besides its values: the record's framing and metadata (576 measured by
#: benchmarks/plan_ratios.py for a 9-frame sample record), its tar member header (512) and on average half
#: a 512-byte block of padding, and its index row (about 64).
RECORD_OVERHEAD_BYTES = 576 + 512 + 256 + 64
#: Bytes a shard store costs besides its records: the index header (4096) and, per shard file, the tar
#: end-of-archive blocks and blocking (at most 10240).
STORE_OVERHEAD_BYTES = 4096
SHARD_OVERHEAD_BYTES = 10240
#: A per-image ``.pt`` file besides its values (torch.save's zip framing and the record dict), about.
PER_IMAGE_OVERHEAD_BYTES = 1536


@dataclass(frozen=True)
class Rate:
    """Model frame passes per second for one context mode on one GPU, at ``patches`` patches per frame
    (a rate at another size is scaled by patches: attention's quadratic part is left out)."""

    frames_per_s: float
    patches: int
    measured_in: str


#: Measured end-to-end build rates (decode, model, write overlapped), bf16 VGGT-1B, eager.
GPU_RATES = MappingProxyType({
    "h200": MappingProxyType({
        "image": Rate(71.9, 1036, "benchmarks/RESULTS.md, GPU, second run: per-image build end-to-end 71.9 img/s "
                                  "at 392x518 (build_bench.py --n 1024 --batch-size 32 --workers 12)"),
        "sample": Rate(52.2, 1610, "benchmarks/RESULTS.md, GPU, second run: --context sample end-to-end 12.15 "
                                   "samples/s x 4.30 frame passes per sample at 490x644 (build_bench.py "
                                   "--context sample --per-episode 50 --image-size 644 --batch-size 8)"),
        "joint": Rate(125.6, 1036, "not measured for joint records: the per-image model-only rate (125.6 img/s "
                                   "at 392x518, same run) stands in; pass --rate for a measured one"),
    }),
})
DEFAULT_GPU = "h200"
