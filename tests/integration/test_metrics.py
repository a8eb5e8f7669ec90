"""`GET /metrics`: what was sent is what is counted (in process, against the HubSpot emulator)."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_faults import delivery_of, post, start
from tests.support import sample

SENT = {"click": 3, "open": 2, "reply": 1}


async def scrape(client) -> dict[str, dict[tuple, float]]:
    """Every sample of /metrics, by sample name and then by sorted label pairs."""
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(await response.text()):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples, name, **labels) -> float | None:
    return samples.get(name, {}).get(tuple(sorted(labels.items())))


def events(samples, type_, outcome) -> float | None:
    labels = {"source": "supersend", "type": type_, "outcome": outcome}
    return value(samples, "crm_bridge_events_received_total", **labels)


async def test_metrics_count_what_was_sent_and_show_the_breaker(tmp_path, hubspot_emulator):
    client = await start(tmp_path, hubspot_emulator, delivery="  auth_pause: 30")
    try:
        # Given events of known types, one of them sent twice, and a request with a wrong token
        ids = []
        for type_, n in SENT.items():
            for i in range(n):
                status, body, _ = await post(client, sample(type=type_, email=f"{type_}{i}@x.io"))
                assert (status, body["duplicate"]) == (202, False)
                ids.append(body["event_id"])
        status, body, _ = await post(client, sample(type="click", email="click0@x.io"))
        assert (status, body["duplicate"]) == (202, True)
        refused = await client.post("/webhooks/supersend/wrong-token", json=sample())
        assert refused.status == 401
        for event_id in ids:
            await delivery_of(client, event_id, lambda d: d["status"] == "done")

        # When /metrics is scraped
        m = await scrape(client)

        # Then the events are counted by type and outcome
        assert {t: events(m, t, "stored") for t in SENT} == SENT
        assert events(m, "click", "duplicate") == 1
        assert events(m, "unknown", "refused:401") == 1
        assert sum(m["crm_bridge_events_received_total"].values()) == len(ids) + 2
        # and each delivery once, as done
        hubspot = {"connector": "hubspot", "action": "upsert_contact"}
        assert value(m, "crm_bridge_deliveries_total", outcome="done", **hubspot) == len(ids)
        assert sum(m["crm_bridge_deliveries_total"].values()) == len(ids)
        assert "crm_bridge_dead_letters_total" not in m
        # and the latency histogram has one observation per CRM call
        calls = len(hubspot_emulator.calls_to("POST", "/batch/upsert"))
        assert calls >= 1
        assert value(m, "crm_bridge_crm_call_duration_seconds_count", **hubspot) == calls
        inf = value(m, "crm_bridge_crm_call_duration_seconds_bucket", le="+Inf", **hubspot)
        assert inf == calls
        # and the scrape-time gauges: an empty queue, a closed breaker, the limiter's wait
        assert value(m, "crm_bridge_queue_depth", connector="hubspot", status="pending") == 0
        assert value(m, "crm_bridge_queue_depth", connector="hubspot", status="in_flight") == 0
        assert value(m, "crm_bridge_queue_oldest_pending_age_seconds", connector="hubspot") == 0
        assert value(m, "crm_bridge_circuit_breaker_state", connector="hubspot") == 0
        assert value(m, "crm_bridge_rate_limit_wait_seconds_total", connector="hubspot") == 0

        # When HubSpot refuses the token
        before = calls
        hubspot_emulator.token = "other"
        _, body, _ = await post(client, sample(email="late@x.io"))

        async def breaker_open():
            while True:
                m = await scrape(client)
                if value(m, "crm_bridge_circuit_breaker_state", connector="hubspot") == 2:
                    return m
                await asyncio.sleep(0.02)

        # Then the breaker gauge turns 2 (open), and the refused delivery waits, counted
        m = await asyncio.wait_for(breaker_open(), 10)
        await delivery_of(client, body["event_id"], lambda d: d["status"] == "pending")
        m = await scrape(client)
        assert value(m, "crm_bridge_circuit_breaker_state", connector="hubspot") == 2
        assert value(m, "crm_bridge_deliveries_total", outcome="retry", **hubspot) == 1
        assert value(m, "crm_bridge_retries_total", connector="hubspot", kind="rescheduled") == 1
        calls = len(hubspot_emulator.calls_to("POST", "/batch/upsert"))
        assert value(m, "crm_bridge_crm_call_duration_seconds_count", **hubspot) == calls
        # and any call for it after the first was a retry in the call
        in_call = value(m, "crm_bridge_retries_total", connector="hubspot", kind="in_call") or 0
        assert in_call == calls - before - 1
        assert value(m, "crm_bridge_queue_depth", connector="hubspot", status="pending") == 1
        assert value(m, "crm_bridge_queue_oldest_pending_age_seconds", connector="hubspot") >= 0
    finally:
        await client.close()


async def test_two_apps_in_one_process_count_apart(tmp_path, hubspot_emulator):
    first = await start(tmp_path / "a", hubspot_emulator)
    second = await start(tmp_path / "b", hubspot_emulator)
    try:
        await post(first, sample())
        a, b = await scrape(first), await scrape(second)
        stored = {"source": "supersend", "type": "click", "outcome": "stored"}
        assert value(a, "crm_bridge_events_received_total", **stored) == 1
        assert value(b, "crm_bridge_events_received_total", **stored) is None
    finally:
        await first.close()
        await second.close()
