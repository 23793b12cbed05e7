"""The environment variables users' precompute scripts set as ``featstore build`` defaults (a flag always wins).

``VGGT_MODEL_PATH``, ``DATA_ROOT``, ``BATCH_SIZE``, ``DEVICE``, ``SKIP_EXISTING``: unset, ``BuildOptions``'s
default applies; a variable is read (and must parse) only when its flag is absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from featstore.build.options import build_default
from featstore.runtime.env import env_str, parse_bool


@dataclass(frozen=True)
class EnvOption:
    """A ``featstore build`` option whose default users' scripts set through an environment variable."""

    dest: str
    flag: str
    var: str
    default: Any
    kind: str  # "str", "int" or "bool"


#: Defaults are :class:`featstore.build.options.BuildOptions`'s (``model`` and ``data_root`` have none: required).
BUILD_ENV_OPTIONS = (
    EnvOption("model", "--model", "VGGT_MODEL_PATH", None, "str"),
    EnvOption("data_root", "--data-root", "DATA_ROOT", None, "str"),
    EnvOption("batch_size", "--batch-size", "BATCH_SIZE", build_default("batch_size"), "int"),
    EnvOption("device", "--device", "DEVICE", build_default("device"), "str"),
    EnvOption("skip_existing", "--skip-existing", "SKIP_EXISTING", build_default("skip_existing"), "bool"),
)


def _parse_env_value(opt: EnvOption, text: str) -> Any:
    if opt.kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{opt.var}={text!r} is not an integer: set it to a whole number such as "
                             f"{opt.var}={opt.default}, or pass {opt.flag}") from None
    if opt.kind == "bool":
        try:
            return parse_bool(text, opt.var)
        except ValueError:
            raise ValueError(f"{opt.var}={text!r} is not a boolean: set it to true or false, or pass "
                             f"{opt.flag} / --no-{opt.flag[2:]}") from None
    return text


def resolve_build_env(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None
                      ) -> tuple[dict[str, Any], dict[str, str]]:
    """Values of the environment-backed build options, and where each came from (the flag or the variable,
    so messages name what the user actually set). A flag (a value other than None) always wins; a variable
    is read (and must parse) only when its flag is absent. Raises ValueError naming the variable."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for opt in BUILD_ENV_OPTIONS:
        given = flags.get(opt.dest)
        text = env_str(opt.var, None, environ)
        if given is not None:
            values[opt.dest], origins[opt.dest] = given, opt.flag
        elif text is not None:
            values[opt.dest], origins[opt.dest] = _parse_env_value(opt, text), opt.var
        else:
            values[opt.dest], origins[opt.dest] = opt.default, opt.flag
    return values, origins
