"""Environment variables featstore reads at run time, and the one rank/worker detector.

``USE_VGGT_CACHE`` switches training code to the cache; ``FEATSTORE_STORE`` names the store it reads and
``FEATSTORE_DATA_ROOT`` where its images are now, when the data moved. torchrun's ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` decide the part of the data each process builds or reads: :func:`dist_env` and :func:`consumer`
are the one rank/worker detector that build and loader use (an initialised ``torch.distributed`` group wins over the variables).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping

from featstore.errors import OptionError

TRUE = {"1", "true", "yes", "on", "y", "t"}
FALSE = {"0", "false", "no", "off", "n", "f", ""}


def parse_bool(value: str, name: str) -> bool:
    """Parse a boolean environment value; raises ValueError naming the variable on anything else."""
    v = value.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a boolean: use true or false")


def env_str(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """A string variable, or ``default`` when unset or empty."""
    v = (environ if environ is not None else os.environ).get(name)
    return v if v else default


def env_int(name: str, default: int, environ: Mapping[str, str] | None = None) -> int:
    """An integer variable, or ``default`` when unset."""
    v = env_str(name, None, environ)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"{name}={v!r} is not an integer") from None


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """A boolean variable, or ``default`` when unset."""
    v = env_str(name, None, environ)
    return default if v is None else parse_bool(v, name)


def data_root_override(environ: Mapping[str, str] | None = None) -> str | None:
    """Where the images of the default store are now (``FEATSTORE_DATA_ROOT``), when it moved."""
    return env_str("FEATSTORE_DATA_ROOT", None, environ)


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a distributed job (rank 0 of 1 outside one)."""

    rank: int
    world_size: int
    local_rank: int


def _process_group() -> tuple[int, int] | None:
    """(rank, world size) of an initialised torch.distributed process group, else None (torch not imported
    means no group: this module never imports torch itself)."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def _env_rank(name: str, default: int, environ: Mapping[str, str] | None) -> int:
    try:
        return env_int(name, default, environ)
    except ValueError:
        raise OptionError(f"{name}={env_str(name, None, environ)!r} is not an integer: torchrun sets {name}; unset "
                          f"it to run a single process, or launch with torchrun") from None


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """This process's rank, world size and local rank, by this precedence:

    1. an initialised ``torch.distributed`` process group: its rank and world size;
    2. torchrun's ``RANK`` and ``WORLD_SIZE`` environment variables;
    3. rank 0 of 1.

    ``LOCAL_RANK`` (the GPU index on this node) comes from the environment only (0 when unset). Raises
    OptionError naming the variable when RANK or WORLD_SIZE is not an integer or RANK is outside WORLD_SIZE.
    """
    local = _env_rank("LOCAL_RANK", 0, environ)
    group = _process_group()
    if group is not None:
        return DistEnv(group[0], group[1], local)
    world = max(_env_rank("WORLD_SIZE", 1, environ), 1)
    rank = _env_rank("RANK", 0, environ)
    if not 0 <= rank < world:
        raise OptionError(f"RANK={rank} is outside WORLD_SIZE={world}: expected 0 <= RANK < WORLD_SIZE, as torchrun "
                          f"sets them; unset both to run a single process")
    return DistEnv(rank, world, local)


@dataclass(frozen=True)
class Consumer:
    """One reader of a stream: a rank of the job and a DataLoader worker of that rank."""

    rank: int
    world_size: int
    worker: int = 0
    num_workers: int = 1
    in_worker: bool = False  # True inside a DataLoader worker process

    @property
    def index(self) -> int:
        """This consumer's number among all of them (rank-major)."""
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        """How many consumers read the stream: world size times DataLoader workers."""
        return self.world_size * self.num_workers


def in_dataloader_worker() -> bool:
    """True inside a DataLoader worker process (cheap: no environment parsing, for per-record use)."""
    torch = sys.modules.get("torch")
    return torch is not None and torch.utils.data.get_worker_info() is not None


def consumer(environ: Mapping[str, str] | None = None) -> Consumer:
    """Which rank (:func:`dist_env`'s precedence) and which DataLoader worker (``get_worker_info()``; worker
    0 of 1 in the main process) this code runs in."""
    d = dist_env(environ)
    torch = sys.modules.get("torch")
    info = torch.utils.data.get_worker_info() if torch is not None else None
    if info is None:
        return Consumer(d.rank, d.world_size)
    return Consumer(d.rank, d.world_size, info.id, info.num_workers, in_worker=True)


def use_vggt_cache(environ: Mapping[str, str] | None = None) -> bool:
    """True when training code should read features from the cache (``USE_VGGT_CACHE=true``)."""
    return env_bool("USE_VGGT_CACHE", False, environ)


def store_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The store training code reads (``FEATSTORE_STORE``), if set."""
    return env_str("FEATSTORE_STORE", None, environ)
