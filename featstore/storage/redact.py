"""Credentials never leave the process: every string option whose name looks like a credential (``key``,
``secret``, ``token``, ``password``, ...) and the standard credential environment variables are registered,
and :func:`redact` removes them, URL user info and signed-URL query strings from any text meant for a
message, a log line or a file."""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any, Iterator, Mapping

REDACTED = "***"
_SECRET_OPTION_RE = re.compile(r"key|secret|token|passw|credential|signature|sas|connection_string|auth",
                               re.IGNORECASE)
SECRET_ENV_VARS = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AZURE_STORAGE_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_CLIENT_SECRET", "GOOGLE_OAUTH_ACCESS_TOKEN", "FSSPEC_S3_KEY", "FSSPEC_S3_SECRET", "FSSPEC_S3_TOKEN",
)
_MIN_SECRET_LEN = 4  # shorter values would garble messages if replaced everywhere
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s@'\"]+@")
_QUERY_RE = re.compile(r"(?P<url>[A-Za-z][A-Za-z0-9+.\-]*://[^\s?#'\"]*)\?[^\s'\"]*")
_SIGNED_PARAM_RE = re.compile(r"(?i)\b(X-Amz-[A-Za-z-]+|Signature|Sig|AWSAccessKeyId|Expires|sv|se|sp|token)=[^&\s'\"]+")


def _secret_values(value: Any, secret_name: bool) -> Iterator[str]:
    if isinstance(value, str):
        if secret_name and len(value) >= _MIN_SECRET_LEN:
            yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _secret_values(v, secret_name or bool(_SECRET_OPTION_RE.search(str(k))))
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _secret_values(v, secret_name)


def register_secrets(storage_options: Mapping[str, Any] | None) -> None:
    """Remember the credential values in ``storage_options`` and the environment so :func:`redact` hides them."""
    found = set(_secret_values(dict(storage_options or {}), False))
    found.update(v for name in SECRET_ENV_VARS if len(v := os.environ.get(name, "")) >= _MIN_SECRET_LEN)
    if found:
        with _secrets_lock:
            _secrets.update(found)
        install_log_redaction()


def redact_url(url: str) -> str:
    """``url`` without user info and query string (where signed URLs carry their signature)."""
    url = _USERINFO_RE.sub(lambda m: f"{m['scheme']}{REDACTED}@", url)
    return _QUERY_RE.sub(lambda m: f"{m['url']}?{REDACTED}", url)


def redact(text: str) -> str:
    """``text`` with every registered secret, URL user info and signed-URL parameter replaced by ``***``."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    text = redact_url(text)
    return _SIGNED_PARAM_RE.sub(lambda m: f"{m[1]}={REDACTED}", text)


class RedactingFilter(logging.Filter):
    """A logging filter that redacts every record's formatted message (see :func:`redact`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


_log_filter = RedactingFilter()


def install_log_redaction() -> None:
    """Attach the redacting filter to featstore's logger and the root logger's handlers (idempotent)."""
    for logger in (logging.getLogger("featstore"), logging.getLogger()):
        if _log_filter not in logger.filters:
            logger.addFilter(_log_filter)
        for h in logger.handlers:
            if _log_filter not in h.filters:
                h.addFilter(_log_filter)
