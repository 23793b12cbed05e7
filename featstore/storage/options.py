"""``--storage-options JSON|@FILE``: parsing the fsspec backend options a user passes (their secrets registered
for redaction on the way in). The argparse helpers belong to the CLI; they stay here until ``featstore/cli``
has a shared-arguments module to hold them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from featstore.storage.redact import register_secrets

STORAGE_OPTIONS_HELP = ("options for the fsspec backend of a URL store, as JSON (e.g. '{\"anon\": true}' or "
                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://host:9000\"}}'), or @FILE to read the "
                        "JSON from a file (keeps secrets out of the process list). Default: the backend's standard "
                        "environment variables and config files (AWS_*, ~/.aws). Never written to any file or log")


def storage_options_from_json(text: str, flag: str = "--storage-options") -> dict[str, Any]:
    """Parse ``--storage-options`` JSON into a dict; the message of a bad value never echoes it (secrets)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{flag} is not valid JSON ({e.msg} at character {e.pos}); expected a JSON object such "
                         f"as '{{\"anon\": true}}' or '{{\"client_kwargs\": {{\"endpoint_url\": \"http://...\"}}}}'"
                         ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object (got a JSON {type(value).__name__}); expected e.g. "
                         f"'{{\"anon\": true}}'")
    register_secrets(value)
    return value


def add_storage_options_argument(parser: Any) -> None:
    """Add ``--storage-options JSON|@FILE`` to an argparse parser (parsed by :func:`storage_options_of`)."""
    parser.add_argument("--storage-options", metavar="JSON", default=None, help=STORAGE_OPTIONS_HELP)


def storage_options_of(args: Any) -> dict[str, Any] | None:
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
