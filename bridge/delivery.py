"""Delivery workers: claim -> connector -> classify -> done / retry later / dead-letter.

One worker per configured connector, each with its own claims and concurrency, so a CRM that
is down or slow never delays another. A delivery is marked done only after its connector
confirms the write; a crash before that leaves it in flight, to be sent again (connectors
write by upsert on a natural key, so a repeat is harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from bridge.errors import PermanentDelivery, RetryableDelivery
from bridge.models import Delivery, DeliveryStatus
from bridge.retry import RetryPolicy
from bridge.store import Store
from connectors.base import Connector, DeliveryResult

log = logging.getLogger("crm_bridge.delivery")


class DeliveryWorker:
    """Sends one connector's due deliveries, at most `concurrency` at a time."""

    def __init__(
        self,
        name: str,
        connector: Connector,
        store: Store,
        policy: RetryPolicy,
        *,
        concurrency: int,
        lease_seconds: float,
        poll_interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.connector = connector
        self._store = store
        self._policy = policy
        self._concurrency = concurrency
        self._lease = lease_seconds
        self._poll = poll_interval
        self._clock = clock
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()

    def wake(self) -> None:
        """New work was stored: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            free = self._concurrency - len(self._inflight)
            if free > 0:
                claimed = await self._store.claim(self.name, free, self._clock(), self._lease)
                for delivery in claimed:
                    task = asyncio.create_task(self._deliver(delivery))
                    self._inflight.add(task)
                    task.add_done_callback(self._finished)
                if len(claimed) == free:
                    continue  # maybe more is due: claim again once a slot frees
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def stop(self, timeout: float) -> None:
        """Stop claiming; let calls in flight finish within `timeout`, then abandon them.

        An abandoned delivery stays in flight in the store and is sent again after restart.
        """
        self._stopping = True
        self._wake.set()
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(self, delivery: Delivery) -> None:
        context = {
            "delivery_id": delivery.id,
            "event_id": delivery.event_id,
            "connector": self.name,
        }
        try:
            async for attempt in self._policy.in_call():
                with attempt:
                    result = await self._send(delivery)
        except PermanentDelivery as exc:
            await self._store.dead_letter(delivery.id, str(exc), self._clock())
            log.warning(
                "delivery %s refused by %s: %s",
                delivery.id,
                self.name,
                exc,
                extra={"action": "delivery.dead", **context},
            )
        except RetryableDelivery as exc:
            await self._reschedule(delivery, str(exc), exc.retry_after, context)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception(
                "delivery %s failed unexpectedly",
                delivery.id,
                extra={"action": "delivery.error", **context},
            )
            await self._reschedule(delivery, f"{type(exc).__name__}: {exc}", None, context)
        else:
            status = DeliveryStatus.DRY_RUN if result.dry_run else DeliveryStatus.DONE
            await self._store.complete(
                delivery.id, status, result.model_dump(mode="json"), self._clock()
            )
            if result.dry_run:
                log.info(
                    "dry run: would write to %s",
                    self.name,
                    extra={"action": "delivery.dry_run", **result.detail, **context},
                )
            else:
                log.info(
                    "delivery %s done: %s record %s",
                    delivery.id,
                    self.name,
                    result.record_id,
                    extra={
                        "action": "delivery.done",
                        "record_id": result.record_id,
                        "record_created": result.created,
                        **context,
                    },
                )

    async def _send(self, delivery: Delivery) -> DeliveryResult:
        if delivery.action in ("upsert_lead", "upsert_contact"):
            return await self.connector.upsert_lead(delivery.operation)
        raise PermanentDelivery(f"unknown action {delivery.action!r}")

    async def _reschedule(
        self, delivery: Delivery, error: str, retry_after: float | None, context: dict[str, object]
    ) -> None:
        now = self._clock()
        due = self._policy.next_attempt(delivery.attempts, delivery.created_at, now, retry_after)
        if due is None:
            await self._store.dead_letter(
                delivery.id, f"gave up after {delivery.attempts} attempts: {error}", now
            )
            log.warning(
                "delivery %s dead after %d attempts: %s",
                delivery.id,
                delivery.attempts,
                error,
                extra={"action": "delivery.dead", **context},
            )
            return
        await self._store.retry_later(delivery.id, due, error, now)
        log.info(
            "delivery %s will be retried in %.0fs: %s",
            delivery.id,
            due - now,
            error,
            extra={"action": "delivery.retry", "attempts": delivery.attempts, **context},
        )
