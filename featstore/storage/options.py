"""Parsing the fsspec backend options a user passes as JSON (``--storage-options``), their secrets registered for
redaction on the way in; the command-line flag itself is ``featstore.cli.args``'s."""

from __future__ import annotations

import json
from typing import Any

from featstore.storage.redact import register_secrets


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
