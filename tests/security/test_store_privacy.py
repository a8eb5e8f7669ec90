"""The store's privacy duties: private files, forgetting a person, retention, replay memory."""

import json
import os
import stat

import pytest

from bridge.models import DeliveryStatus, Finish, NewDelivery, NewEvent, Routed
from bridge.store.postgres import PostgresStore
from bridge.store.sqlite import SqliteStore
from connectors.base import LeadUpsert
from tests.postgres import BACKENDS


def event(key: str, email: str | None, received_at: float = 1000.0) -> NewEvent:
    return NewEvent(
        id=key,
        source="s",
        type="reply",
        email=email,
        received_at=received_at,
        sort_at=received_at,
        body=json.dumps({"contact": {"email": email}}),
    )


def delivery(email: str, connector: str = "hubspot") -> NewDelivery:
    return NewDelivery(
        rule="r",
        connector=connector,
        action="upsert_lead",
        contact_key=email,
        operation=LeadUpsert(id_value=email, fields={"x": 1}),
    )


async def stored(store, key, email, deliveries=1, received_at=1000.0, route=True):
    await store.ingest(event(key, email, received_at))
    if not route:
        return []
    news = [delivery(email or "none", f"c{i}") for i in range(deliveries)]
    return await store.route([Routed(event_id=key, sort_at=received_at, deliveries=news)], 1000.0)


async def finish_all(store, status, connectors=("c0", "c1")):
    for connector in connectors:
        groups = await store.claim(connector, 100, now=2000.0, lease_seconds=60)
        if groups:
            claimed = [d for g in groups for d in g.deliveries]
            await store.finish([Finish.of(claimed, status=status)], now=2000.0)


@pytest.fixture(params=BACKENDS)
async def store(request, tmp_path):
    if request.param == "postgres":
        s = PostgresStore(request.getfixturevalue("pg_url"), pool_min=1, pool_max=4)
    else:
        s = SqliteStore(tmp_path / "private" / "bridge.db")
    await s.open()
    yield s
    await s.close()


async def test_every_store_file_is_owner_only_even_with_a_lax_umask(tmp_path):
    old = os.umask(0o000)
    try:
        s = SqliteStore(tmp_path / "bridge.db")
        await s.open()
        await stored(s, "k1", "a@example.com")
        files = sorted(p.name for p in tmp_path.iterdir())
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        await s.close()
    finally:
        os.umask(old)
    assert {"bridge.db", "bridge.db-wal", "bridge.db-shm", "bridge.db.lock"} <= set(files)
    assert modes == dict.fromkeys(files, 0o600)


async def test_forget_removes_a_persons_events_and_every_delivery_dead_included(store):
    await stored(store, "k1", "ann@example.com", deliveries=2)
    await stored(store, "k2", "ann@example.com", deliveries=1)
    await stored(store, "k3", "bob@example.com", deliveries=1)
    await finish_all(store, DeliveryStatus.DEAD, connectors=("c1",))  # one of ann's is dead
    assert [d["contact_key"] for d in await store.dead_letters()] == ["ann@example.com"]

    assert await store.forget("  Ann@Example.COM ") == (2, 3)

    assert await store.event("k1") is None and await store.event("k2") is None
    assert await store.dead_letters() == []
    assert await store.event("k3") is not None
    assert await store.counts() == {"c0": {"pending": 1}}
    assert await store.forget("ann@example.com") == (0, 0)


async def test_forget_leaves_no_trace_in_the_files(tmp_path):
    store = SqliteStore(tmp_path / "b.db")
    await store.open()
    await stored(store, "k1", "secret.person@example.com")
    await finish_all(store, DeliveryStatus.DONE, connectors=("c0",))
    await store.forget("secret.person@example.com")
    await store.close()  # checkpoints the WAL into the file
    # Deleted rows would linger in free pages: secure_delete overwrites them.
    data = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert b"secret.person@example.com" not in data


async def test_purge_delivered_keeps_what_is_unfinished_dead_recent_or_unrouted(store):
    await stored(store, "done", "a@example.com", received_at=1000.0)
    await stored(store, "none", "b@example.com", deliveries=0, received_at=1000.0)
    await finish_all(store, DeliveryStatus.DONE, connectors=("c0",))
    await stored(store, "pending", "c@example.com", received_at=1000.0)
    await stored(store, "unrouted", "d@example.com", received_at=1000.0, route=False)
    await stored(store, "recent", "e@example.com", deliveries=0, received_at=5000.0)
    await stored(store, "dead", "f@example.com", deliveries=2, received_at=1000.0)
    await finish_all(store, DeliveryStatus.DEAD, connectors=("c1",))  # f's c1 dead, c0 pending

    assert await store.purge_delivered(before=4000.0) == 2

    assert await store.event("done") is None and await store.event("none") is None
    for key in ("pending", "unrouted", "recent", "dead"):
        assert await store.event(key) is not None, key
    assert await store.purge_delivered(before=4000.0) == 0


async def test_purge_delivered_counts_skipped_and_dry_run_as_finished(store):
    await stored(store, "k1", "a@example.com", deliveries=2)
    groups = await store.claim("c0", 10, now=2000.0, lease_seconds=60)
    await store.finish([Finish.of(groups[0].deliveries, status=DeliveryStatus.SKIPPED)], 2000.0)
    groups = await store.claim("c1", 10, now=2000.0, lease_seconds=60)
    await store.finish([Finish.of(groups[0].deliveries, status=DeliveryStatus.DRY_RUN)], 2000.0)
    assert await store.purge_delivered(before=1001.0) == 1
    assert await store.counts() == {}


async def test_a_message_id_is_a_replay_within_keep_and_new_after(store):
    keep = 96 * 3600.0
    assert await store.seen_message("s", "msg_1", now=1000.0, keep=keep) is True
    assert await store.seen_message("s", "msg_1", now=1000.0 + keep - 1, keep=keep) is False
    assert await store.seen_message("other", "msg_1", now=1001.0, keep=keep) is True
    assert await store.seen_message("s", "msg_1", now=1000.0 + keep + 1, keep=keep) is True


async def test_message_ids_survive_a_restart(tmp_path):
    first = SqliteStore(tmp_path / "b.db")
    await first.open()
    assert await first.seen_message("s", "msg_1", now=1000.0, keep=100.0)
    await first.close()
    second = SqliteStore(tmp_path / "b.db")
    await second.open()
    try:
        assert not await second.seen_message("s", "msg_1", now=1050.0, keep=100.0)
    finally:
        await second.close()


async def test_expired_message_ids_are_purged(tmp_path):
    # SQLite's table itself: the rows of expired ids are deleted, not only ignored.
    store = SqliteStore(tmp_path / "bridge.db")
    await store.open()
    for i in range(5):
        await store.seen_message("s", f"old{i}", now=1000.0, keep=10.0)
    store._messages_seen = 0  # the next call purges
    await store.seen_message("s", "new", now=2000.0, keep=10.0)
    rows = await store._run(lambda c: c.execute("SELECT count(*) FROM webhook_messages").fetchone())
    assert rows[0] == 1
    await store.close()
