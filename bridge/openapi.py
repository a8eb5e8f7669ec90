"""The OpenAPI 3.1 document of the daemon's HTTP API, served at `GET /openapi.json`.

The webhook body's schema states what ingest accepts, not a stricter ideal: whatever it
forbids, ingest refuses (tests/security/test_api_fuzz.py runs schemathesis against a live
daemon to hold that). Hence the lax forms pydantic accepts: booleans also as 0/1 and as the
words `true/false/yes/no/on/off/t/f/y/n` in any case, dates as strings or epoch numbers. It
is looser than ingest in one place: an email must be an address (`local@domain`), which the
schema does not spell out.
"""

from __future__ import annotations

from typing import Any

from bridge import __version__ as VERSION

_BOOL_WORDS = (
    r"^(?:[01]|[Tt](?:[Rr][Uu][Ee])?|[Ff](?:[Aa][Ll][Ss][Ee])?|[Yy](?:[Ee][Ss])?|[Nn][Oo]?"
    r"|[Oo][Nn]|[Oo][Ff][Ff])$"
)
_TEXT: dict[str, Any] = {"type": ["string", "null"]}
_BOOL: dict[str, Any] = {
    "anyOf": [
        {"type": ["boolean", "null"]},
        {"enum": [0, 1]},
        {"type": "string", "pattern": _BOOL_WORDS},
    ]
}
_DATE: dict[str, Any] = {
    "type": ["string", "number", "null"],
    "description": "ISO 8601, or seconds since the epoch",
}

SENDER = {
    "type": ["object", "null"],
    "description": "The mailbox that sent the campaign message.",
    "properties": {name: _TEXT for name in ("id", "provider", "send_as", "email")},
    "additionalProperties": True,
}

CONTACT = {
    "type": "object",
    "description": "The platform's contact record; fields not listed are kept as they are.",
    "properties": {
        **{
            name: _TEXT
            for name in (
                "id",
                "first_name",
                "last_name",
                "title",
                "phone",
                "company_name",
                "interest",
            )
        },
        "email": {
            "type": ["string", "null"],
            "description": "An address (local@domain), trimmed and lower-cased; empty is none.",
        },
        **{name: _BOOL for name in ("appointment", "clicked", "opened", "replied", "bounced")},
        "custom": {"type": ["object", "null"]},
        "createdAt": _DATE,
        "updatedAt": _DATE,
        "Sender": SENDER,
    },
    "additionalProperties": True,
}

WEBHOOK = {
    "type": "object",
    "required": ["type", "contact"],
    "properties": {
        "type": {"type": "string", "minLength": 1, "maxLength": 64},
        "CampaignId": _TEXT,
        "contact": CONTACT,
    },
    "additionalProperties": True,
}

ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a stable code, e.g. `invalid_payload`"},
        "message": {"type": "string"},
        "fields": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "message"],
                "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
            },
        },
    },
}

_REFUSALS = {
    "400": "`invalid_json`, `json_too_deep`, `json_too_many_fields`",
    "401": "`unauthorized` (token), `signature_missing`, `signature_invalid`, `signature_expired`",
    "403": "`ip_forbidden`: the source's `allow_ips` do not hold the client",
    "404": "`unknown_source`",
    "408": "`request_timeout`: the body did not arrive within `server.read_timeout`",
    "409": "`replayed`: a signed message's `webhook-id` seen before, its event not stored",
    "413": "`payload_too_large`",
    "415": "`unsupported_media_type`",
    "422": "`invalid_payload`, with `fields`",
    "429": "`rate_limited`: over the source's `rate_limit`; see `Retry-After`",
    "503": "`backlog_full`, `store_unavailable`, `overloaded`; see `Retry-After`",
}
_RETRY_AFTER = {"Retry-After": {"schema": {"type": "string"}, "description": "seconds"}}


def _json(schema: dict[str, Any], description: str, **extra: Any) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}} | extra


def _webhook_operation(with_token: bool, sources: list[str] | None) -> dict[str, Any]:
    source_schema: dict[str, Any] = {"type": "string"}
    if sources:
        source_schema["enum"] = sources
    parameters: list[dict[str, Any]] = [
        {"name": "source", "in": "path", "required": True, "schema": source_schema},
    ]
    if with_token:
        parameters.append(
            {"name": "token", "in": "path", "required": True, "schema": {"type": "string"}}
        )
    responses = {
        "202": _json(
            {
                "type": "object",
                "required": ["event_id", "duplicate"],
                "properties": {"event_id": {"type": "string"}, "duplicate": {"type": "boolean"}},
            },
            "Stored (committed), or already stored.",
        ),
    }
    for status, codes in _REFUSALS.items():
        extra = {"headers": _RETRY_AFTER} if status in ("429", "503") else {}
        responses[status] = _json(ERROR, f"Refused, nothing stored: {codes}.", **extra)
    return {
        "summary": "Receive one webhook" + (" (token in the path)" if with_token else ""),
        "description": (
            "Authenticated per source: a token (path, `?token=`, `X-Webhook-Token`, "
            "`Authorization: Bearer`), a Standard Webhooks signature (`webhook-id`, "
            "`webhook-timestamp`, `webhook-signature`) or an HMAC of the body; see README."
        ),
        "operationId": "receiveWebhookTokenInPath" if with_token else "receiveWebhook",
        "parameters": parameters,
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": WEBHOOK}},
        },
        "responses": responses,
    }


def _get(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"operationId": operation_id, "summary": summary, "responses": responses}}


LOOPBACK_ONLY = _json(ERROR, "Not asked from the machine itself.")


def document(sources: list[str] | None = None) -> dict[str, Any]:
    """The OpenAPI document (a fresh copy); `sources`: the configured ones, if known."""
    any_object: dict[str, Any] = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crm-bridge",
            "version": VERSION,
            "description": "Receives outreach-platform webhooks and delivers them to CRMs.",
        },
        "paths": {
            "/webhooks/{source}": {"post": _webhook_operation(False, sources)},
            "/webhooks/{source}/{token}": {"post": _webhook_operation(True, sources)},
            "/healthz": _get(
                "healthz", "The process answers.", {"200": _json(any_object, "Alive.")}
            ),
            "/readyz": _get(
                "readyz",
                "The store commits and no connector is paused.",
                {
                    "200": _json(any_object, "Ready."),
                    "503": _json(any_object, "Not ready, with the reasons."),
                },
            ),
            "/events/{event_id}": {
                "get": {
                    "operationId": "showEvent",
                    "summary": "A stored event with its deliveries (loopback only).",
                    "parameters": [
                        {
                            "name": "event_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": _json(any_object, "The event."),
                        "403": LOOPBACK_ONLY,
                        "404": _json(ERROR, "No such event."),
                    },
                }
            },
            "/status": _get(
                "showStatus",
                "Backlog, deliveries by status, circuit breakers (loopback only).",
                {"200": _json(any_object, "The status."), "403": LOOPBACK_ONLY},
            ),
            "/metrics": _get(
                "metrics",
                "Prometheus metrics.",
                {
                    "200": {
                        "description": "Prometheus text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
            "/openapi.json": _get(
                "openapi", "This document.", {"200": _json(any_object, "OpenAPI 3.1.")}
            ),
        },
        "components": {"schemas": {"Webhook": WEBHOOK, "Error": ERROR}},
    }
