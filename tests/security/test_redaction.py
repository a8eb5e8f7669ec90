"""The log redactor on its own: what it hides, what it keeps."""

from __future__ import annotations

import json
import logging

import pytest

from bridge.logs import JsonFormatter, Redactor, TextFormatter, redact_url


@pytest.fixture
def redactor():
    r = Redactor()
    r.add_secrets(["configured-secret-value", 'with"quote\\and-backslash'])
    return r


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("login as Jane.Doe@Example.com failed", "login as J***@Example.com failed"),
        ("a@b.io, bob+x@mail.example.co.uk", "a***@b.io, b***@mail.example.co.uk"),
        ("uses configured-secret-value here", "uses *** here"),
        ("Authorization: Bearer abcdefghijkl", "Authorization: ***"),
        ("sent Bearer pat-na1-123456 to", "sent Bearer *** to"),
        ('{"access_token": "xyz123", "n": 1}', '{"access_token": "***", "n": 1}'),
        ("GET /x?token=abc123&y=1", "GET /x?token=***&y=1"),
        ("password=hunter22; next", "password=***; next"),
        ("<sessionId>00D!AQabc</sessionId>", "<sessionId>***</sessionId>"),
        ("<n1:password>pw</n1:password>", "<n1:password>***</n1:password>"),
        ("POST /webhooks/supersend/abcdef HTTP/1.1", "POST /webhooks/supersend/*** HTTP/1.1"),
        ("nothing to hide: 12 deliveries", "nothing to hide: 12 deliveries"),
        # Any key that ends in a credential's name: prefixed, camelCase, dashed.
        ("hubspot_token=pat-na1-abc123 next", "hubspot_token=*** next"),
        ('{"accessToken": "eyJhbGciOi.x.y", "n": 1}', '{"accessToken": "***", "n": 1}'),
        ('{\\"refreshToken\\":\\"r-123456\\"}', '{\\"refreshToken\\":\\"***\\"}'),
        ("X-Api-Key: k-0123456789", "X-Api-Key: ***"),
        ("hapikey=abcdef123456&x=1", "hapikey=***&x=1"),
        ("clientSecret = s3cr3t-value", "clientSecret = ***"),
        ("salesforce_password: hunter22", "salesforce_password: ***"),
        ("sfSessionId=00D!AQabc", "sfSessionId=***"),
        # Keys that only mention one keep their values.
        ("token_in: [path], tokens used: 12", "token_in: [path], tokens used: 12"),
        (
            "error: signature_invalid, idempotency_key=k1",
            "error: signature_invalid, idempotency_key=k1",
        ),
    ],
)
def test_text(redactor, text, expected):
    assert redactor.text(text) == expected


def test_json_escaped_secrets_are_hidden_too(redactor):
    line = json.dumps({"message": 'with"quote\\and-backslash'})
    assert "quote" not in redactor.text(line)


def test_names_are_masked_in_field_maps_but_not_our_own_fields(redactor):
    extra = {
        "connector": "hubspot",
        "name": "rule-1",  # top level: ours
        "would_write": {"fields": {"firstname": "Ada", "LastName": "Lovelace", "x": "keep"}},
    }
    assert redactor.value(extra) == {
        "connector": "hubspot",
        "name": "rule-1",
        "would_write": {"fields": {"firstname": "A***", "LastName": "L***", "x": "keep"}},
    }


def test_unmasking_keeps_secrets_hidden(redactor):
    redactor.mask_personal = False
    assert redactor.text("jane@example.com token=abcdef") == "jane@example.com token=***"
    assert redactor.value({"a": {"firstname": "Ada"}}) == {"a": {"firstname": "Ada"}}


@pytest.mark.parametrize("formatter", [JsonFormatter, TextFormatter])
def test_formatters_redact_messages_extras_and_tracebacks(redactor, formatter):
    try:
        raise ValueError("failed for jane@example.com with configured-secret-value")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "x", logging.ERROR, "f", 1, "%s", ("ann@example.com",), sys.exc_info()
        )
    record.would_write = {"fields": {"firstname": "Ada"}}
    line = formatter(redactor).format(record)
    for clear in ("jane@", "ann@", "configured-secret-value", "Ada"):
        assert clear not in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("/webhooks/supersend/tok123", "/webhooks/supersend/***"),
        ("/webhooks/supersend?token=tok123&x=1", "/webhooks/supersend?token=***&x=1"),
        ("/webhooks/supersend", "/webhooks/supersend"),
        ("/events/abc", "/events/abc"),
    ],
)
def test_access_log_urls(url, expected):
    assert redact_url(url) == expected
