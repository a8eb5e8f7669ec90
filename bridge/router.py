"""The router: stored events -> rules -> stored deliveries.

It runs beside the HTTP handlers, so the webhook is acknowledged as soon as the raw event is
durable, and rule evaluation, in batches, never holds a request. Routing an event and storing
its deliveries happen in one transaction: after a crash an event is either routed with all its
deliveries or not at all, and is then routed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import orjson

from bridge.errors import StoreUnavailable
from bridge.models import Routed, StoredEvent
from bridge.rules import RuleSet
from bridge.store import Store

log = logging.getLogger("crm_bridge.router")


class Router:
    """Routes stored events in batches of up to `batch`, oldest first."""

    def __init__(
        self,
        store: Store,
        rules: RuleSet,
        *,
        on_routed: Callable[[set[str]], None],
        batch: int = 100,
        poll_interval: float = 1.0,
        delay: float = 0.0,
        clock: Callable[[], float] = time.time,
        pace: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        self.rules = rules  # swapped whole on reload; a batch uses the one it started with
        self._store = store
        self._on_routed = on_routed
        self._batch = batch
        self._poll = poll_interval
        self._delay = delay
        self._clock = clock
        self._pace = pace
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="router")

    async def stop(self) -> None:
        """Finish the batch under way, then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            started = time.perf_counter()
            try:
                routed = await self.route_once()
            except StoreUnavailable as exc:
                # The events stay stored and unrouted: try again at the next poll.
                log.warning("routing paused: %s", exc, extra={"action": "router.store_unavailable"})
                routed = 0
            except Exception:
                # A bug must not end routing for good: it is logged, the batch stays unrouted
                # and is tried again at the next poll.
                log.exception("routing failed", extra={"action": "router.failed"})
                routed = 0
            if routed:
                if self._pace:
                    await self._pace(time.perf_counter() - started)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def route_once(self) -> int:
        """Route one batch; the number of events routed."""
        events = await self._store.unrouted(self._batch)
        if not events:
            return 0
        rules = self.rules
        routed = [self.evaluate(rules, event) for event in events]
        await self._store.route(routed, self._clock(), self._delay)
        self._on_routed({d.connector for r in routed for d in r.deliveries})
        # The one log line per event: what the rules made of it.
        for event, r in zip(events, routed, strict=True):
            log.info(
                "event %s: %s",
                r.event_id,
                f"{len(r.deliveries)} deliveries" + "".join(f"; {n}" for n in r.notes),
                extra={
                    "action": "event.routed",
                    "event_id": r.event_id,
                    "source": event.source,
                    "deliveries": [[d.rule, d.connector] for d in r.deliveries],
                    "notes": r.notes,
                },
            )
        return len(events)

    @staticmethod
    def evaluate(rules: RuleSet, event: StoredEvent) -> Routed:
        data = orjson.loads(event.body)
        contact = rules.contact_of(data)
        try:
            evaluation = rules.evaluate(
                rules.context(event.source, data, contact, event.received_at),
                event.id,
                event.sort_at,
            )
        except Exception as exc:  # one event's failure must not stop routing
            # The rules turn a user's expression failing into a note; anything else is a bug,
            # logged with its traceback. The event is kept, routed with nothing to send, so
            # every later event is still routed; `backfill` can queue it again once fixed.
            log.exception(
                "event %s: the rules failed on it",
                event.id,
                extra={"action": "router.rules_failed", "event_id": event.id},
            )
            return Routed(
                event_id=event.id,
                sort_at=event.sort_at,
                deliveries=[],
                notes=[f"the rules failed on this event ({type(exc).__name__}: {exc})"],
            )
        notes = list(evaluation.notes)
        if not evaluation.deliveries and not notes:
            notes.append(f"no rule matched type {data.get('type')!r}")
        return Routed(
            event_id=event.id, sort_at=event.sort_at, deliveries=evaluation.deliveries, notes=notes
        )
