"""Ingest -> store -> rules -> delivery -> the real SDKs -> the emulators, in one process."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bridge.config import parse_config
from bridge.server import create_app
from tests.support import TOKEN, config_yaml, hubspot_settings, salesforce_settings, sample

FINISHED = {"done", "dead", "dry_run", "skipped"}


@pytest.fixture
async def bridge(tmp_path, store_config, hubspot_emulator, salesforce_emulator):
    """Start the app in process, on each backend in turn (tests.postgres.store_config)."""
    clients = []

    async def start(delivery: str = "", **overrides) -> TestClient:
        settings = {
            "hubspot": hubspot_settings(hubspot_emulator),
            "salesforce": salesforce_settings(salesforce_emulator),
        } | overrides
        text = config_yaml(
            tmp_path / "bridge.db", delivery=delivery, store=store_config, **settings
        )
        app = create_app(parse_config(text))
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()


async def send(client: TestClient, body: dict) -> dict:
    response = await client.post(f"/webhooks/supersend/{TOKEN}", json=body)
    assert response.status == 202, await response.text()
    return await response.json()


async def settled(client: TestClient, event_id: str, timeout: float = 20) -> list[dict]:
    """The event's deliveries once none is pending or in flight."""

    async def poll() -> list[dict]:
        while True:
            event = await (await client.get(f"/events/{event_id}")).json()
            routed = event["routed_at"] is not None
            if routed and all(d["status"] in FINISHED for d in event["deliveries"]):
                return event["deliveries"]
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


def hubspot_contacts(emulator, email):
    with emulator.lock:
        return [
            dict(r.properties)
            for r in emulator.contacts.values()
            if r.properties.get("email") == email
        ]


def salesforce_leads(emulator, email):
    return [r for r in emulator.records("Lead") if (r.get("Email") or "").lower() == email]


async def test_the_sample_reaches_both_crms(bridge, hubspot_emulator, salesforce_emulator):
    client = await bridge()
    body = await send(client, sample(first_name="Ada", last_name="Lovelace"))
    deliveries = await settled(client, body["event_id"])
    assert [d["status"] for d in deliveries] == ["done", "done"]
    (contact,) = hubspot_contacts(hubspot_emulator, "andrew@xoxo.capital")
    assert (contact["firstname"], contact["lastname"], contact["hs_lead_status"]) == (
        "Ada",
        "Lovelace",
        "OPEN",
    )
    (lead,) = salesforce_leads(salesforce_emulator, "andrew@xoxo.capital")
    assert (lead["FirstName"], lead["LastName"], lead["Company"]) == (
        "Ada",
        "Lovelace",
        "xoxo.capital",
    )
    assert deliveries[0]["result"]["record_id"] == contact["hs_object_id"]
    assert deliveries[1]["result"]["record_id"] == lead["Id"]


async def test_a_blip_is_retried_in_the_call(bridge, hubspot_emulator):
    client = await bridge()
    hubspot_emulator.fail_next_server_error(2, status=503, match="/batch/upsert")
    body = await send(client, sample())
    hubspot, _ = await settled(client, body["event_id"])
    assert (hubspot["status"], hubspot["attempts"]) == ("done", 1)
    assert len(hubspot_contacts(hubspot_emulator, "andrew@xoxo.capital")) == 1


async def test_a_longer_outage_is_rescheduled_with_its_error_kept(bridge, hubspot_emulator):
    client = await bridge()
    # in_call_attempts is 3: the fourth call is the second attempt.
    hubspot_emulator.fail_next_server_error(3, status=503, match="/batch/upsert")
    body = await send(client, sample())

    async def first_failure() -> dict:
        while True:
            event = await (await client.get(f"/events/{body['event_id']}")).json()
            if not event["deliveries"]:
                await asyncio.sleep(0.005)
                continue
            hubspot = event["deliveries"][0]
            if hubspot["last_error"] or hubspot["status"] in FINISHED:
                return hubspot
            await asyncio.sleep(0.005)

    failed = await asyncio.wait_for(first_failure(), 20)
    assert failed["last_error"].startswith("HubSpot 503")
    hubspot, _ = await settled(client, body["event_id"])
    assert (hubspot["status"], hubspot["attempts"]) == ("done", 2)


async def test_a_refused_record_is_dead_at_once_with_the_crms_message(bridge, hubspot_emulator):
    client = await bridge()
    hubspot_emulator.fail_next(
        1,
        400,
        match="/batch/upsert",
        body={
            "status": "error",
            "message": "Property values were not valid",
            "correlationId": "c",
            "category": "VALIDATION_ERROR",
        },
    )
    body = await send(client, sample(first_name="x" * 10, type="interest"))
    dead, _ = await settled(client, body["event_id"])
    assert (dead["status"], dead["attempts"]) == ("dead", 1)
    assert dead["last_error"] == "HubSpot 400: Property values were not valid"
    # A dead delivery does not block the contact's later ones.
    other = await send(
        client, sample(first_name="Ada", type="interest", updatedAt="2024-01-01T00:00:00Z")
    )
    done, _ = await settled(client, other["event_id"])
    assert done["status"] == "done"


async def test_a_contacts_changes_reach_the_crm_in_order(bridge, hubspot_emulator):
    client = await bridge()
    hubspot_emulator.latency = 0.02
    ids = []
    for i, name in enumerate(["first", "second", "third"]):
        body = await send(client, sample(first_name=name, updatedAt=f"2024-01-01T00:00:0{i}Z"))
        ids.append(body["event_id"])
    for event_id in ids:
        await settled(client, event_id)
    writes = [
        c.json["inputs"][0]["properties"]["firstname"]
        for c in hubspot_emulator.calls_to("POST", "/batch/upsert")
    ]
    # Queued changes may merge into one write, but never go backwards.
    assert writes[-1] == "third"
    assert writes == sorted(writes, key=["first", "second", "third"].index)
    (contact,) = hubspot_contacts(hubspot_emulator, "andrew@xoxo.capital")
    assert contact["firstname"] == "third"


async def test_a_resent_older_state_never_overwrites_a_newer_one(bridge, hubspot_emulator):
    client = await bridge()
    newer = await send(client, sample(first_name="newer", updatedAt="2024-01-01T00:00:09Z"))
    await settled(client, newer["event_id"])
    older = await send(client, sample(first_name="older", updatedAt="2024-01-01T00:00:01Z"))
    hubspot, _ = await settled(client, older["event_id"])
    assert hubspot["status"] == "skipped"
    # Every field it maps was decided by the newer event: nothing is left to send.
    assert hubspot["last_error"].startswith("nothing to write: newer events decided every field")
    (contact,) = hubspot_contacts(hubspot_emulator, "andrew@xoxo.capital")
    assert contact["firstname"] == "newer"
    assert len(hubspot_emulator.calls_to("POST", "/batch/upsert")) == 1


async def test_a_burst_within_the_window_becomes_one_write(bridge, hubspot_emulator):
    client = await bridge(delivery="  coalesce_window: 0.3")
    # A burst: the three arrive together (one after the other, they would be stored tens of
    # milliseconds apart on a busy machine's PostgreSQL, and the first could fall due, and be
    # claimed, before the last).
    bodies = await asyncio.gather(
        *(
            send(client, sample(type=type_, first_name=name, updatedAt=f"2024-01-01T00:00:0{i}Z"))
            for i, (type_, name) in enumerate([("open", "a"), ("click", "b"), ("interest", "c")])
        )
    )
    ids = [body["event_id"] for body in bodies]
    results = [await settled(client, event_id) for event_id in ids]
    hubspot_results = [r[0] for r in results if r and r[0]["connector"] == "hubspot"]
    assert {d["status"] for d in hubspot_results} == {"done"}
    (write,) = hubspot_emulator.calls_to("POST", "/batch/upsert")
    assert write.json["inputs"][0]["properties"]["firstname"] == "c"
    assert sorted(hubspot_results[-1]["result"]["coalesced"]) == sorted(
        d["id"] for d in hubspot_results
    )


async def test_one_crm_down_does_not_delay_the_other(bridge, hubspot_emulator, salesforce_emulator):
    client = await bridge()
    hubspot_emulator.fail_next_server_error(100_000, status=503)  # HubSpot is down
    body = await send(client, sample())

    async def salesforce_done() -> list[dict]:
        while True:
            event = await (await client.get(f"/events/{body['event_id']}")).json()
            if len(event["deliveries"]) == 2 and event["deliveries"][1]["status"] == "done":
                return event["deliveries"]
            await asyncio.sleep(0.02)

    hubspot, _ = await asyncio.wait_for(salesforce_done(), 20)
    assert hubspot["status"] in ("pending", "in_flight")
    assert len(salesforce_leads(salesforce_emulator, "andrew@xoxo.capital")) == 1
