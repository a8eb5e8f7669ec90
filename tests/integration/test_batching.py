"""Batched upserts and client-side rate limits, through the real SDKs against the emulators.

`upsert_leads` answers one outcome per input, in input order: a DeliveryResult, or the
RetryableDelivery/PermanentDelivery of that record alone. Rate-limit tests share one
ManualClock between the emulator and the connector's limiter, whose sleep moves that clock:
windows pass without anyone waiting.
"""

from __future__ import annotations

import asyncio

import pytest
import requests

from bridge.errors import PermanentDelivery, RetryableDelivery
from bridge.ratelimit import RateLimiter
from connectors.base import DeliveryResult, LeadUpsert
from connectors.hubspot import HubSpotConfig, HubSpotConnector
from tests.emulators import HubSpotEmulator, ManualClock
from tests.emulators.runner import Reply

UPSERT = "/crm/v3/objects/contacts/batch/upsert"


# -- fixtures ----------------------------------------------------------------------------------
@pytest.fixture
def clock():
    return ManualClock()


@pytest.fixture
def small_portal(clock):
    """A HubSpot portal allowing 10 requests per 10 s, on the test's clock."""
    emulator = HubSpotEmulator(tier_max=10, clock=clock)
    with emulator:
        yield emulator
    assert not emulator.errors, emulator.errors


def on_clock(connector: HubSpotConnector, clock: ManualClock) -> RateLimiter:
    """Give the connector's limiter the emulator's clock, with a sleep that only moves it."""

    async def sleep(seconds: float) -> None:
        clock.advance(seconds)
        await asyncio.sleep(0)

    old = connector.limiter
    connector.limiter = RateLimiter(old.requests, old.per_seconds, clock=clock, sleep=sleep)
    return connector.limiter


def contact(email: str, **fields) -> LeadUpsert:
    return LeadUpsert(object="contact", id_value=email, fields=fields or {"firstname": "Ada"})


def lead(email: str, record_id: str | None = None, **fields) -> LeadUpsert:
    return LeadUpsert(
        object="lead", id_value=email, fields=fields or {"FirstName": "Ada"}, record_id=record_id
    )


def statuses(emulator, path: str) -> list[int | None]:
    return [c.status for c in emulator.calls_to(path_contains=path)]


# -- HubSpot: batches --------------------------------------------------------------------------
async def test_hubspot_sends_250_contacts_in_three_batches(hubspot_emulator, hubspot_of):
    existing = {
        f"c{i}@example.com": hubspot_emulator.add_contact({"email": f"c{i}@example.com"}).id
        for i in range(0, 250, 5)
    }
    hubspot_emulator.reverse_batch_results = True  # HubSpot does not promise input order
    connector = await hubspot_of()
    # Mixed case: HubSpot lower-cases emails, the outcome must still find its input.
    leads = [contact(f"C{i}@Example.com" if i % 2 else f"c{i}@example.com") for i in range(250)]

    outcomes = await connector.upsert_leads(leads)

    assert [len(c.json["inputs"]) for c in hubspot_emulator.calls_to("POST", UPSERT)] == [
        100,
        100,
        50,
    ]
    assert all(isinstance(o, DeliveryResult) for o in outcomes)
    for i, outcome in enumerate(outcomes):
        email = f"c{i}@example.com"
        assert outcome.created is (email not in existing), email
        record = hubspot_emulator.contact_by_email(email)
        assert record is not None and outcome.record_id == record.id
        if email in existing:
            assert outcome.record_id == existing[email]
    assert len(hubspot_emulator.contacts) == 250


async def test_hubspot_sends_a_contact_named_twice_once(hubspot_emulator, hubspot_of):
    connector = await hubspot_of()
    outcomes = await connector.upsert_leads(
        [
            contact("ada@example.com", firstname="Ada"),
            contact("bob@example.com"),
            contact("ADA@example.com", lastname="Lovelace"),
        ]
    )
    (call,) = hubspot_emulator.calls_to("POST", UPSERT)
    assert [i["id"] for i in call.json["inputs"]] == ["ada@example.com", "bob@example.com"]
    assert outcomes[0] == outcomes[2] and outcomes[0].created is True
    record = hubspot_emulator.contact_by_email("ada@example.com")
    assert (record.properties["firstname"], record.properties["lastname"]) == ("Ada", "Lovelace")


async def test_hubspot_one_invalid_property_fails_alone(hubspot_emulator, hubspot_of):
    # HubSpot refuses the whole batch with 400 for one bad input; the connector finds it.
    # HubSpot's own refusals: the connector's property checks are off.
    connector = await hubspot_of(validate_properties=False)
    leads = [contact(f"p{i}@example.com") for i in range(50)]
    leads[17] = contact("p17@example.com", no_such_property="x")

    outcomes = await connector.upsert_leads(leads)

    bad = outcomes[17]
    assert isinstance(bad, PermanentDelivery)
    assert "no_such_property" in str(bad) and "does not exist" in str(bad)
    assert all(isinstance(o, DeliveryResult) for i, o in enumerate(outcomes) if i != 17)
    assert hubspot_emulator.contact_by_email("p17@example.com") is None
    assert len(hubspot_emulator.contacts) == 49
    # the refused batch, the 49 without the blamed property, the suspect alone
    assert statuses(hubspot_emulator, UPSERT) == [400, 200, 400]


async def test_hubspot_bisects_when_every_input_carries_the_blamed_property(
    hubspot_emulator, hubspot_of
):
    # HubSpot's own refusals: the connector's property checks are off.
    connector = await hubspot_of(validate_properties=False)
    leads = [contact(f"s{i}@example.com", hs_lead_status="NEW") for i in range(64)]
    leads[40] = contact("s40@example.com", hs_lead_status="NOT_A_STATUS")

    outcomes = await connector.upsert_leads(leads)

    assert isinstance(outcomes[40], PermanentDelivery)
    assert "NOT_A_STATUS was not one of the allowed options" in str(outcomes[40])
    assert sum(isinstance(o, DeliveryResult) for o in outcomes) == 63
    assert len(hubspot_emulator.contacts) == 63
    assert len(hubspot_emulator.calls_to("POST", UPSERT)) <= 2 * 6 + 1  # log2(64) levels


async def test_hubspot_207_errors_fail_only_the_records_they_name(hubspot_emulator, hubspot_of):
    known = hubspot_emulator.add_contact({"email": "known@example.com"}).id
    connector = await hubspot_of()
    by_id = [
        LeadUpsert(id_property="hs_object_id", id_value=known, fields={"firstname": "Kay"}),
        LeadUpsert(id_property="hs_object_id", id_value="999999", fields={"firstname": "No"}),
    ]

    ok, missing = await connector.upsert_leads(by_id)

    assert statuses(hubspot_emulator, UPSERT) == [207]
    assert isinstance(ok, DeliveryResult) and (ok.record_id, ok.created) == (known, False)
    assert isinstance(missing, PermanentDelivery)
    assert "Could not find object with id 999999" in str(missing)


async def test_hubspot_a_later_call_failing_fails_only_the_records_left(
    hubspot_emulator, hubspot_of
):
    # HubSpot's own refusals: the connector's property checks are off.
    connector = await hubspot_of(validate_properties=False)
    leads = [contact(f"l{i}@example.com") for i in range(5)]
    leads[2] = contact("l2@example.com", no_such_property="x")
    # The call that retries the suspect alone meets a bad gateway.
    page = "<html><body>502 Bad Gateway</body></html>"
    hubspot_emulator.add_rule(
        lambda call: call.json is not None and len(call.json.get("inputs", [])) == 1,
        1,
        Reply(502, page, {}, "text/html"),
    )

    outcomes = await connector.upsert_leads(leads)

    assert isinstance(outcomes[2], RetryableDelivery) and "502" in str(outcomes[2])
    assert all(isinstance(o, DeliveryResult) for i, o in enumerate(outcomes) if i != 2)


# -- HubSpot: rate limits ----------------------------------------------------------------------
def test_hubspot_limit_follows_the_tier_and_share():
    def requests_for(**settings) -> int:
        config = HubSpotConfig.model_validate({"type": "hubspot", **settings})
        return HubSpotConnector("h", config).limiter.requests

    assert requests_for() == 80  # free tier, 80% of 100 per 10 s
    assert requests_for(tier="professional") == 152
    assert requests_for(tier="api_pack", rate_limit_share=1) == 250
    assert requests_for(tier="enterprise", rate_limit_requests=10) == 8


async def test_hubspot_stays_under_the_portal_limit(small_portal, clock, hubspot_of):
    connector = await hubspot_of(small_portal, rate_limit_requests=10)  # 8 per 10 s for us
    limiter = on_clock(connector, clock)
    start = clock()

    for i in range(30):
        await connector.upsert_lead(contact(f"r{i}@example.com"))

    assert statuses(small_portal, UPSERT) == [200] * 30  # never a 429
    assert limiter.waited_seconds > 0
    assert clock() - start >= 30  # 30 calls at 8 per 10 s take three windows more


async def test_hubspot_slows_down_when_the_headers_show_others_spent_the_window(
    small_portal, clock, hubspot_of
):
    connector = await hubspot_of(small_portal, rate_limit_requests=10)
    limiter = on_clock(connector, clock)
    # Another script with the same app token spends 6 of the portal's 10.
    auth = {"Authorization": "Bearer pat-na1-test"}

    def spend() -> None:
        for _ in range(6):
            url = f"{small_portal.url}/crm/v3/properties/contacts/email"
            requests.get(url, headers=auth, timeout=2).raise_for_status()

    await asyncio.to_thread(spend)

    for i in range(8):  # our own budget alone would let all 8 through at once
        await connector.upsert_lead(contact(f"o{i}@example.com"))

    assert statuses(small_portal, UPSERT) == [200] * 8
    assert limiter.waited_seconds >= 10


@pytest.mark.parametrize(("retry_after", "expected"), [("7", 7.0), (None, 10.0)])
async def test_hubspot_429_pauses_the_limiter_for_what_hubspot_asked(
    small_portal, clock, hubspot_of, retry_after, expected
):
    connector = await hubspot_of(small_portal, rate_limit_requests=10)
    limiter = on_clock(connector, clock)
    small_portal.fail_next_rate_limited(
        1, retry_after=float(retry_after) if retry_after else None, match=UPSERT
    )

    with pytest.raises(RetryableDelivery) as info:
        await connector.upsert_leads([contact("ada@example.com"), contact("bob@example.com")])

    # Without Retry-After: the rest of the rolling window, which is the whole window.
    assert info.value.retry_after == expected
    assert limiter.paused_for() == pytest.approx(expected)
    # the next call waits out the pause, then goes through
    assert (await connector.upsert_lead(contact("ada@example.com"))).created is True
    assert limiter.waited_seconds == pytest.approx(expected)


async def test_hubspot_daily_limit_stops_calling_for_an_hour(small_portal, clock, hubspot_of):
    connector = await hubspot_of(small_portal)
    limiter = on_clock(connector, clock)
    small_portal.daily_used = small_portal.daily

    with pytest.raises(RetryableDelivery, match="daily") as info:
        await connector.upsert_lead(contact("ada@example.com"))
    assert info.value.retry_after == 3600
    assert limiter.paused_for() == pytest.approx(3600)

    calls = len(small_portal.calls)
    with pytest.raises(RetryableDelivery) as info:
        await connector.upsert_lead(contact("bob@example.com"))
    assert info.value.retry_after == pytest.approx(3600)
    assert len(small_portal.calls) == calls  # answered without calling


# -- Salesforce: batches -----------------------------------------------------------------------
async def test_salesforce_sends_250_leads_in_two_collection_rounds(salesforce_emulator, salesforce):
    existing = {
        f"l{i}@example.com": salesforce_emulator.seed(
            "Lead", {"LastName": f"L{i}", "Company": "Acme", "Email": f"L{i}@Example.com"}
        )
        for i in range(0, 250, 4)
    }
    leads = [lead(f"l{i}@example.com", Title=f"T{i}") for i in range(250)]

    outcomes = await salesforce.upsert_leads(leads)

    assert [len(c.json["records"]) for c in salesforce_emulator.calls_to("PATCH", "composite")] == [
        50,
        13,
    ]
    assert [len(c.json["records"]) for c in salesforce_emulator.calls_to("POST", "composite")] == [
        150,
        37,
    ]
    assert len(salesforce_emulator.calls_to("GET", "/query")) == 2
    for i, outcome in enumerate(outcomes):
        email = f"l{i}@example.com"
        assert isinstance(outcome, DeliveryResult)
        assert outcome.created is (email not in existing)
        if email in existing:
            assert outcome.record_id == existing[email]
        assert salesforce_emulator.record(outcome.record_id)["Title"] == f"T{i}"
    assert len(salesforce_emulator.records("Lead")) == 250


async def test_salesforce_updates_the_oldest_lead_with_the_email(salesforce_emulator, salesforce):
    oldest = salesforce_emulator.seed("Lead", {"LastName": "A", "Company": "X", "Email": "d@x.io"})
    salesforce_emulator.seed("Lead", {"LastName": "B", "Company": "X", "Email": "D@x.io"})

    first, second = await salesforce.upsert_leads([lead("d@x.io"), lead("new@x.io")])

    assert (first.record_id, first.created) == (oldest, False)
    assert second.created is True


async def test_salesforce_one_invalid_record_fails_alone(salesforce_emulator, salesforce_of):
    # Salesforce's own per-record errors: the connector's describe checks are off.
    salesforce = await salesforce_of(validate_fields=False)
    existing = salesforce_emulator.seed(
        "Lead", {"LastName": "E", "Company": "X", "Email": "e1@x.io"}
    )
    leads = [lead(f"e{i}@x.io") for i in range(6)]
    leads[1] = lead("e1@x.io", Status="Bogus")  # an update
    leads[4] = lead("e4@x.io", NoSuchField="x")  # a create

    outcomes = await salesforce.upsert_leads(leads)

    assert isinstance(outcomes[1], PermanentDelivery)
    assert "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST" in str(outcomes[1])
    assert "bad value for restricted picklist field: Bogus" in str(outcomes[1])
    assert isinstance(outcomes[4], PermanentDelivery)
    assert "INVALID_FIELD" in str(outcomes[4]) and "NoSuchField" in str(outcomes[4])
    assert [o.created for i, o in enumerate(outcomes) if i not in (1, 4)] == [True] * 4
    assert salesforce_emulator.record(existing)["Status"] == "Open - Not Contacted"
    assert len(salesforce_emulator.records("Lead")) == 5


async def test_salesforce_a_locked_row_is_retryable_for_that_record_only(
    salesforce_emulator, salesforce
):
    ids = [
        salesforce_emulator.seed("Lead", {"LastName": "K", "Company": "X", "Email": f"k{i}@x.io"})
        for i in range(3)
    ]
    salesforce_emulator.lock_records(ids[1])

    outcomes = await salesforce.upsert_leads([lead(f"k{i}@x.io", Title="CTO") for i in range(3)])

    assert isinstance(outcomes[1], RetryableDelivery)
    assert "UNABLE_TO_LOCK_ROW" in str(outcomes[1])
    assert [(o.record_id, o.created) for o in (outcomes[0], outcomes[2])] == [
        (ids[0], False),
        (ids[2], False),
    ]
    assert [salesforce_emulator.record(i).get("Title") for i in ids] == ["CTO", None, "CTO"]
    # sent again, the record lands
    assert (await salesforce.upsert_lead(lead("k1@x.io", Title="CTO"))).record_id == ids[1]


async def test_salesforce_record_id_hints_skip_the_lookup(salesforce_emulator, salesforce):
    ids = [
        salesforce_emulator.seed("Lead", {"LastName": "H", "Company": "X", "Email": f"h{i}@x.io"})
        for i in range(3)
    ]

    outcomes = await salesforce.upsert_leads(
        [lead(f"h{i}@x.io", record_id=ids[i], Title="VP") for i in range(3)]
    )

    assert salesforce_emulator.calls_to("GET", "/query") == []
    assert [(o.record_id, o.created) for o in outcomes] == [(i, False) for i in ids]
    assert [salesforce_emulator.record(i)["Title"] for i in ids] == ["VP"] * 3


async def test_salesforce_a_stale_hint_falls_back_to_the_email(salesforce_emulator, salesforce):
    gone = salesforce_emulator.seed("Lead", {"LastName": "G", "Company": "X", "Email": "g@x.io"})
    merged = salesforce_emulator.seed("Lead", {"LastName": "M", "Company": "X", "Email": "m@x.io"})
    survivor = salesforce_emulator.seed(
        "Lead", {"LastName": "M", "Company": "X", "Email": "m@x.io"}
    )
    fresh = salesforce_emulator.seed("Lead", {"LastName": "F", "Company": "X", "Email": "f@x.io"})
    salesforce_emulator.delete(gone)  # deleted in the CRM: nothing has the email now
    salesforce_emulator.delete(merged)  # merged away: another lead has the email

    outcomes = await salesforce.upsert_leads(
        [
            lead("g@x.io", record_id=gone),
            lead("m@x.io", record_id=merged),
            lead("f@x.io", record_id=fresh),
        ]
    )

    recreated, updated, hinted = outcomes
    assert recreated.created is True and recreated.record_id not in (gone, merged)
    assert (updated.record_id, updated.created) == (survivor, False)
    assert (hinted.record_id, hinted.created) == (fresh, False)
    (lookup,) = salesforce_emulator.calls_to("GET", "/query")
    assert "f@x.io" not in lookup.param("q")  # only the stale hints were looked up

    # a single record takes the single-record route: 404 ENTITY_IS_DELETED, then the lookup
    salesforce_emulator.delete(recreated.record_id)
    again = await salesforce.upsert_lead(lead("g@x.io", record_id=recreated.record_id))
    assert again.created is True and again.record_id != recreated.record_id


async def test_salesforce_external_ids_upsert_in_one_collection(salesforce_emulator, salesforce):
    salesforce_emulator.add_field("Lead", "Ext__c", external_id=True)
    known = salesforce_emulator.seed(
        "Lead", {"LastName": "X", "Company": "X", "Email": "x@x.io", "Ext__c": "E-1"}
    )
    leads = [
        LeadUpsert(
            id_property="Ext__c",
            id_value=f"E-{i}",
            fields={"LastName": f"N{i}", "Company": "Acme"},
        )
        for i in range(1, 4)
    ]

    outcomes = await salesforce.upsert_leads(leads)

    (call,) = salesforce_emulator.calls_to("PATCH", "/composite/sobjects/Lead/Ext__c")
    assert len(call.json["records"]) == 3
    assert [o.created for o in outcomes] == [False, True, True]
    assert outcomes[0].record_id == known


async def test_salesforce_logs_in_again_once_within_a_batch(salesforce_emulator, salesforce):
    salesforce_emulator.expire_sessions()
    outcomes = await salesforce.upsert_leads([lead("a@x.io"), lead("b@x.io")])
    assert [o.created for o in outcomes] == [True, True]
    assert salesforce_emulator.logins == 2


# -- Salesforce: daily allocation --------------------------------------------------------------
async def test_salesforce_near_its_daily_cap_stops_without_calling(salesforce_emulator, salesforce):
    # 90% of 15,000 is 13,500: the lookup's answer (after the describe's) says the org
    # reached it.
    salesforce_emulator.api_used = 13_498

    with pytest.raises(RetryableDelivery, match="daily API requests") as info:
        await salesforce.upsert_leads([lead("a@x.io"), lead("b@x.io")])

    # Until it looks again (`daily_recheck_seconds`), not for a blind hour
    assert info.value.retry_after == 300
    assert salesforce.api_usage == (13_500, 15_000)
    assert salesforce_emulator.calls_to(path_contains="composite") == []
    calls = len(salesforce_emulator.calls)
    with pytest.raises(RetryableDelivery) as info:
        await salesforce.upsert_lead(lead("c@x.io"))
    assert info.value.retry_after == pytest.approx(300, abs=1)
    assert len(salesforce_emulator.calls) == calls


async def test_salesforce_daily_limit_exceeded_stops_until_the_recheck(
    salesforce_emulator, salesforce
):
    salesforce_emulator.api_used = salesforce_emulator.daily_max

    with pytest.raises(RetryableDelivery, match="REQUEST_LIMIT_EXCEEDED") as info:
        await salesforce.upsert_lead(lead("a@x.io"))
    assert info.value.retry_after == 300

    calls = len(salesforce_emulator.calls)
    with pytest.raises(RetryableDelivery):
        await salesforce.upsert_lead(lead("b@x.io"))
    assert len(salesforce_emulator.calls) == calls
