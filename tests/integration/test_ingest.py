"""The webhook endpoint in process: every refusal with its status and body, and the 202 path."""

import asyncio
import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import parse_config
from bridge.server import create_app
from tests.support import SAMPLE_TEXT, TOKEN, config_yaml, sample

JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def client(tmp_path, store_config):
    # Once per backend (tests.postgres.store_config): SQLite, then PostgreSQL.
    app = create_app(parse_config(config_yaml(tmp_path / "bridge.db", store=store_config)))
    async with TestClient(TestServer(app)) as client:
        yield client


async def routed(client, event_id: str, *, settled: bool = False) -> dict:
    """The stored event once the rules have routed it (and, if asked, its deliveries ended)."""
    for _ in range(1000):
        event = await (await client.get(f"/events/{event_id}")).json()
        unfinished = any(d["status"] in ("pending", "in_flight") for d in event["deliveries"])
        if event["routed_at"] is not None and not (settled and unfinished):
            return event
        await asyncio.sleep(0.01)
    raise AssertionError(f"event {event_id} was not routed")


async def post(client, body, *, path=f"/webhooks/supersend?token={TOKEN}", headers=JSON):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    response = await client.post(path, data=data, headers=headers)
    return response.status, await response.json()


async def test_the_sample_is_stored_and_acknowledged(client):
    status, body = await post(client, SAMPLE_TEXT)
    assert status == 202
    assert body == {"event_id": body["event_id"], "duplicate": False}
    stored = await routed(client, body["event_id"])
    assert [(d["rule"], d["connector"]) for d in stored["deliveries"]] == [
        ("interested-to-hubspot", "hubspot"),
        ("interested-to-salesforce", "salesforce"),
    ]
    assert stored["body"] == SAMPLE_TEXT  # kept byte for byte, unknown fields included
    assert stored["email"] == "andrew@xoxo.capital"


@pytest.mark.parametrize(
    "path_and_headers",
    [
        (f"/webhooks/supersend?token={TOKEN}", JSON),
        (f"/webhooks/supersend/{TOKEN}", JSON),
        ("/webhooks/supersend", {**JSON, "X-Webhook-Token": TOKEN}),
        ("/webhooks/supersend", {**JSON, "Authorization": f"Bearer {TOKEN}"}),
    ],
)
async def test_the_token_may_travel_in_path_query_or_header(client, path_and_headers):
    path, headers = path_and_headers
    status, _ = await post(client, SAMPLE_TEXT, path=path, headers=headers)
    assert status == 202


async def test_the_same_payload_twice_is_acknowledged_twice_and_queued_once(client):
    _, first = await post(client, SAMPLE_TEXT)
    reordered = json.dumps(dict(reversed(list(json.loads(SAMPLE_TEXT).items()))), indent=4)
    status, again = await post(client, reordered)
    assert status == 202
    assert again == {"event_id": first["event_id"], "duplicate": True}


@pytest.mark.parametrize(
    ("path", "headers", "body", "status", "error", "message"),
    [
        (
            "/webhooks/supersend",
            JSON,
            SAMPLE_TEXT,
            401,
            "unauthorized",
            "missing or wrong webhook token",
        ),
        (
            "/webhooks/supersend?token=wrong",
            JSON,
            SAMPLE_TEXT,
            401,
            "unauthorized",
            "missing or wrong webhook token",
        ),
        (
            f"/webhooks/supersend/{TOKEN}x",
            JSON,
            SAMPLE_TEXT,
            401,
            "unauthorized",
            "missing or wrong webhook token",
        ),
        (
            f"/webhooks/nowhere?token={TOKEN}",
            JSON,
            SAMPLE_TEXT,
            404,
            "unknown_source",
            "no source named 'nowhere'",
        ),
        (
            f"/webhooks/supersend?token={TOKEN}",
            {"Content-Type": "text/plain"},
            SAMPLE_TEXT,
            415,
            "unsupported_media_type",
            "Content-Type must be application/json, not 'text/plain'",
        ),
        (f"/webhooks/supersend?token={TOKEN}", JSON, "{not json", 400, "invalid_json", None),
        (
            f"/webhooks/supersend?token={TOKEN}",
            JSON,
            "[1, 2]",
            422,
            "invalid_payload",
            "body must be a JSON object",
        ),
        (
            f"/webhooks/supersend?token={TOKEN}",
            JSON,
            json.dumps({"x": " " * 5000}),
            413,
            "payload_too_large",
            "body is larger than 4096 bytes",
        ),
    ],
)
async def test_refusals(client, path, headers, body, status, error, message):
    got_status, got = await post(client, body, path=path, headers=headers)
    assert (got_status, got["error"]) == (status, error)
    if message:
        assert got["message"] == message
    else:
        assert got["message"].startswith("body is not valid JSON:")


async def test_schema_violations_name_every_field(client):
    bad = sample(email="nobody", appointment="maybe")
    status, body = await post(client, bad)
    assert status == 422
    assert body == {
        "error": "invalid_payload",
        "message": "invalid field contact.email, contact.appointment",
        "fields": [
            {"field": "contact.email", "message": "Value error, not an email address"},
            {
                "field": "contact.appointment",
                "message": "Input should be a valid boolean, unable to interpret input",
            },
        ],
    }


@pytest.mark.parametrize(
    ("field", "body"),
    [("type", sample(type="cl\x00ick")), ("contact.email", sample(email="a\x00@example.com"))],
)
async def test_a_nul_in_a_stored_column_is_refused_on_every_backend(client, field, body):
    # PostgreSQL cannot store it (a 500 at every retry); SQLite could: both answer 422.
    status, refused = await post(client, body)
    assert (status, refused["error"]) == (422, "invalid_payload")
    assert [f["field"] for f in refused["fields"]] == [field]
    # A "\u0000" elsewhere in the body is only JSON text: stored as sent.
    status, ok = await post(client, sample(first_name="Ada\x00"))
    assert (status, ok["duplicate"]) == (202, False)


async def test_a_missing_contact_is_named(client):
    status, body = await post(client, {"type": "click"})
    assert status == 422
    assert body["fields"] == [{"field": "contact", "message": "Field required"}]


async def test_nothing_is_stored_for_a_refused_request(client, tmp_path):
    await post(client, sample(email="nobody"))
    await post(client, SAMPLE_TEXT, path="/webhooks/supersend")
    _, ok = await post(client, SAMPLE_TEXT)
    assert ok["duplicate"] is False  # the earlier refusals left no trace


async def test_unknown_types_are_stored_but_match_no_rule(client):
    status, body = await post(client, sample(type="unsubscribe"))
    assert status == 202
    stored = await routed(client, body["event_id"])
    assert stored["deliveries"] == []
    assert stored["notes"] == ["no rule matched type 'unsubscribe'"]


async def test_a_contact_without_email_is_stored_with_the_reason(client):
    status, body = await post(client, sample(email=None))
    assert status == 202
    stored = await routed(client, body["event_id"])
    assert stored["deliveries"] == []
    assert stored["notes"][0] == (
        "rule 'interested-to-hubspot' matched but the record key ({{ contact.email }}) is empty:"
        " nothing sent to hubspot"
    )


async def test_without_credentials_connectors_keep_what_they_would_have_written(client):
    _, body = await post(client, sample(first_name="Ada", last_name="Lovelace"))
    stored = await routed(client, body["event_id"], settled=True)
    hubspot, salesforce = stored["deliveries"]
    assert hubspot["status"] == salesforce["status"] == "dry_run"
    assert hubspot["result"]["detail"]["would_write"] == {
        "crm": "hubspot",
        "operation": "upsert_lead",
        "op": "upsert",
        "object": "contact",
        "id_property": None,
        "id_value": "andrew@xoxo.capital",
        "record_id": None,
        "fields": {"firstname": "Ada", "lastname": "Lovelace", "hs_lead_status": "OPEN"},
    }
    assert salesforce["result"]["detail"]["would_write"]["fields"] == {
        "FirstName": "Ada",
        "LastName": "Lovelace",
    }
