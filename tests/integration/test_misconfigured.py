# ruff: noqa: F811  (the `bridge` fixture, imported from test_delivery, is each test's argument)
"""A metadata endpoint the connector needs answering 404 is a configuration problem: one clear
log line and the connector paused (shown in status, readiness and metrics), its deliveries
kept queued; not a dead letter per delivery."""

from __future__ import annotations

import asyncio
import logging

from tests.integration.test_delivery import bridge, send  # noqa: F401 (fixture)
from tests.support import sample


async def test_a_missing_properties_api_pauses_hubspot_instead_of_dead_letters(
    bridge, hubspot_emulator, caplog
):
    hubspot_emulator.unavailable.add("/crm/v3/properties")
    caplog.set_level(logging.INFO, logger="crm_bridge")
    client = await bridge(salesforce=None)
    bodies = [await send(client, sample(email=f"c{i}@example.com")) for i in range(5)]

    async def paused() -> dict:
        while True:
            status = await (await client.get("/status")).json()
            hubspot = status["connectors"]["hubspot"]
            if hubspot["pauses"]:
                return hubspot
            await asyncio.sleep(0.02)

    hubspot = await asyncio.wait_for(paused(), 20)
    (pause,) = hubspot["pauses"]
    assert pause["kind"] == "configuration" and pause["seconds_left"] > 0
    assert "404" in pause["reason"] or "not found" in pause["reason"].lower()
    ready = await client.get("/readyz")
    assert ready.status == 503
    metrics = await (await client.get("/metrics")).text()
    assert 'crm_bridge_connector_paused_seconds{connector="hubspot",kind="configuration"}' in (
        metrics
    )
    for body in bodies:
        event = await (await client.get(f"/events/{body['event_id']}")).json()
        (delivery,) = [d for d in event["deliveries"] if d["connector"] == "hubspot"]
        assert delivery["status"] in ("pending", "in_flight")  # kept, not dead
    lines = [r for r in caplog.records if r.name == "crm_bridge.delivery" and r.levelno >= 30]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "set-up" in lines[0].getMessage()
