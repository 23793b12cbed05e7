"""featstore.storage.redact and .options: credentials never reach a message, a log line or an error."""

from __future__ import annotations

import logging

import pytest

import featstore.storage as st


def test_redaction():
    st.register_secrets({"key": "AKIAEXAMPLEKEY", "client_kwargs": {"aws_session_token": "tok-123456"},
                         "anon": False, "endpoint_url": "http://127.0.0.1:1"})
    text = ("failed with AKIAEXAMPLEKEY and tok-123456 at https://user:pw@host/b/k?X-Amz-Signature=abc&X-Amz-Credential=d"
            " and s3://AKIAEXAMPLEKEY:s3cr3t@bucket/p")
    clean = st.redact(text)
    for leak in ("AKIAEXAMPLEKEY", "tok-123456", "user:pw", "abc", "s3cr3t", "X-Amz-Credential=d"):
        assert leak not in clean
    assert "https://***@host/b/k?***" in clean and "s3://***@bucket/p" in clean
    assert st.redact("endpoint http://127.0.0.1:1 ok") == "endpoint http://127.0.0.1:1 ok"  # not a secret
    assert st.redact_url("s3://bucket/prefix") == "s3://bucket/prefix"


def test_redaction_reaches_logs(caplog):
    st.register_secrets({"secret": "log-secret-98765"})
    with caplog.at_level(logging.INFO, logger="featstore"):
        logging.getLogger("featstore").info("opening with %s", "log-secret-98765")
    assert "log-secret-98765" not in caplog.text and "opening with ***" in caplog.text


def test_storage_options_json_errors_never_echo_the_value():
    assert st.storage_options_from_json('{"anon": true}') == {"anon": True}
    for bad in ('{"secret": "json-secret-4242"', '["json-secret-4242"]'):
        with pytest.raises(ValueError) as e:
            st.storage_options_from_json(bad)
        assert "json-secret-4242" not in str(e.value) and "--storage-options" in str(e.value)
