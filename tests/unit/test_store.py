"""The SQLite store: atomic ingest, de-duplication, ordered claims, durability across reopen."""

import asyncio
import os
import stat

import pytest

from bridge.errors import StoreUnavailable
from bridge.models import NewDelivery, NewEvent
from bridge.store.sqlite import SqliteStore
from connectors.base import LeadUpsert


def new_event(key: str, email: str | None = "a@example.com") -> NewEvent:
    return NewEvent(
        source="s", type="reply", email=email, idempotency_key=key, received_at=1000.0, body="{}"
    )


def new_delivery(email: str = "a@example.com", connector: str = "hubspot") -> NewDelivery:
    return NewDelivery(
        rule="r",
        connector=connector,
        action="upsert_lead",
        contact_key=email,
        operation=LeadUpsert(id_value=email, fields={"x": 1}),
    )


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "bridge.db")
    await s.open()
    yield s
    await s.close()


async def test_an_event_and_its_deliveries_are_stored_together(store):
    result = await store.ingest(new_event("k1"), [new_delivery(), new_delivery(connector="sf")])
    assert not result.duplicate and len(result.delivery_ids) == 2
    stored = await store.event(result.event_id)
    assert [d["connector"] for d in stored["deliveries"]] == ["hubspot", "sf"]
    assert {d["status"] for d in stored["deliveries"]} == {"pending"}


async def test_a_resent_event_is_recognised_and_adds_no_delivery(store):
    first = await store.ingest(new_event("k1"), [new_delivery()])
    again = await store.ingest(new_event("k1"), [new_delivery()])
    assert again.duplicate and again.event_id == first.event_id and again.delivery_ids == []
    assert await store.counts() == {"hubspot": {"pending": 1}}


async def test_concurrent_ingests_commit_together_and_each_gets_its_answer(store):
    results = await asyncio.gather(
        *(store.ingest(new_event(f"k{i}"), [new_delivery(f"{i}@x.io")]) for i in range(200))
    )
    assert len({r.event_id for r in results}) == 200
    assert await store.counts() == {"hubspot": {"pending": 200}}


async def test_claims_follow_each_contacts_order(store):
    for i in range(3):
        await store.ingest(new_event(f"a{i}"), [new_delivery("a@x.io")])
    await store.ingest(new_event("b"), [new_delivery("b@x.io")])
    claimed = await store.claim("hubspot", 10, now=2000.0, lease_seconds=60)
    # Only the head of each contact's queue: a@'s second write waits for its first.
    assert [d.contact_key for d in claimed] == ["a@x.io", "b@x.io"]
    assert all(d.status == "in_flight" and d.attempts == 1 for d in claimed)
    assert await store.claim("hubspot", 10, now=2000.0, lease_seconds=60) == []
    await store.complete(claimed[0].id, "done", {"record_id": "1"}, now=2001.0)
    (nxt,) = await store.claim("hubspot", 10, now=2001.0, lease_seconds=60)
    assert nxt.contact_key == "a@x.io" and nxt.id > claimed[0].id


async def test_a_rescheduled_delivery_is_not_claimed_before_it_is_due(store):
    await store.ingest(new_event("k"), [new_delivery()])
    (d,) = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    await store.retry_later(d.id, next_attempt_at=2100.0, error="503", now=2000.0)
    assert await store.claim("hubspot", 1, now=2099.0, lease_seconds=60) == []
    (again,) = await store.claim("hubspot", 1, now=2100.0, lease_seconds=60)
    assert again.attempts == 2 and again.last_error == "503"


async def test_an_expired_lease_makes_a_delivery_claimable_again(store):
    await store.ingest(new_event("k"), [new_delivery()])
    await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    assert await store.claim("hubspot", 1, now=2059.0, lease_seconds=60) == []
    assert len(await store.claim("hubspot", 1, now=2061.0, lease_seconds=60)) == 1


async def test_deliveries_in_flight_at_a_crash_are_resumed_on_reopen(tmp_path):
    path = tmp_path / "bridge.db"
    first = SqliteStore(path)
    await first.open()
    await first.ingest(new_event("k"), [new_delivery()])
    await first.claim("hubspot", 1, now=2000.0, lease_seconds=3600)
    await first.close()
    second = SqliteStore(path)
    await second.open()
    try:
        (d,) = await second.claim("hubspot", 1, now=2001.0, lease_seconds=60)
        assert d.attempts == 2
    finally:
        await second.close()


async def test_a_second_daemon_cannot_open_the_same_file(store):
    other = SqliteStore(store.path)
    with pytest.raises(StoreUnavailable, match="in use by another crm-bridge process"):
        await other.open()


async def test_the_store_file_is_private(store):
    mode = stat.S_IMODE(os.stat(store.path).st_mode)
    assert mode == 0o600


async def test_a_failing_call_rolls_back_alone(store):
    async def bad():
        return await store._run(lambda conn: conn.execute("INSERT INTO nowhere VALUES (1)"))

    results = await asyncio.gather(
        store.ingest(new_event("k1"), [new_delivery()]),
        bad(),
        store.ingest(new_event("k2"), [new_delivery("b@x.io")]),
        return_exceptions=True,
    )
    assert not isinstance(results[0], Exception) and not isinstance(results[2], Exception)
    assert isinstance(results[1], Exception)
    assert await store.counts() == {"hubspot": {"pending": 2}}
