"""The stores, SQLite and PostgreSQL, by one suite: atomic ingest, de-duplication, ordered claims,
leases, the DLQ; then what only one of them does (SQLite's lock file, PostgreSQL's instances)."""

import asyncio
import os
import stat

import pytest

from bridge.errors import StoreUnavailable
from bridge.models import DeliveryStatus, Finish, NewDelivery, NewEvent, Routed
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SqliteStore
from connectors.base import LeadUpsert
from tests.postgres import BACKENDS


def new_event(key: str, email: str | None = "a@example.com", sort_at: float = 1000.0) -> NewEvent:
    return NewEvent(
        id=key,
        source="s",
        type="reply",
        email=email,
        received_at=1000.0,
        sort_at=sort_at,
        body="{}",
    )


async def add(store, deliveries, key, sort_at=1000.0):
    """Store an event and, as the router would, its deliveries."""
    result = await store.ingest(new_event(key, sort_at=sort_at))
    ids = []
    if not result.duplicate:
        ids = await store.route(
            [Routed(event_id=key, sort_at=sort_at, deliveries=deliveries)], now=1000.0
        )
    return result, ids


def done(ids, claim=1, **kw):
    """Delivered, under the claim that made `attempts` equal to `claim`."""
    return Finish(
        delivery_ids=ids,
        claims=[claim] * len(ids),
        status=DeliveryStatus.DONE,
        result={"record_id": "1"},
        **kw,
    )


def new_delivery(email: str = "a@example.com", connector: str = "hubspot") -> NewDelivery:
    return NewDelivery(
        rule="r",
        connector=connector,
        action="upsert_lead",
        contact_key=email,
        operation=LeadUpsert(id_value=email, fields={"x": 1}),
    )


@pytest.fixture(params=BACKENDS)
async def store(request, tmp_path):
    if request.param == "postgres":
        s = PostgresStore(request.getfixturevalue("pg_url"), pool_min=1, pool_max=4)
    else:
        s = SqliteStore(tmp_path / "bridge.db")
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def sqlite_store(tmp_path):
    s = SqliteStore(tmp_path / "bridge.db")
    await s.open()
    yield s
    await s.close()


async def test_an_event_and_its_deliveries_are_stored_together(store):
    result, ids = await add(store, [new_delivery(), new_delivery(connector="sf")], "k1")
    assert not result.duplicate and len(ids) == 2
    stored = await store.event(result.event_id)
    assert [d["connector"] for d in stored["deliveries"]] == ["hubspot", "sf"]
    assert {d["status"] for d in stored["deliveries"]} == {"pending"}


async def test_a_resent_event_is_recognised_and_adds_no_delivery(store):
    first, _ = await add(store, [new_delivery()], "k1")
    again, ids = await add(store, [new_delivery()], "k1")
    assert again.duplicate and again.event_id == first.event_id and ids == []
    assert await store.counts() == {"hubspot": {"pending": 1}}


async def test_concurrent_ingests_commit_together_and_each_gets_its_answer(store):
    # The same payload twice inside one commit group: the first is new, the second a duplicate.
    events = [new_event(f"k{i}") for i in range(200)] + [new_event("k7")]
    results = await asyncio.gather(*(store.ingest(e) for e in events))
    assert [r.event_id for r in results] == [e.id for e in events]
    assert [r.duplicate for r in results] == [False] * 200 + [True]
    assert len(await store.unrouted(1000)) == 200


async def test_routing_stores_deliveries_and_marks_the_event_in_one_go(store):
    await store.ingest(new_event("k1"))
    assert [e.id for e in await store.unrouted(10)] == ["k1"]
    routed = Routed(event_id="k1", sort_at=1000.0, deliveries=[new_delivery()], notes=["n"])
    (delivery_id,) = await store.route([routed], now=1500.0, delay=30.0)
    assert await store.unrouted(10) == []
    stored = await store.event("k1")
    assert stored["notes"] == ["n"] and stored["routed_at"] == 1500.0
    assert [(d["id"], d["next_attempt_at"]) for d in stored["deliveries"]] == [
        (delivery_id, 1530.0)
    ]


async def test_claims_follow_each_contacts_order(store):
    for i in range(3):
        await add(store, [new_delivery("a@x.io")], f"a{i}")
    await add(store, [new_delivery("b@x.io")], "b")
    groups = await store.claim("hubspot", 10, now=2000.0, lease_seconds=60)
    # Only the head of each contact's queue: a@'s second write waits for its first.
    claimed = [g.head for g in groups]
    assert [len(g.deliveries) for g in groups] == [1, 1]
    assert [d.contact_key for d in claimed] == ["a@x.io", "b@x.io"]
    assert all(d.status == "in_flight" and d.attempts == 1 for d in claimed)
    assert await store.claim("hubspot", 10, now=2000.0, lease_seconds=60) == []
    await store.finish([done([claimed[0].id])], now=2001.0)
    (nxt,) = await store.claim("hubspot", 10, now=2001.0, lease_seconds=60)
    assert nxt.head.contact_key == "a@x.io" and nxt.head.id > claimed[0].id


async def test_order_is_the_contacts_updated_at_not_arrival(store):
    # The platform resent an older state after a newer one.
    await add(store, [new_delivery("a@x.io")], "new", sort_at=2000.0)
    await add(store, [new_delivery("a@x.io")], "old", sort_at=1000.0)
    (group,) = await store.claim("hubspot", 10, now=3000.0, lease_seconds=60)
    assert group.head.sort_at == 1000.0


async def test_a_queued_burst_is_claimed_as_one_group_with_what_the_crm_has(store):
    for i in range(3):
        await add(store, [new_delivery("a@x.io")], f"a{i}", sort_at=1000.0 + i)
    (group,) = await store.claim("hubspot", 10, now=3000.0, lease_seconds=60, coalesce=10)
    assert [d.sort_at for d in group.deliveries] == [1000.0, 1001.0, 1002.0]
    assert (group.record_id, group.applied_sort_at) == (None, None)
    await store.finish(
        [
            done(
                group.ids,
                connector="hubspot",
                contact_key="a@x.io",
                record_id="R1",
                applied_sort_at=1002.0,
            )
        ],
        now=3001.0,
    )
    await add(store, [new_delivery("a@x.io")], "late", sort_at=1001.5)
    (later,) = await store.claim("hubspot", 10, now=3002.0, lease_seconds=60, coalesce=10)
    assert (later.record_id, later.applied_sort_at) == ("R1", 1002.0)


async def test_a_contact_with_a_delivery_in_flight_gets_no_second_claim(store):
    await add(store, [new_delivery("a@x.io")], "new", sort_at=2000.0)
    (first,) = await store.claim("hubspot", 10, now=3000.0, lease_seconds=60)
    assert first.head.status == "in_flight"
    await add(store, [new_delivery("a@x.io")], "old", sort_at=1000.0)
    assert await store.claim("hubspot", 10, now=3000.0, lease_seconds=60) == []


async def test_a_rescheduled_delivery_is_not_claimed_before_it_is_due(store):
    await add(store, [new_delivery()], "k")
    (group,) = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    retry = Finish.of(
        group.deliveries, status=DeliveryStatus.PENDING, error="503", next_attempt_at=2100.0
    )
    await store.finish([retry], now=2000.0)
    assert await store.claim("hubspot", 1, now=2099.0, lease_seconds=60) == []
    (group,) = await store.claim("hubspot", 1, now=2100.0, lease_seconds=60)
    again = group.head
    assert again.attempts == 2 and again.last_error == "503"


async def test_an_expired_lease_makes_a_delivery_claimable_again(store):
    await add(store, [new_delivery()], "k")
    await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    assert await store.claim("hubspot", 1, now=2059.0, lease_seconds=60) == []
    assert len(await store.claim("hubspot", 1, now=2061.0, lease_seconds=60)) == 1


async def test_deliveries_in_flight_at_a_crash_are_resumed_on_reopen(tmp_path):
    path = tmp_path / "bridge.db"
    first = SqliteStore(path)
    await first.open()
    await add(first, [new_delivery()], "k")
    await first.claim("hubspot", 1, now=2000.0, lease_seconds=3600)
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        (group,) = await second.claim("hubspot", 1, now=2001.0, lease_seconds=60)
        assert group.head.attempts == 2
    finally:
        await second.close()


async def test_a_second_daemon_cannot_open_the_same_file(sqlite_store):
    other = SqliteStore(sqlite_store.path)
    with pytest.raises(StoreUnavailable, match="in use by another crm-bridge process"):
        await other.open()


async def test_the_store_file_is_private(sqlite_store):
    mode = stat.S_IMODE(os.stat(sqlite_store.path).st_mode)
    assert mode == 0o600


async def test_a_failing_call_rolls_back_alone(sqlite_store):
    store = sqlite_store

    async def bad():
        return await store._run(lambda conn: conn.execute("INSERT INTO nowhere VALUES (1)"))

    results = await asyncio.gather(
        add(store, [new_delivery()], "k1"),
        bad(),
        add(store, [new_delivery("b@x.io")], "k2"),
        return_exceptions=True,
    )
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert isinstance(results[1], Exception)
    assert await store.counts() == {"hubspot": {"pending": 2}}


async def test_dead_letters_can_be_listed_retried_and_purged(store):
    await add(store, [new_delivery("a@x.io"), new_delivery("b@x.io")], "k1")
    groups = await store.claim("hubspot", 10, now=2000.0, lease_seconds=60)
    dead = Finish.of(
        [g.head for g in groups],
        status=DeliveryStatus.DEAD,
        error="HubSpot 400: bad",
    )
    await store.finish([dead], now=2000.0)
    listed = await store.dead_letters()
    assert [(d["contact_key"], d["last_error"]) for d in listed] == [
        ("a@x.io", "HubSpot 400: bad"),
        ("b@x.io", "HubSpot 400: bad"),
    ]
    assert await store.retry_dead(listed[0]["id"], now=5000.0) == 1
    (group,) = await store.claim("hubspot", 10, now=5000.0, lease_seconds=60)
    assert group.head.horizon_start == 5000.0  # a fresh horizon
    assert await store.purge_dead(before=1999.0) == 0
    assert await store.purge_dead(before=2001.0) == 1
    assert await store.dead_letters() == []


async def test_routing_an_event_forgotten_meanwhile_stores_nothing_for_it(store):
    await store.ingest(new_event("k1", email="gone@example.com"))
    await store.ingest(new_event("k2", email="kept@example.com"))
    (first, second) = await store.unrouted(10)
    # `crm-bridge forget` runs beside the daemon, between the router's read and its write.
    assert await store.forget("gone@example.com") == (1, 0)

    ids = await store.route(
        [
            Routed(event_id=e.id, sort_at=e.sort_at, deliveries=[new_delivery(email)])
            for e, email in ((first, "gone@example.com"), (second, "kept@example.com"))
        ],
        now=1000.0,
    )

    assert len(ids) == 1
    assert await store.event("k1") is None
    assert [d["contact_key"] for d in (await store.event("k2"))["deliveries"]] == [
        "kept@example.com"
    ]


async def test_a_late_finish_under_an_expired_claim_changes_nothing(store):
    # Given instance A's claim, whose lease ran out while its call waited, and B's claim since
    await add(store, [new_delivery("a@x.io")], "k")
    (a,) = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    (b,) = await store.claim("hubspot", 1, now=2061.0, lease_seconds=60)
    assert (a.ids, a.head.attempts, b.head.attempts) == (b.ids, 1, 2)

    # When A's outcome arrives late (it sent too), with what the CRM held for it
    late = done(
        a.ids,
        claim=1,
        connector="hubspot",
        contact_key="a@x.io",
        record_id="A",
        applied_sort_at=1000.0,
    )
    assert await store.finish([late], now=2062.0) == set()

    # Then B's row is untouched: still in flight under B's lease, claimable by nobody else
    row = await store.delivery(a.head.id)
    assert (row["status"], row["attempts"], row["lease_until"]) == ("in_flight", 2, 2121.0)
    assert await store.claim("hubspot", 1, now=2062.0, lease_seconds=60) == []
    await add(store, [new_delivery("a@x.io")], "next", sort_at=2000.0)
    # and B's own outcome is recorded, with the contact's state
    mine = done(
        b.ids,
        claim=2,
        connector="hubspot",
        contact_key="a@x.io",
        record_id="B",
        applied_sort_at=1000.0,
    )
    assert await store.finish([mine], now=2063.0) == set(b.ids)
    (nxt,) = await store.claim("hubspot", 1, now=2064.0, lease_seconds=60)
    assert nxt.head.id != b.head.id and nxt.record_id == "B"


async def test_a_finish_applies_only_to_deliveries_still_in_flight(store):
    await add(store, [new_delivery("a@x.io")], "k")
    (group,) = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    assert await store.finish([done(group.ids)], now=2001.0) == set(group.ids)
    # The same outcome again (a repeated finish) does not rewrite a finished row
    again = Finish.of(group.deliveries, status=DeliveryStatus.DEAD, error="late")
    assert await store.finish([again], now=2002.0) == set()
    assert (await store.delivery(group.head.id))["status"] == "done"


async def test_a_delivery_in_flight_during_forget_does_not_bring_the_contact_back(store):
    # Given a delivery of a@x.io in flight when `crm-bridge forget a@example.com` runs
    await store.ingest(new_event("k", email="a@x.io"))
    await store.route(
        [Routed(event_id="k", sort_at=1000.0, deliveries=[new_delivery("a@x.io")])], now=1000.0
    )
    (group,) = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    assert await store.forget("a@x.io") == (1, 1)

    # When its outcome arrives, with what the CRM now holds for the contact
    finish = done(
        group.ids, connector="hubspot", contact_key="a@x.io", record_id="R1", applied_sort_at=1000.0
    )
    assert await store.finish([finish], now=2001.0) == set()

    # Then nothing of the contact is stored again: a new delivery knows no record id
    await store.ingest(new_event("later", email="a@x.io"))
    await store.route(
        [Routed(event_id="later", sort_at=900.0, deliveries=[new_delivery("a@x.io")])], now=2002.0
    )
    (fresh,) = await store.claim("hubspot", 1, now=2003.0, lease_seconds=60)
    assert (fresh.record_id, fresh.applied_sort_at) == (None, None)
