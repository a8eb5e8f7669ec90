"""The delivery worker sends nothing under a claim whose lease has run out: another instance
may have claimed the delivery again meanwhile, and be sending it."""

from __future__ import annotations

from typing import ClassVar

from bridge.config import DeliveryConfig
from bridge.delivery import DeliveryWorker
from bridge.ratelimit import RateLimiter
from bridge.retry import RetryPolicy
from connectors.base import Connector, ConnectorConfig, DeliveryResult, LeadUpsert
from tests.unit.test_ratelimit import FakeTime
from tests.unit.test_store import add, new_delivery, store  # noqa: F401 - the fixture


class LimitedConnector(Connector):
    """Every write waits for its rate limiter, then is kept in `sent`."""

    name: ClassVar[str] = "limited"

    def __init__(self, clock: FakeTime) -> None:
        super().__init__("hubspot", ConnectorConfig(type="limited"))
        self.limiter = RateLimiter(1, 100.0, clock=clock, sleep=clock.sleep)
        self.sent: list[LeadUpsert] = []

    async def upsert_lead(self, lead: LeadUpsert) -> DeliveryResult:
        assert self.limiter is not None
        await self.limiter.acquire()
        self.sent.append(lead)
        return DeliveryResult(record_id="R1")


def worker(store_, clock: FakeTime) -> tuple[DeliveryWorker, LimitedConnector]:
    connector = LimitedConnector(clock)
    w = DeliveryWorker(
        "hubspot",
        connector,
        store_,
        RetryPolicy.from_config(DeliveryConfig()),
        concurrency=1,
        lease_seconds=60,
        poll_interval=1,
        clock=clock,
    )
    return w, connector


async def test_a_call_whose_slot_comes_after_the_lease_is_not_sent(store):  # noqa: F811
    # Given a full rate-limit window: the next slot frees in 100 s, the lease ends in 60 s
    clock = FakeTime()
    w, connector = worker(store, clock)
    await connector.limiter.acquire()
    _, (delivery_id,) = await add(store, [new_delivery()], "k")
    groups = await store.claim("hubspot", 10, now=clock(), lease_seconds=60)

    # When the worker's turn comes
    await w._deliver("upsert_lead", groups, lease_end=clock() + 60)

    # Then nothing was sent, and the delivery is left in flight for the next claim
    assert connector.sent == []
    row = await store.delivery(delivery_id)
    assert (row["status"], row["attempts"]) == ("in_flight", 1)
    clock.now += 61
    (again,) = await store.claim("hubspot", 10, now=clock(), lease_seconds=60)
    assert again.head.id == delivery_id and again.head.attempts == 2


async def test_a_claim_whose_lease_passed_before_its_turn_is_skipped(store):  # noqa: F811
    clock = FakeTime()
    w, connector = worker(store, clock)
    _, (delivery_id,) = await add(store, [new_delivery()], "k")
    groups = await store.claim("hubspot", 10, now=clock(), lease_seconds=60)
    clock.now += 60  # the batch waited its whole lease for a free slot of the worker

    await w._deliver("upsert_lead", groups, lease_end=clock())

    assert connector.sent == []
    assert (await store.delivery(delivery_id))["status"] == "in_flight"


async def test_a_call_within_the_lease_is_sent_and_recorded(store):  # noqa: F811
    clock = FakeTime()
    w, connector = worker(store, clock)
    _, (delivery_id,) = await add(store, [new_delivery()], "k")
    groups = await store.claim("hubspot", 10, now=clock(), lease_seconds=60)

    await w._deliver("upsert_lead", groups, lease_end=clock() + 60)

    assert len(connector.sent) == 1
    assert (await store.delivery(delivery_id))["status"] == "done"


async def test_an_outcome_arriving_after_another_claim_is_neither_recorded_nor_counted(store):  # noqa: F811
    clock = FakeTime()
    w, connector = worker(store, clock)
    _, (delivery_id,) = await add(store, [new_delivery()], "k")
    groups = await store.claim("hubspot", 10, now=clock(), lease_seconds=60)

    async def slow_call(lead):
        # The call, started in time, hangs past the lease; another instance claims the
        # delivery meanwhile; then the CRM confirms the write.
        clock.now += 61
        (taken,) = await store.claim("hubspot", 10, now=clock(), lease_seconds=60)
        assert taken.head.attempts == 2
        connector.sent.append(lead)
        return DeliveryResult(record_id="R1")

    connector.upsert_lead = slow_call
    await w._deliver("upsert_lead", groups, lease_end=clock() + 60)

    assert len(connector.sent) == 1
    row = await store.delivery(delivery_id)
    assert (row["status"], row["attempts"]) == ("in_flight", 2)  # the other claim's, untouched
    assert w._metrics.deliveries.labels("hubspot", "upsert_lead", "done")._value.get() == 0
