"""Argument types every command shares: byte sizes, layer lists, output locations (folder or URL), the codec
choices, and the object-store options (``--storage-options``, parsed in featstore.storage)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any, Sequence

from featstore.storage import is_remote, storage_options_from_json

__all__ = ["CODEC_CHOICES", "add_storage_options_argument", "format_layers", "format_size", "out_location",
           "parse_layers", "parse_size", "storage_options_of"]

#: formats.codecs.CODECS, spelled out because importing that module loads torch (tests pin the two equal)
CODEC_CHOICES = ("zstd", "raw", "int8")


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse a byte size such as ``512MB``, ``2GB``, ``1.5GiB`` or ``1000000`` (KB/MB/GB are powers of 1000)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use a number with an optional unit, e.g. 512MB, 2GB")
    base = 1024 if m.group(3) else 1000
    exp = " KMGT".index(m.group(2).upper() or " ")
    size = int(float(m.group(1)) * base**exp)
    if size < 1024:
        raise argparse.ArgumentTypeError(f"size {text!r} is too small (at least 1KB)")
    return size


def format_size(n: int) -> str:
    """``n`` bytes as users type it (``1GB``, ``512MB``): the largest unit of :func:`parse_size` dividing it."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def format_layers(layers: Sequence[int]) -> str:
    """Layer indices as users type them: ``-2`` or ``22,23``."""
    return ",".join(map(str, layers))


def parse_layers(text: str) -> tuple[int, ...]:
    """Parse ``-2`` or ``-2,-1`` or ``22,23`` into a tuple of ints."""
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of layer indices: use comma-separated integers "
                                         f"such as -2 or 22,23") from None
    if not layers:
        raise argparse.ArgumentTypeError("--layers needs at least one layer")
    return layers


def out_location(text: str) -> Path | str:
    """``--out``: a local folder (Path) or an fsspec URL kept as text."""
    return text if is_remote(text) else Path(text)


STORAGE_OPTIONS_HELP = ("options for the fsspec backend of a URL store, as JSON (e.g. '{\"anon\": true}' or "
                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}'), or @FILE to read the "
                        "JSON from a file (keeps secrets out of the process list). Default: the backend's standard "
                        "environment variables and config files (AWS_*, ~/.aws). Never written to any file or log")


def add_storage_options_argument(parser: Any) -> None:
    """Add ``--storage-options JSON|@FILE`` to an argparse parser (parsed by :func:`storage_options_of`)."""
    parser.add_argument("--storage-options", metavar="JSON", default=None, help=STORAGE_OPTIONS_HELP)


def storage_options_of(args: argparse.Namespace) -> dict[str, Any] | None:
    """The parsed ``--storage-options`` of a CLI namespace (None when not given); ValueError when bad."""
    text = getattr(args, "storage_options", None)
    if not text:
        return None
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as e:
            raise ValueError(f"--storage-options {text}: cannot read the file ({e.strerror}); pass @FILE with a "
                             f"JSON object, or the JSON itself") from None
    return storage_options_from_json(text)
