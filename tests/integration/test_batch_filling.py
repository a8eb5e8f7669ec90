# ruff: noqa: F811  (the `bridge` fixture, imported from test_delivery, is each test's argument)
"""Under a sustained stream the worker lets due deliveries gather while a call is in flight,
so that CRM batches fill; a lone event after an idle spell still leaves at once."""

from __future__ import annotations

import asyncio

from tests.integration.test_delivery import bridge, send, settled  # noqa: F401 (fixture)
from tests.support import sample


async def test_a_steady_stream_fills_the_batches(bridge, hubspot_emulator):
    hubspot_emulator.latency = 0.1  # a CRM call takes a while, as over the internet
    client = await bridge(salesforce=None)  # the default batch_gather
    bodies = []
    for i in range(40):  # a steady stream: one webhook every 20 ms, five per CRM call
        bodies.append(await send(client, sample(email=f"c{i}@example.com")))
        await asyncio.sleep(0.02)
    for body in bodies:
        await settled(client, body["event_id"])
    sizes = [len(c.json["inputs"]) for c in hubspot_emulator.calls_to("POST", "/batch/upsert")]
    assert sum(sizes) == 40
    # Sent as they came, most would be alone in their call (27 calls, 20 of one contact, with
    # batch_gather: 0); gathered while a call is in flight, about one call per call's time.
    assert len(sizes) <= 14, sizes


async def test_a_lone_event_after_an_idle_spell_leaves_at_once(bridge, hubspot_emulator):
    # Gathering only happens while a call is in flight: with nothing in flight even an absurd
    # gathering time does not hold a lone event (settled's bound is half of it).
    client = await bridge(delivery="batch_gather: 5", salesforce=None)
    for i in range(2):
        body = await send(client, sample(email=f"lone{i}@example.com"))
        deliveries = await settled(client, body["event_id"], timeout=2.5)
        assert [d["status"] for d in deliveries if d["connector"] == "hubspot"] == ["done"]
