"""Prometheus metrics, served at `GET /metrics` in the text exposition format.

Each app has a `CollectorRegistry` of its own, not the library's global one, so that several
apps can run in one process (the tests do). Two kinds of values:

- counted where they happen, at the cost of one labelled increment: webhooks received, delivery
  outcomes, retries, dead letters, the duration of each CRM call;
- read when scraped: queue depth and age of the oldest pending delivery (`Store.queue_stats`,
  one small query), time spent waiting on rate limits (`connector.limiter.waited_seconds`),
  circuit-breaker states and the seconds each kind of pause still holds a connector back
  (`bridge.status.live_pauses`), from the workers running at that moment (a reload may
  replace them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from bridge.breaker import BreakerState
from bridge.errors import StoreUnavailable
from bridge.models import DeliveryStatus, Finish
from bridge.store.base import QueueStat, Store

# Every kind of pause gets a series per connector, 0 when not paused, so alerts need no absent().
PAUSE_KINDS = (
    "circuit_breaker",
    "rate_limit",
    "daily_allocation",
    "concurrency",
    "configuration",
    "auth",
)

if TYPE_CHECKING:
    from bridge.delivery import DeliveryWorker

# The classic text format: what every Prometheus version reads, and what generate_latest writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BREAKER_VALUES = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
OUTCOMES = {
    DeliveryStatus.DONE: "done",
    DeliveryStatus.DRY_RUN: "dry_run",
    DeliveryStatus.SKIPPED: "skipped",
    DeliveryStatus.DEAD: "dead",
    DeliveryStatus.PENDING: "retry",  # rescheduled: it failed and waits for a later attempt
}
# CRM calls take tens of milliseconds to a minute (a slow batch under a 30 s HTTP timeout,
# retried in the call).
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Event types come from the sender (any string of up to 64 characters): past this many distinct
# ones, new types are counted as "other" so that a misbehaving sender cannot grow the series
# without bound.
MAX_EVENT_TYPES = 50
UNKNOWN = "unknown"  # a label value not known yet (a request refused before it was parsed)


class Metrics:
    """One app's instruments. `workers` gives the delivery workers running at scrape time."""

    def __init__(
        self,
        workers: Callable[[], Mapping[str, DeliveryWorker]] = dict,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "crm_bridge_events_received",
            "Webhook requests by source, event type and outcome "
            "(stored, duplicate, refused:<HTTP status>).",
            ["source", "type", "outcome"],
            registry=self.registry,
        )
        self.deliveries = Counter(
            "crm_bridge_deliveries",
            "Deliveries finished or rescheduled, by connector, action and outcome "
            "(done, dry_run, skipped, dead, retry).",
            ["connector", "action", "outcome"],
            registry=self.registry,
        )
        self.retries = Counter(
            "crm_bridge_retries",
            "Retries by connector: in_call counts CRM calls repeated within an attempt, "
            "rescheduled counts deliveries put back in the queue for a later attempt.",
            ["connector", "kind"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "crm_bridge_dead_letters",
            "Deliveries dead-lettered (refused for good or out of retries), by connector.",
            ["connector"],
            registry=self.registry,
        )
        self.crm_calls = Histogram(
            "crm_bridge_crm_call_duration_seconds",
            "Duration of each connector call to a CRM (one batch or one activity), "
            "by connector and action, failures included.",
            ["connector", "action"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.live = LiveCollector(workers, clock)
        self.registry.register(self.live)
        self._event_types: set[str] = set()

    def received(self, source: str, type_: str | None, outcome: str) -> None:
        """Count one webhook request."""
        self.events.labels(source, self._type_label(type_), outcome).inc()

    def _type_label(self, type_: str | None) -> str:
        if type_ is None:
            return UNKNOWN
        if type_ not in self._event_types:
            if len(self._event_types) >= MAX_EVENT_TYPES:
                return "other"
            self._event_types.add(type_)
        return type_

    def finished(self, connector: str, action: str, finishes: Iterable[Finish]) -> None:
        """Count the recorded outcomes of one delivery call."""
        for finish in finishes:
            n = len(finish.delivery_ids)
            outcome = OUTCOMES.get(finish.status, str(finish.status))
            self.deliveries.labels(connector, action, outcome).inc(n)
            if finish.status == DeliveryStatus.DEAD:
                self.dead_letters.labels(connector).inc(n)
            elif finish.status == DeliveryStatus.PENDING:
                self.retries.labels(connector, "rescheduled").inc(n)

    def retried_in_call(self, connector: str) -> None:
        self.retries.labels(connector, "in_call").inc()

    async def scrape(self, store: Store) -> bytes:
        """The whole registry in the text format, queue figures read from the store now."""
        try:
            self.live.queue = await store.queue_stats()
        except StoreUnavailable:
            self.live.queue = None  # the queue gauges are left out of this scrape
        # No await from here on: the figures just read are the ones written.
        return generate_latest(self.registry)


class LiveCollector:
    """Values read at scrape time: the connectors' queues, rate-limit waits and breakers."""

    def __init__(
        self,
        workers: Callable[[], Mapping[str, DeliveryWorker]],
        clock: Callable[[], float],
    ) -> None:
        self._workers = workers
        self._clock = clock
        # Set by `Metrics.scrape` just before the registry is collected; None: unavailable.
        self.queue: dict[str, QueueStat] | None = None

    def collect(self) -> Iterable[Metric]:
        workers = self._workers()
        yield from self._queue_families(workers)
        yield self._pause_family(workers)
        waited = CounterMetricFamily(
            "crm_bridge_rate_limit_wait_seconds",
            "Seconds the connector's calls spent waiting on its client-side rate limiter.",
            labels=["connector"],
        )
        breaker = GaugeMetricFamily(
            "crm_bridge_circuit_breaker_state",
            "Circuit breaker of each connector: 0 closed, 1 half-open, 2 open.",
            labels=["connector"],
        )
        for name, worker in sorted(workers.items()):
            limiter = worker.connector.limiter
            if limiter is not None:
                waited.add_metric([name], limiter.waited_seconds)
            breaker.add_metric([name], BREAKER_VALUES[worker.breaker.state])
        yield waited
        yield breaker

    def _pause_family(self, workers: Mapping[str, DeliveryWorker]) -> Metric:
        from bridge.status import live_pauses  # bridge.status imports the store and config

        paused = GaugeMetricFamily(
            "crm_bridge_connector_paused_seconds",
            "Seconds the connector's calls are still held back, by kind of pause "
            "(circuit_breaker, rate_limit, daily_allocation, concurrency, ...); 0: not paused.",
            labels=["connector", "kind"],
        )
        now = self._clock()
        for name, worker in sorted(workers.items()):
            left = dict.fromkeys(PAUSE_KINDS, 0.0)
            for pause in live_pauses(worker.breaker, worker.connector, now):
                left[pause["kind"]] = max(left.get(pause["kind"], 0.0), pause["seconds_left"])
            for kind, seconds in left.items():
                paused.add_metric([name, kind], seconds)
        return paused

    def _queue_families(self, workers: Mapping[str, DeliveryWorker]) -> Iterable[Metric]:
        if self.queue is None:
            return
        depth = GaugeMetricFamily(
            "crm_bridge_queue_depth",
            "Deliveries waiting, by connector and status (pending, in_flight).",
            labels=["connector", "status"],
        )
        age = GaugeMetricFamily(
            "crm_bridge_queue_oldest_pending_age_seconds",
            "Age of the connector's oldest pending delivery; 0 when none is pending.",
            labels=["connector"],
        )
        now = self._clock()
        empty = QueueStat()
        for name in sorted(set(workers) | set(self.queue)):
            stat = self.queue.get(name, empty)
            depth.add_metric([name, "pending"], stat.pending)
            depth.add_metric([name, "in_flight"], stat.in_flight)
            oldest = stat.oldest_pending_at
            age.add_metric([name], max(0.0, now - oldest) if oldest is not None else 0.0)
        yield depth
        yield age
