"""Regional compilation of the repeated transformer block, warm-up at the real shapes, reused compile caches.

Every DINO, frame and global block is the same :class:`~featstore.model.layers.Block` code, so compiling each
block's ``forward`` (``module.compile()``) makes one compiled graph per input shape that every block reuses
(torch lifts the parameters to graph inputs); the stream step's cache-free parts (attention input and output
half of a global block, see :mod:`featstore.model.stream`) are compiled the same way. Inductor's caches live
in one folder shared by every run and rank (``TORCHINDUCTOR_CACHE_DIR``, default under the user's cache), and
torch's portable cache artifacts are saved there after a warm-up and loaded before the next one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable, Sequence

import torch
from torch import nn

from featstore.errors import OptionError

log = logging.getLogger("featstore")

COMPILE_CHOICES = ("auto", "on", "off")
#: torch.compile modes accepted (None: torch's default).
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: Enough compiled variants per block code object for every (block kind, shape) a build meets.
RECOMPILE_LIMIT = 64


@dataclass
class CompileReport:
    """What :func:`compile_blocks` did: whether it is on (and why not), the blocks compiled, the one-time cost."""

    enabled: bool
    reason: str
    backend: str = "inductor"
    mode: str | None = None
    blocks: int = 0
    graphs: int = 0  # distinct graphs dynamo produced during the warm-up (one per block kind and shape)
    warmup_s: float = 0.0  # first calls at the real shapes (compilation included), eager time excluded
    cache_dir: str | None = None
    cache_loaded: bool = False  # torch's cache artifacts from an earlier run were loaded
    shapes: list[list[int]] = field(default_factory=list)

    def line(self) -> str:
        """One line for the build's log: ``compile: on (...) ...`` or ``compile: off (reason)``."""
        if not self.enabled:
            return f"compile: off ({self.reason})"
        cache = f"cache {self.cache_dir}{' (reused)' if self.cache_loaded else ''}" if self.cache_dir else "no cache"
        return (f"compile: on ({self.reason}): {self.blocks} blocks, backend {self.backend}, mode "
                f"{self.mode or 'default'}, {self.graphs} graph(s), warm-up {self.warmup_s:.1f} s, {cache}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def wants_compile(choice: str | bool | None, device: torch.device | str) -> tuple[bool, str]:
    """The ``--compile`` policy: ``auto`` (None) is on for CUDA devices and off elsewhere; ``on``/``off`` force it."""
    if isinstance(choice, bool):
        choice = "on" if choice else "off"
    choice = choice or "auto"
    if choice not in COMPILE_CHOICES:
        raise OptionError(f"--compile {choice!r}: expected one of {', '.join(COMPILE_CHOICES)}")
    kind = torch.device(device).type
    if choice == "auto":
        return (True, "auto: CUDA device") if kind == "cuda" else (False, f"auto: off on {kind}")
    return choice == "on", f"--compile {choice}"


def default_cache_dir() -> Path:
    """Inductor's cache folder: $TORCHINDUCTOR_CACHE_DIR, else $XDG_CACHE_HOME (or ~/.cache)/featstore/inductor."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "featstore" / "inductor"


def use_cache_dir(path: Path | None) -> Path | None:
    """Point inductor (and Triton under it) at `path` for this process; None leaves torch's default."""
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_blocks(model: nn.Module, mode: str | None = None, backend: str = "inductor",
                   dynamic: bool | None = None, stream: bool = True) -> int:
    """Compile every transformer block of `model` in place (regional compilation); returns how many.

    `stream` also compiles the cache-free halves of the global blocks' stream step. Blocks share the code
    object, so one graph per shape serves all of them.
    """
    if mode not in MODES:
        raise OptionError(f"compile mode {mode!r}: expected one of {', '.join(str(m) for m in MODES)}")
    _raise_recompile_limit()
    options: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
    if backend == "inductor" and mode not in (None, "default"):
        options["mode"] = mode
    blocks = list(_blocks(model))
    if getattr(model, "_featstore_compiled", None) == (options, stream):
        return len(blocks)  # already compiled so (a build adopting a loaded model)
    for blk in blocks:
        blk.compile(**options)
    object.__setattr__(model, "_featstore_compiled", (options, stream))
    if stream:
        from featstore.model.stream import compile_stream_parts

        compile_stream_parts(model, **options)
    return len(blocks)


def _blocks(model: nn.Module) -> Iterable[nn.Module]:
    from featstore.model.layers import Block

    return (m for m in model.modules() if isinstance(m, Block))


def _raise_recompile_limit() -> None:
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name) and getattr(cfg, name) < RECOMPILE_LIMIT * (4 if "accumulated" in name else 1):
            setattr(cfg, name, RECOMPILE_LIMIT * (4 if "accumulated" in name else 1))


def _artifact_path(cache_dir: Path, device: torch.device) -> Path:
    """Torch's portable cache artifacts for this torch version and device model (one file shared by ranks)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    tag = hashlib.sha256(f"{torch.__version__}|{name}".encode()).hexdigest()[:16]
    return cache_dir / f"featstore-artifacts-{tag}.bin"


def load_artifacts(path: Path) -> bool:
    """Load torch's cache artifacts saved by an earlier run (True if loaded); a bad file is ignored."""
    loader = getattr(torch.compiler, "load_cache_artifacts", None)
    if loader is None or not path.is_file():
        return False
    try:
        loader(path.read_bytes())
        return True
    except Exception as e:  # a stale or foreign file only costs a fresh compile
        log.warning("compile cache artifacts %s not loaded (%s): compiling afresh", path, e)
        return False


def save_artifacts(path: Path) -> None:
    """Save torch's cache artifacts of this process next to the inductor cache (temp file + rename)."""
    saver = getattr(torch.compiler, "save_cache_artifacts", None)
    got = saver() if saver is not None else None
    if not got:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(got[0])
    os.replace(tmp, path)


def unique_graphs() -> int:
    """Graphs dynamo has produced in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(model: nn.Module, shapes: Sequence[Sequence[int]], layers: Sequence[int], dtype: torch.dtype,
            context: ContextManager | None = None, stream: bool = False) -> float:
    """Run `model` once per [B, S, 3, H, W] shape of zeros in `dtype` (under `context`, e.g. the precision's
    autocast, and inference mode, as the build runs); returns the seconds it took (compilation included).
    `stream`: two stream steps per shape instead (a first frame, then one attending to it)."""
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode(), (context or nullcontext()):
        for shape in shapes:
            x = torch.zeros(*shape, device=device, dtype=dtype)
            if stream:
                _, cache = model.stream_step(x[:, :1], None, layers=tuple(layers))
                model.stream_step(x[:, :1], cache, layers=tuple(layers))
            else:
                model(x, layers=tuple(layers))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def prepare_compiled(model: nn.Module, choice: str | bool | None = "auto", shapes: Sequence[Sequence[int]] = (),
                     layers: Sequence[int] = (-2,), dtype: torch.dtype | None = None,
                     context: ContextManager | None = None, mode: str | None = None,
                     backend: str = "inductor", cache_dir: Path | None | str = "default",
                     stream: bool = False) -> CompileReport:
    """The build's entry point: apply the ``--compile`` policy, compile the blocks, warm up at `shapes`
    (compile seconds measured; `stream`: at the stream step), reuse and then update the shared compile caches."""
    device = next(model.parameters()).device
    on, reason = wants_compile(choice, device)
    if not on:
        return CompileReport(False, reason, backend, mode)
    where = use_cache_dir(default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None))
    artifacts = _artifact_path(where, device) if where is not None and backend == "inductor" else None
    loaded = load_artifacts(artifacts) if artifacts is not None else False
    report = CompileReport(True, reason, backend, mode, compile_blocks(model, mode, backend),
                           cache_dir=str(where) if where else None, cache_loaded=loaded,
                           shapes=[list(s) for s in shapes])
    before = unique_graphs()
    if shapes:
        report.warmup_s = warm_up(model, shapes, layers, dtype or next(model.parameters()).dtype, context, stream)
    report.graphs = unique_graphs() - before
    if artifacts is not None and shapes:
        try:
            save_artifacts(artifacts)
        except OSError as e:
            log.warning("compile cache artifacts not saved to %s: %s", artifacts, e)
    return report
