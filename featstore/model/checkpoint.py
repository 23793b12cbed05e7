"""load_vggt: locate a checkpoint, read only the aggregator tensors, detect the key prefix and config,
validate every key and shape, fingerprint, and build the model (eval mode)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from featstore.constants import NAMED_MODELS
from featstore.errors import CheckpointError, describe_load_error
from featstore.model.aggregator import VGGTAggregator
from featstore.model.config import VGGTConfig, get_config
from featstore.model.precision import Precision, get_precision
from featstore.model.weights import fill_module_with_rule_

#: Names that build a model from the golden weight rule instead of reading a file (``constants.NAMED_MODELS``).
NAMED_SOURCES = NAMED_MODELS
#: File names looked for inside a checkpoint directory, in this order (checkpoints.pth: StreamVGGT's release).
CHECKPOINT_FILES = ("model.safetensors", "model.pt", "model.pth", "pytorch_model.bin", "checkpoints.pth")
HEAD_NAMES = ("camera_head", "depth_head", "point_head", "track_head")
_ANCHOR = "camera_token"
_EXPECTED = ("expected model.safetensors, model.pt, model.pth, pytorch_model.bin, checkpoints.pth or sharded "
             "safetensors with a *.safetensors.index.json (a file, or a directory holding one)")
_SHOW = 5


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a CUDA device that supports it, float32 otherwise."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def state_dict_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex over the tensors' names, dtypes, shapes and raw bytes, in sorted key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        h.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        t = t.to("cpu").contiguous()
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Locating and reading checkpoint files. A reader returns (all key names, fetch(keys) -> tensors).

Reader = tuple[list[str], Callable[[list[str]], dict[str, torch.Tensor]]]


def locate_checkpoint(source: str | os.PathLike) -> Path:
    """The checkpoint file (or shard index) for `source`, a file or a directory; CheckpointError if none."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"VGGT checkpoint not found at {path}: {_EXPECTED}. Download the VGGT-1B weights "
                              "(e.g. facebook/VGGT-1B model.pt) and pass their path, or set VGGT_MODEL_PATH.")
    if path.is_file():
        return path
    for name in CHECKPOINT_FILES:
        if (path / name).is_file():
            return path / name
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    if len(indexes) > 1:
        raise CheckpointError(f"VGGT checkpoint directory {path} holds several shard indexes "
                              f"({', '.join(p.name for p in indexes)}): pass the index file to use.")
    single = sorted(path.glob("*.safetensors"))
    if len(single) == 1:
        return single[0]
    found = sorted(p.name for p in path.iterdir())[:10]
    raise CheckpointError(f"VGGT checkpoint not found in directory {path}: {_EXPECTED}; found {found or 'nothing'}. "
                          "Pass the checkpoint file itself if it has another name.")


def _safetensors_reader(path: Path) -> Reader:
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
        keys = list(handle.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"cannot read VGGT checkpoint {path}: not a valid safetensors file ({e}). "
                              "Re-download or re-save the checkpoint.") from e

    def fetch(wanted: list[str]) -> dict[str, torch.Tensor]:
        try:
            return {k: handle.get_tensor(k) for k in wanted}
        except Exception as e:
            raise CheckpointError(f"cannot read tensors from VGGT checkpoint {path} ({e}): the file is "
                                  "truncated or corrupt; re-download it.") from e

    return keys, fetch


def _sharded_reader(index: Path) -> Reader:
    try:
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    except Exception as e:
        raise CheckpointError(f"cannot read shard index {index}: expected JSON with a 'weight_map' ({e}). "
                              "Re-download the checkpoint.") from e
    readers: dict[str, Reader] = {}

    def fetch(wanted: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[str, list[str]] = {}
        for k in wanted:
            by_shard.setdefault(weight_map[k], []).append(k)
        out: dict[str, torch.Tensor] = {}
        for shard, keys in by_shard.items():
            shard_path = index.parent / shard
            if not shard_path.is_file():
                raise CheckpointError(f"shard {shard_path} named by {index} does not exist: the download is "
                                      "incomplete; fetch every shard listed in the index.")
            if shard not in readers:
                readers[shard] = _safetensors_reader(shard_path)
            out.update(readers[shard][1](keys))
        return out

    return list(weight_map), fetch


def _unwrap(obj: object) -> dict[str, torch.Tensor] | None:
    """The tensor dict inside a torch.save'd object (plain, or under model/state_dict/module)."""
    if isinstance(obj, Mapping):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        for name in ("model", "state_dict", "module", "model_state_dict"):
            inner = _unwrap(obj.get(name))
            if inner is not None:
                return inner
    return None


def _torch_reader(path: Path) -> Reader:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zipfile" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise CheckpointError(f"cannot read VGGT checkpoint {path}: {describe_load_error(e)}; re-download it or "
                              "re-save the state dict, or pass another --model") from e
    sd = _unwrap(obj)
    if sd is None:
        raise CheckpointError(f"VGGT checkpoint {path} holds no state dict (found {type(obj).__name__}): "
                              "save model.state_dict().")
    return list(sd), lambda wanted: {k: sd[k] for k in wanted}


def open_checkpoint(path: Path) -> Reader:
    """A reader for the checkpoint file `path` (safetensors, shard index, or torch.save file)."""
    name = path.name
    if name.endswith(".index.json"):
        return _sharded_reader(path)
    if name.endswith(".safetensors"):
        return _safetensors_reader(path)
    return _torch_reader(path)


# ------------------------------------------------------------------------------------------------
# Prefix and config detection, validation.

def detect_prefix(keys: list[str], where: str) -> str:
    """The prefix P with P + "camera_token" in `keys` (e.g. "", "aggregator.", "module.vggt.aggregator.")."""
    prefixes = sorted({k[: -len(_ANCHOR)] for k in keys
                       if k.endswith(_ANCHOR) and (k == _ANCHOR or k[: -len(_ANCHOR)].endswith("."))})
    if not prefixes:
        raise CheckpointError(f"no VGGT aggregator in {where}: no key ends in '{_ANCHOR}' "
                              f"({len(keys)} keys, e.g. {keys[:_SHOW]}). Pass a VGGT checkpoint.")
    if len(prefixes) > 1:
        raise CheckpointError(f"{where} holds several VGGT aggregators (key prefixes {prefixes}): "
                              "save the one you want on its own.")
    return prefixes[0]


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, where: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"VGGT checkpoint {where} is missing '{key}', needed to recognise the model "
                              "config: the file is incomplete or not a VGGT aggregator checkpoint.")
    return shapes[key]


def infer_config(shapes: Mapping[str, tuple[int, ...]], where: str = "checkpoint") -> VGGTConfig:
    """A VGGTConfig from aggregator tensor shapes (keys without prefix); named after a matching named config.

    Head counts come from the q/k-norm size (head_dim); the DINO ViT is assumed to use the same head_dim.
    """
    embed_dim = _shape(shapes, "camera_token", where)[-1]
    registers = _shape(shapes, "register_token", where)[2]
    patch = _shape(shapes, "patch_embed.patch_embed.proj.weight", where)
    pos = _shape(shapes, "patch_embed.pos_embed", where)[1] - 1
    grid = int(round(pos ** 0.5))
    head_dim = _shape(shapes, "frame_blocks.0.attn.q_norm.weight", where)[0]
    mlp = _shape(shapes, "frame_blocks.0.mlp.fc1.weight", where)[0]
    dino_mlp = _shape(shapes, "patch_embed.blocks.0.mlp.fc1.weight", where)[0]
    dino_regs = _shape(shapes, "patch_embed.register_tokens", where)[1]

    def count(pattern: str) -> int:
        rx = re.compile(pattern)
        return len({m.group(1) for k in shapes for m in [rx.match(k)] if m})

    cfg = VGGTConfig(
        name="custom", img_size=grid * patch[-1], patch_size=patch[-1], in_chans=patch[1], embed_dim=embed_dim,
        depth=count(r"frame_blocks\.(\d+)\."), num_heads=embed_dim // head_dim, mlp_ratio=mlp / embed_dim,
        num_register_tokens=registers, dino_depth=count(r"patch_embed\.blocks\.(\d+)\."),
        dino_num_heads=embed_dim // head_dim, dino_mlp_ratio=dino_mlp / embed_dim,
        dino_num_register_tokens=dino_regs)
    for name in ("vggt-1b", "tiny"):
        if cfg.same_sizes(get_config(name)):
            return get_config(name)
    return cfg


def _expected_shapes(config: VGGTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in VGGTAggregator(config).state_dict().items()}


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > _SHOW else ''})"


def validate_keys(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]],
                  where: str, prefix: str, config: VGGTConfig) -> None:
    """CheckpointError naming missing, unexpected and wrong-shape keys, unless `found` matches exactly."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{k} {list(found[k])} != {list(expected[k])}" for k in expected
             if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    parts = [f"VGGT checkpoint {where} does not match the {config.name!r} aggregator "
             f"(key prefix {prefix!r}, embed_dim {config.embed_dim}, depth {config.depth})"]
    if missing:
        parts.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong:
        parts.append(f"wrong shapes: {_listing(wrong)}")
    parts.append("Every aggregator tensor must be present with its official shape: use an unmodified VGGT "
                 "checkpoint (or re-save it with the full aggregator state dict).")
    raise CheckpointError("; ".join(parts))


def _read_aggregator(path: Path) -> tuple[dict[str, torch.Tensor], VGGTConfig]:
    keys, fetch = open_checkpoint(path)
    prefix = detect_prefix(keys, str(path))
    own = [k for k in keys if k.startswith(prefix)
           and not k[len(prefix):].startswith(HEAD_NAMES)]  # heads are never read
    # Shapes first (cheap for safetensors: fetch is lazy per tensor; for .pt the dict is mmap'ed).
    tensors = {k[len(prefix):]: t for k, t in fetch(own).items()}
    shapes = {k: tuple(t.shape) for k, t in tensors.items()}
    config = infer_config(shapes, str(path))
    validate_keys(_expected_shapes(config), shapes, str(path), prefix, config)
    return tensors, config


def _build(config: VGGTConfig, tensors: dict[str, torch.Tensor] | None, device: torch.device,
           dtype: torch.dtype, file_backed: bool = False) -> VGGTAggregator:
    if tensors is None:  # named rule weights: generate in place, then cast
        with torch.device("meta"):
            model = VGGTAggregator(config)
        model.to_empty(device="cpu")
        fill_module_with_rule_(model)
        fingerprint = state_dict_fingerprint(model.state_dict())
        model.to(device=device, dtype=dtype)
    else:
        fingerprint = state_dict_fingerprint(tensors)
        with torch.device("meta"):
            model = VGGTAggregator(config)
        cast = {}
        for k, t in tensors.items():
            c = t.to(device=device, dtype=dtype)
            # torch.load(mmap=True) tensors are views of the file: never keep them as parameters.
            cast[k] = c.clone() if file_backed and c.data_ptr() == t.data_ptr() else c
        model.load_state_dict(cast, strict=True, assign=True)
    model.reset_buffers(device)
    model.fingerprint = fingerprint
    return model.eval().requires_grad_(False)


def load_vggt(source: str | os.PathLike, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
              precision: str | Precision | None = None) -> VGGTAggregator:
    """Load the VGGT aggregator (eval mode) from a checkpoint file or directory, or a rule-weight name.

    `source`: a path (model.safetensors, model.pt, model.pth, pytorch_model.bin, StreamVGGT's
    checkpoints.pth, sharded safetensors index, or a directory holding one), or "tiny" /
    "vggt-1b-random" (golden rule weights). `dtype` None means bfloat16 on a CUDA device that supports
    it, else float32. `precision` (a recipe name, see `featstore.model.precision`) instead loads float32
    weights and prepares them for that recipe; it cannot be combined with `dtype`.
    """
    if precision is not None:
        if dtype is not None:
            raise ValueError("load_vggt: pass dtype or precision, not both (a recipe fixes the weights' dtype)")
        recipe = get_precision(precision)
        return recipe.prepare(load_vggt(source, device, torch.float32))
    dev = torch.device(device)
    dt = default_dtype(dev) if dtype is None else dtype
    if isinstance(source, str) and source in NAMED_SOURCES:
        model = _build(get_config(NAMED_SOURCES[source]), None, dev, dt)
        model.source = source
        return model
    path = locate_checkpoint(source)
    tensors, config = _read_aggregator(path)
    model = _build(config, tensors, dev, dt, file_backed=not path.name.endswith((".safetensors", ".index.json")))
    model.source = str(path)
    return model
