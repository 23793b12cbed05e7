"""The one place that maps environment variables to option defaults.

``VGGT_MODEL_PATH``, ``DATA_ROOT``, ``BATCH_SIZE`` (16), ``DEVICE`` (cuda:0), ``SKIP_EXISTING`` (true) are
what users' existing precompute scripts read; ``USE_VGGT_CACHE`` switches training code to the cache;
``FEATSTORE_STORE`` names the store it reads. torchrun's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` decide
the part of the data each process builds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

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


@dataclass(frozen=True)
class BuildEnvDefaults:
    """Defaults for ``featstore build`` taken from the environment."""

    model_path: str | None
    data_root: str | None
    batch_size: int
    device: str
    skip_existing: bool


def build_defaults(environ: Mapping[str, str] | None = None) -> BuildEnvDefaults:
    """Read the precompute variables users already set (names and defaults of the original scripts)."""
    return BuildEnvDefaults(
        model_path=env_str("VGGT_MODEL_PATH", None, environ),
        data_root=env_str("DATA_ROOT", None, environ),
        batch_size=env_int("BATCH_SIZE", 16, environ),
        device=env_str("DEVICE", "cuda:0", environ) or "cuda:0",
        skip_existing=env_bool("SKIP_EXISTING", True, environ),
    )


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 outside torchrun)."""

    rank: int
    world_size: int
    local_rank: int


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK."""
    world = env_int("WORLD_SIZE", 1, environ)
    rank = env_int("RANK", 0, environ)
    if not 0 <= rank < max(world, 1):
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistEnv(rank, max(world, 1), env_int("LOCAL_RANK", 0, environ))


def use_vggt_cache(environ: Mapping[str, str] | None = None) -> bool:
    """True when training code should read features from the cache (``USE_VGGT_CACHE=true``)."""
    return env_bool("USE_VGGT_CACHE", False, environ)


def store_path(environ: Mapping[str, str] | None = None) -> str | None:
    """The store training code reads (``FEATSTORE_STORE``), if set."""
    return env_str("FEATSTORE_STORE", None, environ)
