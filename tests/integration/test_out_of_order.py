# ruff: noqa: F811  (the `bridge` fixture, imported from test_delivery, is each test's argument)
"""Events that arrive out of order, as a user sees them in the CRMs: the example config's
rules, the real SDKs, the emulators (one scenario per cause the order-independence property
found: whole writes skipped as stale, writes that gave up before their record existed, and
dead letters for what the rules meant as "if there is one")."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_delivery import (  # noqa: F401 (fixture)
    bridge,
    hubspot_contacts,
    salesforce_leads,
    send,
    settled,
)
from tests.support import sample

EXAMPLE_RULES = (Path(__file__).parents[2] / "config.example.yaml").read_text()
EXAMPLE_RULES = EXAMPLE_RULES.split("\nrules:", 1)[1]
EMAIL = "andrew@xoxo.capital"


def event(type_: str, second: int, **contact) -> dict:
    return sample(type=type_, updatedAt=f"2024-01-01T00:00:{second:02d}Z", **contact)


async def test_an_older_reply_still_names_a_contact_a_newer_appointment_made(
    bridge, hubspot_emulator
):
    # (Salesforce has no lead for this contact: its updates wait a moment, then skip.)
    client = await bridge(rules=EXAMPLE_RULES, delivery="await_record: 0.2")
    newer = await send(client, event("appointment", 30, appointment=True, first_name=None))
    await settled(client, newer["event_id"])
    (contact,) = hubspot_contacts(hubspot_emulator, EMAIL)
    assert (contact["hs_lead_status"], contact.get("firstname")) == ("CONNECTED", None)
    # The reply happened before the appointment, and arrives after it.
    older = await send(client, event("reply", 10, first_name="Andrew", last_name="Pierce"))
    deliveries = await settled(client, older["event_id"])
    (contact,) = hubspot_contacts(hubspot_emulator, EMAIL)
    # Its name lands (no newer event decided it); its older status does not undo CONNECTED.
    assert (contact["firstname"], contact["lastname"]) == ("Andrew", "Pierce")
    assert contact["hs_lead_status"] == "CONNECTED"
    upsert = next(d for d in deliveries if d["rule"] == "replied-to-hubspot")
    assert upsert["status"] == "done"


async def test_an_older_interest_fills_what_the_newer_one_left_empty(bridge, salesforce_emulator):
    client = await bridge(rules=EXAMPLE_RULES)
    newer = await send(client, event("interest", 40, title="Countess", phone=None))
    await settled(client, newer["event_id"])
    older = await send(client, event("interest", 20, title="CTO", phone="+44 20 7946 0000"))
    await settled(client, older["event_id"])
    (lead,) = salesforce_leads(salesforce_emulator, EMAIL)
    assert (lead["Title"], lead["Phone"]) == ("Countess", "+44 20 7946 0000")
    # A bounce older than both still marks the lead: nothing newer wrote those fields.
    bounce = await send(client, event("bounce", 5))
    await settled(client, bounce["event_id"])
    (lead,) = salesforce_leads(salesforce_emulator, EMAIL)
    assert lead["EmailBouncedReason"].startswith("Bounced in Supersend campaign")
    assert lead["Title"] == "Countess"


async def test_a_status_that_arrives_before_its_record_waits_for_it(
    bridge, hubspot_emulator, salesforce_emulator
):
    client = await bridge(rules=EXAMPLE_RULES)
    # The newest event, "not interested", comes first: HubSpot has no contact to update yet.
    newest = await send(client, event("interest", 50, interest="not_interested"))
    waiting = await client.get(f"/events/{newest['event_id']}")
    # The older appointment creates the contact, which releases the waiting update at once.
    await send(client, event("appointment", 20, appointment=True))
    # A reply before the lead exists: its Salesforce Task waits for the lead too.
    reply = await send(client, event("reply", 25))
    await send(client, event("interest", 30, interest="interested"))
    for body in (newest, reply):
        deliveries = await settled(client, body["event_id"])
        assert {d["status"] for d in deliveries} == {"done"}, deliveries
    assert waiting.status == 200
    (contact,) = hubspot_contacts(hubspot_emulator, EMAIL)
    assert contact["hs_lead_status"] == "UNQUALIFIED"  # the newest event's, as in order
    (lead,) = salesforce_leads(salesforce_emulator, EMAIL)
    tasks = [t for t in salesforce_emulator.records("Task") if t["WhoId"] == lead["Id"]]
    assert [t["Subject"] for t in tasks] == ["Replied to campaign " + sample()["CampaignId"]]
    assert lead["Status"] == "Working - Contacted"


async def test_a_reply_from_a_contact_who_never_became_a_lead_is_skipped_not_dead(
    bridge, salesforce_emulator
):
    client = await bridge(rules=EXAMPLE_RULES, delivery="await_record: 0.3")
    reply = await send(client, event("reply", 10))
    deliveries = await settled(client, reply["event_id"])
    task = next(d for d in deliveries if d["rule"] == "reply-task-to-salesforce")
    status = next(d for d in deliveries if d["rule"] == "replied-to-salesforce")
    assert (task["status"], status["status"]) == ("skipped", "skipped")
    assert "no Salesforce Lead" in task["last_error"] and "waited" in task["last_error"]
    assert salesforce_emulator.records("Task") == []
    dead = await (await client.get("/status")).json()
    assert dead["deliveries"]["salesforce"].get("dead", 0) == 0
    assert dead["deliveries"]["salesforce"]["skipped"] == 2


async def test_a_rule_can_ask_for_a_dead_letter_when_the_record_never_comes(bridge):
    rules = EXAMPLE_RULES.replace(
        "    if_missing: wait              # a contact who never becomes a lead",
        "    if_missing: dead_letter       # a contact who never becomes a lead",
    )
    assert rules != EXAMPLE_RULES
    client = await bridge(rules=rules, delivery="await_record: 0.2")
    reply = await send(client, event("reply", 10))
    deliveries = await settled(client, reply["event_id"])
    task = next(d for d in deliveries if d["rule"] == "reply-task-to-salesforce")
    assert task["status"] == "dead"
    assert "waited" in task["last_error"]
