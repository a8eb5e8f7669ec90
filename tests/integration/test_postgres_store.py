"""The PostgreSQL store as several instances see it: two stores (two pools) on one database,
as two daemons would have, racing for the same work; migrations; retention and replays."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys

import asyncpg
import pytest

from bridge.config import DeliveryConfig
from bridge.delivery import DeliveryWorker
from bridge.errors import StoreUnavailable
from bridge.models import DeliveryStatus, Finish, Routed
from bridge.retry import RetryPolicy
from bridge.store.postgres import MIGRATIONS, PostgresStore
from connectors.hubspot import HubSpotConfig, HubSpotConnector
from tests.postgres import SERVER
from tests.unit.test_store import add, done, new_delivery, new_event

pytestmark = pytest.mark.postgres


@pytest.fixture
async def stores(pg_url):
    """Open stores on the test's database, one per simulated instance, closed afterwards."""
    opened = []

    async def make(**kw) -> PostgresStore:
        store = PostgresStore(pg_url, **({"pool_min": 1, "pool_max": 4} | kw))
        await store.open()
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def fresh_database():
    """An empty database of its own (no schema), dropped afterwards."""
    name = f"crm_bridge_test_empty_{random.getrandbits(32):08x}"
    admin = await asyncpg.connect(f"{SERVER}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{SERVER}/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_payload_posted_to_two_instances_at_once_is_stored_once(stores):
    a, b = await stores(), await stores()
    events = [new_event(f"k{i}") for i in range(50)]
    results = await asyncio.gather(*(s.ingest(e) for e in events for s in (a, b)))
    # Given the same 50 events sent to both instances at once, each is new exactly once.
    assert sum(not r.duplicate for r in results) == 50
    assert len(await a.unrouted(1000)) == 50


async def test_two_routers_never_double_an_events_deliveries(stores):
    a, b = await stores(), await stores()
    await a.ingest(new_event("k1"))
    routed = Routed(event_id="k1", sort_at=1000.0, deliveries=[new_delivery()])
    # Both routers evaluated the event (a lease ran out in between): one stores its deliveries.
    ids = await asyncio.gather(a.route([routed], now=1500.0), b.route([routed], now=1500.0))
    assert sorted(len(i) for i in ids) == [0, 1]
    assert await a.counts() == {"hubspot": {"pending": 1}}


async def test_an_instances_router_leases_its_batch(stores):
    a, b = await stores(), await stores()
    for i in range(4):
        await a.ingest(new_event(f"k{i}"))
    first = await a.unrouted(3)
    second = await b.unrouted(10)
    assert len(first) == 3 and len(second) == 1
    assert {e.id for e in first} | {e.id for e in second} == {f"k{i}" for i in range(4)}


async def test_concurrent_claims_keep_each_contacts_order_and_claim_nothing_twice(stores):
    instances = [await stores(pool_max=6) for _ in range(3)]
    contacts = [f"c{i}@x.io" for i in range(20)]
    expected: dict[str, list[int]] = {}
    for n in range(5):
        for c in contacts:
            _, ids = await add(instances[0], [new_delivery(c)], f"{c}-{n}", sort_at=1000.0 + n)
            expected.setdefault(c, []).extend(ids)
    applied: dict[str, list[int]] = {c: [] for c in contacts}
    in_flight: set[str] = set()
    overlaps: list[str] = []

    async def work(store: PostgresStore) -> None:
        idle = 0
        while idle < 20:
            groups = await store.claim("hubspot", 4, now=2000.0, lease_seconds=600)
            if not groups:
                idle += 1
                await asyncio.sleep(0.005)
                continue
            idle = 0
            for g in groups:
                key = g.head.contact_key
                if key in in_flight:
                    overlaps.append(key)
                in_flight.add(key)
            await asyncio.sleep(random.random() / 200)
            for g in groups:
                applied[g.head.contact_key].extend(g.ids)
                in_flight.discard(g.head.contact_key)
            await store.finish([done(g.ids) for g in groups], now=2000.0)

    await asyncio.gather(*(work(s) for s in instances for _ in range(2)))
    # Every delivery once, each contact's in order, never two of one contact at the same time.
    assert overlaps == []
    assert applied == expected
    assert await instances[0].counts() == {"hubspot": {"done": 100}}


async def test_a_crashed_instances_claims_return_after_the_lease(stores):
    a = await stores()
    await add(a, [new_delivery()], "k")
    (group,) = await a.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    await a.close()  # it died holding the claim
    b = await stores()  # another instance (or the same one restarted) releases nothing at start
    assert await b.claim("hubspot", 1, now=2059.0, lease_seconds=60) == []
    (again,) = await b.claim("hubspot", 1, now=2061.0, lease_seconds=60)
    assert again.ids == group.ids and again.head.attempts == 2


async def test_migrations_apply_once_and_a_daemon_without_them_is_told_what_to_run(
    fresh_database,
):
    unmigrated = PostgresStore(fresh_database, migrate_on_start=False)
    with pytest.raises(StoreUnavailable, match="run `crm-bridge migrate`"):
        await unmigrated.open()
    # Three instances starting together: the advisory lock lets one migrate.
    applied = await asyncio.gather(*(PostgresStore(fresh_database).migrate() for _ in range(3)))
    assert sorted(applied, key=len) == [[], [], MIGRATIONS]
    store = PostgresStore(fresh_database, migrate_on_start=False)
    await store.open()
    await store.close()


async def test_an_unreachable_server_is_unavailable_and_its_password_is_not_shown():
    store = PostgresStore("postgresql://bridge:s3cret@127.0.0.1:1/nowhere")
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    assert "s3cret" not in str(caught.value) and "bridge@127.0.0.1:1" in str(caught.value)


async def test_the_rate_window_is_shared_by_instances(stores):
    a, b = await stores(), await stores()
    wa, wb = a.shared_window("hubspot"), b.shared_window("hubspot")
    takes = [await (wa if i % 2 else wb).take(5, 10.0, 0.0) for i in range(5)]
    assert takes == [0.0] * 5
    assert 9.0 < await wa.take(5, 10.0, 0.0) <= 10.0  # both count in the same window
    assert await a.shared_window("salesforce").take(5, 10.0, 0.0) == 0.0  # its own window
    await wa.take(5, 10.0, 30.0)  # a Retry-After seen by one instance pauses the others
    assert 29.0 < await wb.take(5, 10.0, 0.0) <= 30.0


async def test_forget_deletes_a_contacts_events_and_deliveries(stores):
    store = await stores()
    await add(store, [new_delivery("a@example.com"), new_delivery(connector="sf")], "k1")
    await add(store, [new_delivery("a@example.com")], "k2", sort_at=1001.0)
    (group,) = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    await store.finish(
        [Finish.of(group.deliveries, status=DeliveryStatus.DEAD, error="bad")], now=2000.0
    )
    other = new_event("k3", email="b@example.com")
    await store.ingest(other)
    assert await store.forget("  A@Example.com ") == (2, 3)
    assert await store.event("k1") is None and await store.event("k3") is not None
    assert await store.counts() == {}
    assert await store.forget("a@example.com") == (0, 0)


async def test_purge_delivered_keeps_what_is_unfinished_dead_or_recent(stores):
    store = await stores()
    ids = {}
    for key in ("done", "dead", "pending", "recent"):
        await store.ingest(
            new_event(key).model_copy(update={"received_at": 5000.0 if key == "recent" else 1000.0})
        )
        ids[key] = await store.route(
            [Routed(event_id=key, sort_at=1000.0, deliveries=[new_delivery(f"{key}@x.io")])],
            now=1000.0,
        )
    await store.ingest(new_event("unrouted"))
    await store.ingest(new_event("nothing-to-send"))
    await store.route([Routed(event_id="nothing-to-send", sort_at=1000.0, deliveries=[])], 1000.0)
    await store.claim("hubspot", 10, now=2000.0, lease_seconds=60)
    await store.finish(
        [
            done(ids["done"]),
            done(ids["recent"]),
            Finish(
                delivery_ids=ids["dead"],
                claims=[1] * len(ids["dead"]),
                status=DeliveryStatus.DEAD,
                error="x",
            ),
        ],
        now=2000.0,
    )
    assert await store.purge_delivered(before=4000.0) == 2  # done, nothing-to-send
    assert await store.event("done") is None and await store.event("nothing-to-send") is None
    for key in ("dead", "pending", "recent", "unrouted"):
        assert await store.event(key) is not None
    assert await store.purge_delivered(before=4000.0) == 0


async def test_a_message_id_is_new_once_within_keep_across_instances(stores):
    a, b = await stores(), await stores()
    seen = await asyncio.gather(
        *(s.seen_message("supersend", "m1", now=1000.0, keep=300.0) for s in (a, b, a, b))
    )
    assert sorted(seen) == [False, False, False, True]
    assert await a.seen_message("supersend", "m1", now=1299.0, keep=300.0) is False
    assert await b.seen_message("other", "m1", now=1299.0, keep=300.0) is True
    assert await a.seen_message("supersend", "m1", now=1600.0, keep=300.0) is True


async def test_webhooks_arriving_together_commit_together_and_a_bad_one_fails_alone(stores):
    store = await stores()
    events = [new_event(f"k{i}") for i in range(100)]
    bad = new_event("bad").model_copy(update={"body": "{\x00}"})  # PostgreSQL refuses NUL
    results = await asyncio.gather(
        *(store.ingest(e) for e in [*events[:50], bad, *events[50:], events[7]]),
        return_exceptions=True,
    )
    assert isinstance(results[50], asyncpg.PostgresError)
    fine = [r for i, r in enumerate(results) if i != 50]
    assert [r.duplicate for r in fine] == [False] * 100 + [True]
    assert len(await store.unrouted(1000)) == 100


async def test_a_bad_row_is_found_by_halving_its_batch_not_row_by_row(stores):
    store = await stores()
    statements = 0
    insert = store._insert_events

    async def counted(events):
        nonlocal statements
        statements += 1
        return await insert(events)

    store._insert_events = counted
    events = [new_event(f"k{i}") for i in range(256)]
    bad = new_event("bad").model_copy(update={"body": "{\x00}"})  # PostgreSQL refuses NUL
    results = await asyncio.gather(
        *(store.ingest(e) for e in [*events, bad]), return_exceptions=True
    )
    assert isinstance(results[-1], asyncpg.PostgresError)
    assert [r.duplicate for r in results[:-1]] == [False] * 256
    # One batch of 257: halving finds the bad row in 2 statements per level (log2 257 < 9),
    # where one row at a time took 258.
    assert statements <= 1 + 2 * 9


async def test_crm_bridge_migrate_applies_then_finds_the_schema_up_to_date(
    fresh_database, tmp_path
):
    config = tmp_path / "config.yaml"
    config.write_text(f"store:\n  url: {fresh_database}\n  migrate_on_start: false\n")

    def migrate() -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "bridge", "migrate", "--config", str(config)]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    first, again = migrate(), migrate()
    assert first.returncode == 0 and f"applied {', '.join(MIGRATIONS)}" in first.stdout
    assert again.returncode == 0 and "the schema is up to date" in again.stdout


async def test_a_delivery_worker_limits_its_connector_through_the_shared_window(stores):
    store = await stores()
    settings = {"type": "hubspot", "access_token": "pat-na1-test", "base_url": "http://127.0.0.1:9"}
    connector = HubSpotConnector("hubspot", HubSpotConfig.model_validate(settings))
    DeliveryWorker(
        "hubspot",
        connector,
        store,
        RetryPolicy.from_config(DeliveryConfig()),
        concurrency=1,
        lease_seconds=60,
        poll_interval=1,
    )
    assert connector.limiter is not None
    for _ in range(3):
        await connector.limiter.acquire()
    async with store.connection() as conn:
        starts = await conn.fetchval("SELECT count(*) FROM rate_starts WHERE name = 'hubspot'")
    assert starts == 3  # counted where every instance sees them


async def test_connections_lost_mid_run_fail_alone_and_the_pool_recovers(stores, pg_url):
    store = await stores(pool_min=2, pool_max=2)
    await store.ingest(new_event("before"))
    # The server drops every connection of this database (a failover, a restart).
    admin = await asyncpg.connect(f"{SERVER}/postgres")
    try:
        name = pg_url.rsplit("/", 1)[1]
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid != pg_backend_pid()",
            name,
        )
    finally:
        await admin.close()
    outcomes = []
    for i in range(4):
        try:
            outcomes.append((await store.ingest(new_event(f"after{i}"))).duplicate)
        except StoreUnavailable:
            outcomes.append("unavailable")  # nothing acknowledged: the sender retries
    # At most the calls on the dead connections failed, as StoreUnavailable; then it works.
    assert outcomes[-2:] == [False, False]
    assert (await store.ingest(new_event("before"))).duplicate is True


async def test_a_failing_statistics_refresh_does_not_fail_the_committed_routing(
    stores, monkeypatch
):
    store = await stores()
    store._analyze_at = [1]  # refresh after the first delivery routed
    await store.ingest(new_event("k"))
    # The routing commits on its connection; the refresh then meets a store gone away.
    opened = 0
    connection = store.connection

    def failing_after_the_first():
        nonlocal opened
        opened += 1
        if opened > 1:
            raise StoreUnavailable("the server went away")
        return connection()

    monkeypatch.setattr(store, "connection", failing_after_the_first)
    routed = Routed(event_id="k", sort_at=1000.0, deliveries=[new_delivery()])
    assert len(await store.route([routed], now=1500.0)) == 1
    assert opened == 2  # the routing's connection, then the refresh's
    monkeypatch.undo()
    assert await store.counts() == {"hubspot": {"pending": 1}}


async def test_a_webhook_is_flushed_while_finished_flushes_await_their_callbacks(stores):
    store = await stores()
    # Both flush tasks have returned; their done-callbacks (which drop them) have not run yet.
    loop = asyncio.get_running_loop()
    for _ in range(2):
        finished = loop.create_future()
        finished.set_result(None)
        store._flushes.add(finished)
    result = await asyncio.wait_for(store.ingest(new_event("k")), 10)
    assert result.duplicate is False
