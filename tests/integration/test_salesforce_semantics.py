"""What a Salesforce admin checks in the org and an operator in `/status`, through
simple-salesforce against the emulator.

Limits: a REQUEST_LIMIT_EXCEEDED is a spent daily allocation only when the same answer's
`Sforce-Limit-Info` says so (else a backoff of seconds, as for concurrent long requests), and
a spent allocation is asked about again (`/limits`) rather than sat out for an hour; every
pause shows in `/status`, in `crm-bridge status` and in the metrics. Records: an update never
rewrites the Email a rep typed, and one left with nothing to write sends nothing. Calls: a
batch costs one lookup per object, Tasks go out in one Collections create, and the ids earlier
deliveries found cost no lookup. WhoIds: a converted Lead takes no Task, its Contact does.
The connector's pauses run on a ManualClock (`connector.clock`): no test waits them out.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest

from bridge import status
from bridge.config import parse_config
from bridge.errors import ConnectorUnusable, Misconfigured, RetryableDelivery
from bridge.server import create_app
from bridge.store import open_store
from connectors.base import Activity, DeliveryResult, LeadUpsert, WritePolicy
from tests.emulators import ManualClock
from tests.integration.test_faults import delivery_of, post
from tests.support import config_yaml, salesforce_settings, sample

V = "/services/data/v59.0"
OCCURRED_AT = datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()


def lead(email: str, record_id: str | None = None, **fields) -> LeadUpsert:
    return LeadUpsert(
        object="lead", id_value=email, fields=fields or {"Title": "CTO"}, record_id=record_id
    )


def activity(email: str, key: str, **overrides) -> Activity:
    values = {
        "kind": "task",
        "object": "lead",
        "id_value": email,
        "subject": "Replied",
        "body": "Thanks",
        "occurred_at": OCCURRED_AT,
        "key": key,
    } | overrides
    return Activity(**values)


def seed_lead(emulator, email: str, **fields) -> str:
    return emulator.seed("Lead", {"LastName": "L", "Company": "C", "Email": email, **fields})


@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
async def connector(salesforce_of, clock):
    """A connector whose pauses run on the test's clock, its Lead describe already cached (as
    in a daemon that has written before): the calls counted are the writes' own."""
    connector = await salesforce_of()
    connector.clock = clock
    await connector.describe("lead")
    return connector


# -- REQUEST_LIMIT_EXCEEDED: a spent allocation or seconds of concurrency --------------------
async def test_a_limit_refusal_the_org_count_does_not_back_is_a_short_backoff(
    salesforce_emulator, connector, clock
):
    # Given a 403 "TotalRequests Limit exceeded." whose own header says 1 of 15000 calls used
    salesforce_emulator.fail_next(1, 403, match="/query")

    with pytest.raises(RetryableDelivery, match="REQUEST_LIMIT_EXCEEDED") as info:
        await connector.upsert_lead(lead("a@x.io"))

    # Then the connector backs off for seconds, not for an hour
    assert info.value.retry_after == 5
    (pause,) = connector.pauses()
    assert pause.kind == "concurrency"
    assert pause.until - time.time() == pytest.approx(5, abs=1)
    # and once they have passed, the record goes through
    clock.advance(5.1)
    assert (await connector.upsert_lead(lead("a@x.io"))).created is True
    assert connector.pauses() == []


async def test_concurrent_long_requests_back_off_seconds_doubling_while_they_repeat(
    salesforce_emulator, connector, clock
):
    salesforce_emulator.refuse_next_concurrent(2, match="/query")

    with pytest.raises(RetryableDelivery, match="ConcurrentPerOrgLongTxn") as first:
        await connector.upsert_lead(lead("a@x.io"))
    assert first.value.retry_after == 5
    # While held back, a delivery is answered without a call
    start = len(salesforce_emulator.calls)
    with pytest.raises(RetryableDelivery):
        await connector.upsert_lead(lead("b@x.io"))
    assert salesforce_emulator.data_calls(start) == []

    clock.advance(5.1)
    with pytest.raises(RetryableDelivery, match="ConcurrentPerOrgLongTxn") as second:
        await connector.upsert_lead(lead("a@x.io"))
    assert second.value.retry_after == 10
    (pause,) = connector.pauses()
    assert (pause.kind, "ConcurrentPerOrgLongTxn" in pause.reason) == ("concurrency", True)

    clock.advance(10.1)
    assert (await connector.upsert_lead(lead("a@x.io"))).created is True
    # A call got through: the next refusal starts again from the shortest backoff
    salesforce_emulator.refuse_next_concurrent(1, match="/query")
    with pytest.raises(RetryableDelivery) as third:
        await connector.upsert_lead(lead("c@x.io"))
    assert third.value.retry_after == 5


async def test_a_spent_daily_allocation_is_asked_about_again_not_sat_out_for_an_hour(
    salesforce_emulator, connector, clock
):
    # Given an org whose rolling 24-hour allocation is spent
    salesforce_emulator.api_used = salesforce_emulator.daily_max

    with pytest.raises(RetryableDelivery, match="TotalRequests") as info:
        await connector.upsert_lead(lead("a@x.io"))

    assert info.value.retry_after == 300  # daily_recheck_seconds, not 3600
    (pause,) = connector.pauses()
    assert pause.kind == "daily_allocation"
    assert "spent (15000 of 15000 requests used)" in pause.reason

    # When the pause is over and the allocation still spent: one /limits probe, no write
    clock.advance(301)
    start = len(salesforce_emulator.calls)
    with pytest.raises(RetryableDelivery) as again:
        await connector.upsert_lead(lead("a@x.io"))
    assert again.value.retry_after == 300
    assert salesforce_emulator.data_calls(start) == [f"GET {V}/limits/"]

    # When the rolling window has freed calls, the probe lets the write through
    salesforce_emulator.api_used = 9_000
    clock.advance(301)
    start = len(salesforce_emulator.calls)
    assert (await connector.upsert_lead(lead("a@x.io"))).created is True
    calls = salesforce_emulator.data_calls(start)
    assert calls[0] == f"GET {V}/limits/"
    assert calls[-1] == f"POST {V}/sobjects/Lead/"
    assert connector.pauses() == []


async def test_status_metrics_and_the_status_command_show_a_connector_holding_back(
    tmp_path, salesforce_emulator
):
    # Given a daemon whose Salesforce org has spent its daily allocation
    text = config_yaml(
        tmp_path / "bridge.db",
        salesforce=salesforce_settings(salesforce_emulator),
        rules="""
  - name: interested-to-salesforce
    when: contact.interest == 'interested'
    connector: salesforce
    action: upsert_lead
    fields:
      Title: "{{ contact.title }}"
""",
    )
    salesforce_emulator.api_used = salesforce_emulator.daily_max
    client = TestClient(TestServer(create_app(parse_config(text))))
    await client.start_server()
    try:
        # When a single delivery meets it
        _, body, _ = await post(client, sample())
        delivery = await delivery_of(
            client, body["event_id"], lambda d: d["status"] == "pending" and d["last_error"]
        )
        assert "REQUEST_LIMIT_EXCEEDED" in delivery["last_error"]

        # Then /status shows the pause, though the breaker stays closed
        live = (await (await client.get("/status")).json())["connectors"]["salesforce"]
        assert live["breaker"] == "closed"
        (pause,) = live["pauses"]
        assert pause["kind"] == "daily_allocation"
        assert "daily API allocation is spent" in pause["reason"]
        assert 250 < pause["seconds_left"] <= 300
        until = datetime.strptime(pause["until"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        assert until.timestamp() == pytest.approx(time.time() + pause["seconds_left"], abs=2)
        assert live["paused_for"] == pause["seconds_left"]

        # and the metrics, by kind of pause
        metrics = await (await client.get("/metrics")).text()
        paused = {
            s.labels["kind"]: s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
            if s.name == "crm_bridge_connector_paused_seconds"
            and s.labels["connector"] == "salesforce"
        }
        assert 250 < paused["daily_allocation"] <= 300
        assert paused["concurrency"] == paused["circuit_breaker"] == 0

        # and `crm-bridge status`, asking the running daemon
        config = parse_config(text.replace("port: 0", f"port: {client.server.port}"))
        store = open_store(config.store, exclusive=False)
        await store.open()
        try:
            report = await status.gather(store, config, time.time())
        finally:
            await store.close()
        shown = status.render(report, width=200)
        (line,) = [row for row in shown.splitlines() if row.startswith("paused")]
        assert line.split()[1:3] == ["salesforce", "daily_allocation"]
        assert line.split()[3] in ("4m", "5m")  # seconds left, read at a glance
        assert "daily API allocation is spent" in line
    finally:
        await client.close()


# -- the Email a rep typed ----------------------------------------------------------------
async def test_an_update_never_rewrites_the_email_a_rep_typed(salesforce_emulator, connector):
    typed = "Aisha.Nowak.1@Bluefern.Co"
    existing = seed_lead(salesforce_emulator, typed)
    other = seed_lead(salesforce_emulator, "Ben.Okafor@Bluefern.Co")

    single = await connector.upsert_lead(lead("aisha.nowak.1@bluefern.co", Title="CTO"))
    batch = await connector.upsert_leads(
        [lead("ben.okafor@bluefern.co"), lead("cleo.ito@bluefern.co")]
    )

    # The records are found in any case and keep the Email as typed
    assert (single.record_id, single.created) == (existing, False)
    assert salesforce_emulator.record(existing)["Email"] == typed
    assert salesforce_emulator.record(existing)["Title"] == "CTO"
    assert (batch[0].record_id, batch[0].created) == (other, False)
    assert salesforce_emulator.record(other)["Email"] == "Ben.Okafor@Bluefern.Co"
    # No update carries the Email; the new record is created with it
    updates = salesforce_emulator.calls_to("PATCH", "/sobjects")
    bodies = [c.json for c in updates if "/composite" not in c.path]
    bodies += [r for c in updates if "/composite" in c.path for r in c.json["records"]]
    assert bodies and all("Email" not in body for body in bodies)
    assert salesforce_emulator.record(batch[1].record_id)["Email"] == "cleo.ito@bluefern.co"


async def test_an_update_a_rule_maps_the_email_of_writes_it(salesforce_emulator, connector):
    existing = seed_lead(salesforce_emulator, "Ada@X.io")

    await connector.upsert_lead(lead("ada@x.io", Email="Ada.Lovelace@X.io"))

    assert salesforce_emulator.record(existing)["Email"] == "Ada.Lovelace@X.io"


async def test_an_update_with_every_field_held_back_sends_nothing(salesforce_emulator, connector):
    existing = seed_lead(salesforce_emulator, "Ada@X.io", Title="CEO")
    start = len(salesforce_emulator.calls)

    result = await connector.upsert_lead(
        LeadUpsert(
            object="lead",
            id_value="ada@x.io",
            fields={"Title": "CTO"},
            policies={"Title": WritePolicy(mode="if_empty")},
        )
    )

    assert (result.record_id, result.created, result.skipped) == (existing, False, None)
    assert result.detail["unchanged"] == "nothing left to write"
    assert result.detail["held_back"] == {"Title": "if_empty: the CRM holds 'CEO'"}
    # One call: the lookup, which read the current Title too; no update
    (lookup,) = salesforce_emulator.data_calls(start)
    assert lookup.startswith(f"GET {V}/query")
    assert salesforce_emulator.record(existing)["Title"] == "CEO"


async def test_an_update_only_write_finding_no_record_reports_it_missing(
    salesforce_emulator, connector
):
    status_update = lead("nobody@x.io", Status="Working - Contacted")
    status_update.create = False

    result = await connector.upsert_lead(status_update)

    assert result.missing is True
    assert result.skipped.startswith("no Lead with Email 'nobody@x.io' to update")
    assert salesforce_emulator.records("Lead") == []


# -- calls per record ------------------------------------------------------------------------
async def test_a_burst_of_upserts_and_their_activities_costs_four_calls(
    salesforce_emulator, connector
):
    # Given 10 contacts, 4 of them in the org with their email typed in another case
    existing = [seed_lead(salesforce_emulator, f"P{i}@X.io") for i in range(4)]
    start, used = len(salesforce_emulator.calls), salesforce_emulator.api_used

    # When their upserts go out, then their activities with the ids the upserts answered
    upserts = await connector.upsert_leads([lead(f"p{i}@x.io") for i in range(10)])
    logged = await connector.log_activities(
        [activity(f"p{i}@x.io", f"k{i}", record_id=upserts[i].record_id) for i in range(10)]
    )

    # Then 20 writes cost four calls: one lookup, one update, one create, one Task create
    assert salesforce_emulator.api_used - used == 4
    assert [c.split("?")[0] for c in salesforce_emulator.data_calls(start)] == [
        f"GET {V}/query/",
        f"PATCH {V}/composite/sobjects",
        f"POST {V}/composite/sobjects",
        f"POST {V}/composite/sobjects",
    ]
    assert [u.record_id for u in upserts[:4]] == existing
    assert all(isinstance(r, DeliveryResult) and r.created for r in logged)
    tasks = salesforce_emulator.records("Task")
    assert sorted(t["WhoId"] for t in tasks) == sorted(u.record_id for u in upserts)
    assert [r.detail["activity_id"] for r in logged] == [t["Id"] for t in tasks]


async def test_activities_without_ids_share_one_lookup_per_object(salesforce_emulator, connector):
    contact = salesforce_emulator.seed("Contact", {"LastName": "C", "Email": "Cleo@X.io"})
    open_lead = seed_lead(salesforce_emulator, "Lea@X.io")
    converted = seed_lead(salesforce_emulator, "Vic@X.io")
    its_contact = salesforce_emulator.convert_lead(converted)
    start = len(salesforce_emulator.calls)

    outcomes = await connector.log_activities(
        [
            activity("cleo@x.io", "k1", object="contact"),
            activity("lea@x.io", "k2"),
            activity("vic@x.io", "k3"),
            activity("nobody@x.io", "k4"),
        ]
    )

    assert [o.record_id for o in outcomes[:3]] == [contact, open_lead, its_contact]
    assert outcomes[3].missing is True
    assert outcomes[3].skipped.startswith("no Salesforce Lead with Email nobody@x.io")
    assert [c.split("?")[0] for c in salesforce_emulator.data_calls(start)] == [
        f"GET {V}/query/",  # Contacts
        f"GET {V}/query/",  # Leads
        f"POST {V}/composite/sobjects",
    ]
    assert sorted(t["WhoId"] for t in salesforce_emulator.records("Task")) == sorted(
        [contact, open_lead, its_contact]
    )


async def test_retried_activities_look_for_their_tasks_in_one_query(salesforce_emulator, connector):
    contacts = [
        salesforce_emulator.seed("Contact", {"LastName": "C", "Email": f"c{i}@x.io"})
        for i in range(3)
    ]
    # Given an earlier attempt that wrote the first Task before its answer was lost
    written = salesforce_emulator.seed(
        "Task", {"Subject": "Replied", "WhoId": contacts[0], "Description": "[crm-bridge:k0]"}
    )
    start = len(salesforce_emulator.calls)

    outcomes = await connector.log_activities(
        [
            activity(f"c{i}@x.io", f"k{i}", object="contact", record_id=contacts[i], attempt=2)
            for i in range(3)
        ]
    )

    assert (outcomes[0].created, outcomes[0].detail["activity_id"]) == (False, written)
    assert [o.created for o in outcomes[1:]] == [True, True]
    assert len(salesforce_emulator.records("Task")) == 3
    assert [c.split("?")[0] for c in salesforce_emulator.data_calls(start)] == [
        f"GET {V}/query/",
        f"POST {V}/composite/sobjects",
    ]


async def test_stale_ids_in_a_batch_fall_back_to_one_lookup(salesforce_emulator, connector):
    live = seed_lead(salesforce_emulator, "live@x.io")
    merged = seed_lead(salesforce_emulator, "m@x.io")
    survivor = seed_lead(salesforce_emulator, "M@X.io")
    salesforce_emulator.delete(merged)
    converted = seed_lead(salesforce_emulator, "conv@x.io")
    its_contact = salesforce_emulator.convert_lead(converted)
    start = len(salesforce_emulator.calls)

    outcomes = await connector.log_activities(
        [
            activity("live@x.io", "k1", record_id=live),
            activity("m@x.io", "k2", record_id=merged),
            activity("conv@x.io", "k3", record_id=converted),
        ]
    )

    assert [o.record_id for o in outcomes] == [live, survivor, its_contact]
    assert sorted(t["WhoId"] for t in salesforce_emulator.records("Task")) == sorted(
        [live, survivor, its_contact]
    )
    calls = salesforce_emulator.data_calls(start)
    assert [c.split("?")[0] for c in calls] == [
        f"POST {V}/composite/sobjects",
        f"GET {V}/query/",  # the two stale ids' emails, at once
        f"POST {V}/composite/sobjects",
    ]


# -- WhoIds on converted Leads -----------------------------------------------------------
def test_the_emulator_refuses_a_task_on_a_converted_lead(salesforce_emulator):
    lead_id = seed_lead(salesforce_emulator, "ada@x.io", FirstName="Ada")
    contact_id = salesforce_emulator.convert_lead(lead_id)
    session = requests.Session()
    session.verify, session.trust_env = salesforce_emulator.ca_path, False
    sf = Salesforce(
        session_id=salesforce_emulator.new_session(),
        instance=salesforce_emulator.instance,
        session=session,
    )

    with pytest.raises(SalesforceMalformedRequest) as info:
        sf.Task.create({"Subject": "Call", "WhoId": lead_id})

    assert info.value.content[0]["errorCode"] == "CANNOT_UPDATE_CONVERTED_LEAD"
    assert info.value.content[0]["message"] == "cannot reference converted lead"
    assert sf.Task.create({"Subject": "Call", "WhoId": contact_id})["success"] is True
    contact = salesforce_emulator.record(contact_id)
    assert (contact["FirstName"], contact["Email"]) == ("Ada", "ada@x.io")
    assert salesforce_emulator.record(lead_id)["ConvertedContactId"] == contact_id


async def test_an_activity_on_a_converted_lead_lands_on_its_contact(salesforce_emulator, connector):
    lead_id = seed_lead(salesforce_emulator, "ada@x.io")
    contact_id = salesforce_emulator.convert_lead(lead_id)

    result = await connector.log_activity(activity("ada@x.io", "k1", record_id=lead_id))

    assert (result.record_id, result.created) == (contact_id, True)
    assert [t["WhoId"] for t in salesforce_emulator.records("Task")] == [contact_id]


# -- set-up problems ----------------------------------------------------------------------
async def test_an_object_the_org_hides_pauses_the_connector_not_each_record(
    salesforce_emulator, salesforce_of
):
    connector = await salesforce_of()
    # Given a user who cannot see Leads (no licence, no permission set)
    salesforce_emulator.remove_sobject("Lead")

    with pytest.raises(Misconfigured, match="no Lead object") as info:
        await connector.upsert_leads([lead("a@x.io"), lead("b@x.io")])

    # The delivery engine pauses the connector on it, keeping the deliveries queued
    assert isinstance(info.value, ConnectorUnusable)
    assert "404 NOT_FOUND" in str(info.value)
