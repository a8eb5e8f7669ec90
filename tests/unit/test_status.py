"""What `crm-bridge status` and `/metrics` read: the store's queue figures, the daemon's address."""

from types import SimpleNamespace

import pytest

from bridge.breaker import CircuitBreaker
from bridge.config import ServerConfig
from bridge.metrics import MAX_EVENT_TYPES, Metrics
from bridge.models import DeliveryStatus, Finish
from bridge.ratelimit import RateLimiter
from bridge.status import age, daemon_url, live_pauses, render
from bridge.store.base import QueueStat
from bridge.store.sqlite import SqliteStore
from connectors.base import ConnectorConfig, DryRunConnector
from tests.unit.test_store import add, new_delivery


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "bridge.db")
    await s.open()
    yield s
    await s.close()


async def test_queue_stats_count_waiting_deliveries_and_date_the_oldest_pending(store):
    await add(store, [new_delivery("a@x.io"), new_delivery("a@x.io", connector="sf")], "k1")
    await add(store, [new_delivery("b@x.io")], "k2")
    await add(store, [new_delivery("c@x.io")], "k3")
    claimed = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    (first,) = [d.id for g in claimed for d in g.deliveries]
    await store.finish(
        [Finish(delivery_ids=[first], claims=[1], status=DeliveryStatus.DONE)], now=2000.0
    )
    [group] = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    assert await store.queue_stats() == {
        "hubspot": QueueStat(pending=1, in_flight=1, oldest_pending_at=1000.0),
        "sf": QueueStat(pending=1, in_flight=0, oldest_pending_at=1000.0),
    }
    await store.finish([Finish.of([group.head], status=DeliveryStatus.DONE)], now=2000.0)
    [group] = await store.claim("hubspot", 1, now=2000.0, lease_seconds=60)
    await store.finish([Finish.of([group.head], status=DeliveryStatus.DONE)], now=2000.0)
    assert await store.queue_stats() == {"sf": QueueStat(pending=1, oldest_pending_at=1000.0)}


async def test_last_errors_are_the_newest_of_pending_or_dead_deliveries(store):
    _, (a,) = await add(store, [new_delivery("a@x.io")], "k1")
    _, (b,) = await add(store, [new_delivery("b@x.io")], "k2")
    _, (c,) = await add(store, [new_delivery("c@x.io")], "k3")
    assert await store.last_errors() == {}
    await store.claim("hubspot", 3, now=2000.0, lease_seconds=60)
    await store.finish(
        [Finish(delivery_ids=[a], claims=[1], status=DeliveryStatus.DEAD, error="refused")],
        now=2001.0,
    )
    await store.finish(
        [
            Finish(
                delivery_ids=[b],
                claims=[1],
                status=DeliveryStatus.PENDING,
                error="HubSpot 503",
                next_attempt_at=3000.0,
            )
        ],
        now=2002.0,
    )
    # A delivery done after that does not hide the error
    await store.finish(
        [Finish(delivery_ids=[c], claims=[1], status=DeliveryStatus.DONE)], now=2003.0
    )
    (error,) = (await store.last_errors()).values()
    assert (error.delivery_id, error.status, error.error, error.at) == (
        b,
        "pending",
        "HubSpot 503",
        2002.0,
    )


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8080, "http://127.0.0.1:8080"),
        ("0.0.0.0", 8080, "http://127.0.0.1:8080"),
        ("::", 9000, "http://[::1]:9000"),
        ("::1", 9000, "http://[::1]:9000"),
        ("localhost", 8080, "http://localhost:8080"),
        ("127.0.0.1", 0, None),
    ],
)
def test_the_daemon_is_asked_on_loopback(host, port, url):
    assert daemon_url(ServerConfig(host=host, port=port)) == url


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0.4, "0s"), (59.9, "59s"), (60, "1m"), (7200, "2h"), (3 * 86400, "3d")],
)
def test_ages_read_at_a_glance(seconds, text):
    assert age(seconds) == text


def test_event_types_beyond_the_cap_count_as_other():
    metrics = Metrics()
    for i in range(MAX_EVENT_TYPES + 5):
        metrics.received("supersend", f"type-{i}", "stored")
    metrics.received("supersend", "type-0", "stored")
    types = {
        s.labels["type"]
        for family in metrics.registry.collect()
        if family.name == "crm_bridge_events_received"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert len(types) == MAX_EVENT_TYPES + 1 and "other" in types


# -- pauses: the breaker's and the connector's own, in /status, the report and the metrics --
class HoldingConnector(DryRunConnector):
    """A connector whose limiter was paused by the CRM (as HubSpot's is by a 429)."""

    def pauses(self):
        return self.limiter.pauses(wall=lambda: NOW)


NOW = 1_700_000_000.0


def paused_worker():
    connector = HoldingConnector("hubspot", ConnectorConfig(type="hubspot"))
    connector.limiter = RateLimiter(10, 10.0, clock=lambda: 0.0)
    connector.limiter.pause(
        120, reason="HubSpot 429: the ten_secondly_rolling limit", kind="rate_limit"
    )
    breaker = CircuitBreaker(threshold=1, cooldown=30.0, clock=lambda: 0.0)
    breaker.record_failure("HubSpot 503")
    return SimpleNamespace(connector=connector, breaker=breaker)


def test_every_pause_is_listed_longest_first_with_its_end_and_seconds_left():
    worker = paused_worker()

    assert live_pauses(worker.breaker, worker.connector, NOW) == [
        {
            "kind": "rate_limit",
            "reason": "HubSpot 429: the ten_secondly_rolling limit",
            "until": "2023-11-14T22:15:20Z",
            "seconds_left": 120.0,
        },
        {
            "kind": "circuit_breaker",
            "reason": "HubSpot 503",
            "until": "2023-11-14T22:13:50Z",
            "seconds_left": 30.0,
        },
    ]


def test_the_status_report_shows_each_pause_on_a_line_of_its_own():
    pauses = live_pauses(paused_worker().breaker, paused_worker().connector, NOW)
    row = {
        "mode": "live",
        "breaker": "open",
        "breaker_reason": "HubSpot 503",
        "paused_for": 120.0,
        "pauses": pauses,
        "pending": 1,
        "in_flight": 0,
        "oldest_pending_age": 5.0,
        "dead": 0,
        "done": 0,
        "last_error": "HubSpot 503",
    }
    report = {
        "store": "sqlite",
        "daemon": {"running": True, "detail": "running at http://127.0.0.1:8080"},
        "queue_depth": 1,
        "oldest_pending_age": 5.0,
        "backlog": 1,
        "dead": 0,
        "connectors": {"hubspot": row},
    }

    lines = [line.split() for line in render(report, width=160).splitlines()]

    assert [line[:4] for line in lines if line and line[0] == "paused"] == [
        ["paused", "hubspot", "rate_limit", "2m"],
        ["paused", "hubspot", "circuit_breaker", "30s"],
    ]


def test_the_metrics_hold_the_seconds_left_by_kind_of_pause():
    metrics = Metrics(workers=lambda: {"hubspot": paused_worker()}, clock=lambda: NOW)

    paused = {
        s.labels["kind"]: s.value
        for family in metrics.registry.collect()
        if family.name == "crm_bridge_connector_paused_seconds"
        for s in family.samples
    }

    assert paused == {
        "circuit_breaker": 30.0,
        "rate_limit": 120.0,
        "daily_allocation": 0.0,
        "concurrency": 0.0,
        "configuration": 0.0,
        "auth": 0.0,
    }
