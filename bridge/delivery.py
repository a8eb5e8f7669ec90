"""Delivery workers: claim -> connector -> classify -> done / retry later / dead-letter.

One worker per configured connector, with its own claims, concurrency and circuit breaker, so
a CRM that is down or slow never delays another. Each claim takes the next delivery of up to
`max_batch x free slots` contacts; a contact's queued burst of upserts is merged into one write.
What reaches the CRM is decided field by field (bridge.staleness): a delivery older than data
the CRM already has still writes the fields no newer event decided, and never overwrites one
that a newer event did. A status update or an activity whose record does not exist yet waits
for the contact's delivery that creates it (`awaiting`), then ends as its rule's `if_missing`
says. A delivery is marked done only after its connector confirmed the write; a crash before
that leaves it in flight, to be sent again (connectors write by upsert on a natural key, and
log activities once by their key, so a repeat is harmless).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from bridge.breaker import BreakerState, CircuitBreaker
from bridge.errors import (
    ConnectorUnusable,
    DeliveryError,
    LeaseExpired,
    Misconfigured,
    PermanentDelivery,
    RetryableDelivery,
    StoreUnavailable,
)
from bridge.metrics import Metrics
from bridge.models import ClaimedGroup, Delivery, DeliveryStatus, Finish
from bridge.ratelimit import lease_left
from bridge.retry import RetryPolicy
from bridge.staleness import Ledger, Write, after, resolve
from bridge.store import Store
from connectors.base import (
    Activity,
    Connector,
    DeliveryResult,
    LeadUpsert,
    Outcome,
    WritePolicy,
)

log = logging.getLogger("crm_bridge.delivery")

UPSERT_ACTIONS = ("upsert_lead", "upsert_contact", "update_status")


def _check_lease() -> None:
    """Refuse to start a call (or an in-call retry) once the current claim's lease is over."""
    left = lease_left.get()
    if left is not None and left() <= 0:
        raise LeaseExpired("the claim's lease ran out before this attempt")


@dataclass
class Planned:
    """What one claimed group sends: its deliveries, and for upserts the one write the field
    ledger leaves of them (`upsert` None: every field they write was decided by newer events)."""

    group: ClaimedGroup
    deliveries: list[Delivery]
    upsert: LeadUpsert | None = None
    sent: list[Write] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)

    @property
    def nothing_left(self) -> bool:
        return self.upsert is None or (not self.upsert.fields and bool(self.held))


def plan(
    group: ClaimedGroup,
    deliveries: list[Delivery],
    implicit: dict[str, WritePolicy] | None = None,
    ledger: Ledger | None = None,
) -> Planned:
    """The write of a contact's upserts (in sort order) that the ledger allows; fields the CRM
    itself keeps forward-only (`implicit`) get that policy where the rule gave them none."""
    writes = []
    for delivery in deliveries:
        op = delivery.operation
        if not isinstance(op, LeadUpsert):
            continue
        extra = {
            k: p for k, p in (implicit or {}).items() if k in op.fields and k not in op.policies
        }
        if extra:
            op = op.model_copy(update={"policies": {**op.policies, **extra}})
        writes.append((delivery.sort_at, op))
    upsert, sent, held = resolve(group.ledger if ledger is None else ledger, writes)
    if upsert is not None:
        upsert = upsert.model_copy(update={"record_id": group.record_id})
    return Planned(group, deliveries, upsert, sent, held)


def merge(deliveries: list[Delivery], record_id: str | None) -> LeadUpsert:
    """One write holding the latest state of a contact's burst (deliveries in sort order),
    for a contact the ledger knows nothing of."""
    planned = plan(ClaimedGroup(deliveries=deliveries, record_id=record_id), deliveries)
    assert planned.upsert is not None
    return planned.upsert


def crm_held(result: DeliveryResult) -> frozenset[str]:
    """The fields the connector's own policy check left as the CRM holds them."""
    held = set(result.detail.get("held_back") or {})
    if "lifecyclestage_skipped" in result.detail:
        held.add("lifecyclestage")
    return frozenset(held)


def _pause_kind(error: object) -> str | None:
    """What a person must fix before a connector that cannot be used resumes."""
    if isinstance(error, Misconfigured):
        return "configuration"
    return "auth" if isinstance(error, ConnectorUnusable) else None


class DeliveryWorker:
    """Sends one connector's due deliveries, at most `concurrency` calls at a time."""

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
        coalesce: int = 50,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
        pace: Callable[[float], Awaitable[None]] | None = None,
        metrics: Metrics | None = None,
        await_record: float = 900.0,
        gather: float = 0.0,
    ) -> None:
        self.name = name
        self.connector = connector
        if connector.limiter is not None:
            # On a shared store, the connector's rate limit holds for all instances together.
            connector.limiter.share(store.shared_window(name))
        self.breaker = breaker or CircuitBreaker()
        self._store = store
        self._policy = policy
        self._concurrency = concurrency
        self._lease = lease_seconds
        self._poll = poll_interval
        self._coalesce = coalesce
        self._clock = clock
        self._pace = pace
        self._metrics = metrics or Metrics()
        self._await_record = await_record
        self._gather = gather
        self._wake = asyncio.Event()
        self._call_ended = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """New work was stored: look now rather than at the next poll."""
        self._wake.set()

    async def _check_credentials(self) -> None:
        """Ask the connector to verify its credentials once, so that a refused token pauses
        the connector (and shows in readiness) before the first delivery meets it."""
        try:
            await self.connector.verify()
        except ConnectorUnusable as exc:
            self.breaker.record_failure(str(exc), auth=True, kind=_pause_kind(exc))
            log.warning(
                "%s cannot be used until its set-up is fixed: %s",
                self.name,
                exc,
                extra={"action": "connector.auth_failed", "connector": self.name},
            )
        except DeliveryError as exc:
            log.info(
                "%s: could not verify credentials yet: %s",
                self.name,
                exc,
                extra={"action": "connector.verify_failed", "connector": self.name},
            )

    async def run(self) -> None:
        await self._check_credentials()
        while not self._stopping:
            self._wake.clear()
            if (wait := self.breaker.wait_seconds()) > 0:
                await self._idle(min(wait, self._poll))
                continue
            probing = self.breaker.state is BreakerState.HALF_OPEN
            free = self._concurrency - len(self._inflight)
            if probing:
                free = 0 if self._inflight else 1
            if free > 0:
                if self._inflight and self._gather and not probing:
                    # Under load: while a call is in flight, let what is due gather until it
                    # ends (or for `gather` at most), so that batches fill; after an idle
                    # spell (nothing in flight) a lone delivery leaves at once.
                    self._call_ended.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._call_ended.wait(), self._gather)
                limit = 1 if probing else free * self.connector.max_batch
                started = time.perf_counter()
                claimed_at = self._clock()
                try:
                    groups = await self._store.claim(
                        self.name, limit, claimed_at, self._lease, self._coalesce
                    )
                except StoreUnavailable as exc:
                    log.warning(
                        "%s: cannot claim: %s",
                        self.name,
                        exc,
                        extra={"action": "delivery.store_unavailable"},
                    )
                    groups = []
                if groups and self._pace:
                    await self._pace(time.perf_counter() - started)
                for action, batch in self._batches(groups):
                    lease_end = claimed_at + self._lease  # the store's lease_until
                    task = asyncio.create_task(self._deliver(action, batch, lease_end))
                    self._inflight.add(task)
                    task.add_done_callback(self._finished)
                if len(groups) == limit and not probing:
                    continue  # maybe more is due: claim again once a slot frees
            await self._idle(self._poll)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _batches(self, groups: list[ClaimedGroup]) -> Iterator[tuple[str, list[ClaimedGroup]]]:
        by_action: dict[str, list[ClaimedGroup]] = {}
        for group in groups:
            by_action.setdefault(group.head.action, []).append(group)
        for action, items in by_action.items():
            if action in UPSERT_ACTIONS:
                size = self.connector.max_batch
            elif action == "log_activity":
                size = self.connector.max_activity_batch
            else:
                size = 1
            for i in range(0, len(items), max(1, size)):
                yield action, items[i : i + size]

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._call_ended.set()
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"worker-{self.name}")

    async def stop(self, timeout: float) -> None:
        """Stop claiming; let calls in flight finish within `timeout`, then abandon them.

        An abandoned delivery stays in flight in the store and is sent again after restart.
        """
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task  # after this, nothing new is claimed
        if self._inflight:
            _, pending = await asyncio.wait(set(self._inflight), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(self, action: str, groups: list[ClaimedGroup], lease_end: float) -> None:
        """Send a batch claimed under a lease ending at `lease_end` (the worker's clock).

        Nothing is sent once the lease has run out (another instance may have claimed the
        deliveries again and be sending them): such deliveries get no outcome here and stay in
        flight for that claim. The store records an outcome only under its own claim anyway.
        """
        token = lease_left.set(lambda: lease_end - self._clock())
        try:
            await self._deliver_leased(action, groups, lease_end)
        finally:
            lease_left.reset(token)

    def _plan(self, action: str, group: ClaimedGroup) -> Planned:
        if action not in UPSERT_ACTIONS:
            return Planned(group, group.deliveries)  # activities happened: never stale
        return plan(group, group.deliveries, self.connector.implicit_policies())

    async def _deliver_leased(
        self, action: str, groups: list[ClaimedGroup], lease_end: float
    ) -> None:
        finishes: list[Finish] = []
        live: list[Planned] = []
        for group in groups:
            planned = self._plan(action, group)
            if action in UPSERT_ACTIONS and planned.nothing_left:
                finishes.append(self._nothing_left(planned))
            else:
                live.append(planned)
        if live and self._clock() >= lease_end:
            self._lease_lost([d for p in live for d in p.deliveries])
            live = []
        if live:
            outcomes = await self._send(action, live)
            self._update_breaker(outcomes)
            now = self._clock()
            for planned, outcome in zip(live, outcomes, strict=True):
                if isinstance(outcome, LeaseExpired):
                    self._lease_lost(planned.deliveries)
                elif isinstance(outcome, PermanentDelivery) and len(planned.deliveries) > 1:
                    finishes.extend(await self._unmerged(action, planned))
                else:
                    finishes.append(self._finish(planned, outcome, now))
        recorded = await self._record(finishes)
        # Once recorded: counted once (an outcome a later claim overrides is that claim's).
        counted = [f for f in finishes if recorded.intersection(f.delivery_ids)]
        self._metrics.finished(self.name, action, counted)

    def _nothing_left(self, planned: Planned) -> Finish:
        """Every field these deliveries write was decided by a newer event: nothing to send."""
        log.info(
            "%s: nothing to write: newer events decided every field",
            self.name,
            extra={
                "action": "delivery.skipped",
                "connector": self.name,
                "delivery_ids": [d.id for d in planned.deliveries],
                "event_ids": [d.event_id for d in planned.deliveries],
                "contact_key": planned.group.head.contact_key,
                "held_back": planned.held,
            },
        )
        return Finish.of(
            planned.deliveries,
            status=DeliveryStatus.SKIPPED,
            error="nothing to write: newer events decided every field it maps",
            result={"held_back": planned.held},
        )

    async def _unmerged(self, action: str, planned: Planned) -> list[Finish]:
        """A merged write was refused: send its deliveries one by one, in order, so that only
        the ones the CRM refuses fail and the others still land."""
        finishes = []
        ledger = planned.group.ledger
        implicit = self.connector.implicit_policies()
        for delivery in planned.deliveries:
            single = plan(planned.group, [delivery], implicit, ledger)
            if single.nothing_left:
                finishes.append(self._nothing_left(single))
                continue
            (outcome,) = await self._send(action, [single])
            if isinstance(outcome, LeaseExpired):
                self._lease_lost([delivery])
                continue
            finish = self._finish(single, outcome, self._clock())
            if finish.ledger is not None:
                ledger = finish.ledger
                single.group = planned.group.model_copy(update={"ledger": ledger})
            finishes.append(finish)
        return finishes

    def _lease_lost(self, deliveries: list[Delivery]) -> None:
        log.warning(
            "%s: lease ran out before the call's turn; left for the next claim",
            self.name,
            extra={
                "action": "delivery.lease_expired",
                "connector": self.name,
                "delivery_ids": [d.id for d in deliveries],
            },
        )

    async def _record(self, finishes: list[Finish]) -> set[int]:
        """Store the outcomes; while the store cannot write, keep them and try again.

        Given up only at shutdown: the deliveries then stay in flight and are sent again after
        the restart, which the connectors' upserts make harmless.
        """
        if not finishes:
            return set()
        wait = 0.05
        while True:
            try:
                recorded = await self._store.finish(finishes, self._clock())
            except StoreUnavailable as exc:
                if self._stopping:
                    raise
                log.warning(
                    "%s: cannot record outcomes yet: %s",
                    self.name,
                    exc,
                    extra={"action": "delivery.store_unavailable"},
                )
                await asyncio.sleep(wait)
                wait = min(wait * 2, 5.0)
            else:
                lost = [i for f in finishes for i in f.delivery_ids if i not in recorded]
                if lost:
                    # Sent under a lease that ran out and was claimed again meanwhile (the
                    # other claim records the outcome), or deleted meanwhile (`forget`).
                    log.warning(
                        "%s: %d outcomes not recorded: their claim had ended",
                        self.name,
                        len(lost),
                        extra={"action": "delivery.claim_lost", "delivery_ids": lost},
                    )
                return recorded

    async def _call(self, action: str, live: list[Planned], retry: int) -> list[Outcome]:
        if action in UPSERT_ACTIONS:
            leads = [p.upsert for p in live if p.upsert is not None]
            assert len(leads) == len(live)
            return await self.connector.upsert_leads(leads)
        if action == "log_activity":
            activities = []
            for planned in live:
                (delivery,) = planned.deliveries  # activities are never merged
                assert isinstance(delivery.operation, Activity)
                activities.append(
                    delivery.operation.model_copy(
                        # An in-call retry is a later attempt too: the failed call may have
                        # written it.
                        update={
                            "record_id": planned.group.record_id,
                            "attempt": delivery.attempts + retry,
                        }
                    )
                )
            return await self.connector.log_activities(activities)
        return [PermanentDelivery(f"unknown action {action!r}")] * len(live)

    async def _send(self, action: str, live: list[Planned]) -> list[Outcome]:
        """Outcomes per record; a failure of the whole call becomes every record's outcome."""
        try:
            async for attempt in self._policy.in_call():
                with attempt:
                    _check_lease()
                    retry = attempt.retry_state.attempt_number - 1
                    if retry:
                        self._metrics.retried_in_call(self.name)
                    with self._metrics.crm_calls.labels(self.name, action).time():
                        return await self._call(action, live, retry)
        except DeliveryError as exc:
            return [exc] * len(live)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unknown: retryable, but loud and still bounded
            log.exception(
                "%s: unexpected failure",
                self.name,
                extra={"action": "delivery.error", "connector": self.name},
            )
            return [RetryableDelivery(f"{type(exc).__name__}: {exc}")] * len(live)
        raise AssertionError("unreachable: tenacity re-raises the last failure")

    def _update_breaker(self, outcomes: list[Outcome]) -> None:
        outcomes = [o for o in outcomes if not isinstance(o, LeaseExpired)]  # nothing sent
        if not outcomes:
            return
        if any(isinstance(o, DeliveryResult) or isinstance(o, PermanentDelivery) for o in outcomes):
            # The CRM answered about records: it is up, even if it refused some.
            self.breaker.record_success()
            return
        first = outcomes[0]
        before = self.breaker.state
        unusable = isinstance(first, ConnectorUnusable)
        self.breaker.record_failure(str(first), auth=unusable, kind=_pause_kind(first))
        if self.breaker.state is BreakerState.OPEN and before is not BreakerState.OPEN:
            log.warning(
                "%s paused for %.0fs %s: %s",
                self.name,
                self.breaker.wait_seconds(),
                "until its set-up is fixed" if unusable else "after repeated failures",
                first,
                extra={"action": "connector.breaker_open", "connector": self.name},
            )

    def _finish(self, planned: Planned, outcome: Outcome, now: float) -> Finish:
        group, fresh = planned.group, planned.deliveries
        ids = [d.id for d in fresh]
        context = {
            "delivery_ids": ids,
            "event_ids": [d.event_id for d in fresh],
            "rules": sorted({d.rule for d in fresh}),
            "connector": self.name,
            "contact_key": group.head.contact_key,
        }
        if isinstance(outcome, DeliveryResult):
            result = outcome.model_dump(mode="json")
            if len(ids) > 1:
                result["coalesced"] = ids
            if planned.held:
                result["detail"] = {**outcome.detail, "decided_by_newer": planned.held}
            if outcome.dry_run:
                log.info(
                    "dry run: would write to %s",
                    self.name,
                    extra={"action": "delivery.dry_run", **outcome.detail, **context},
                )
                return Finish.of(fresh, status=DeliveryStatus.DRY_RUN, result=result)
            if outcome.missing:
                return self._missing(fresh, outcome, result, now, context)
            if outcome.skipped is not None:
                log.info(
                    "%s: nothing written: %s",
                    self.name,
                    outcome.skipped,
                    extra={"action": "delivery.skipped", **context},
                )
                return Finish.of(
                    fresh,
                    status=DeliveryStatus.SKIPPED,
                    result=result,
                    error=outcome.skipped,
                )
            log.info(
                "delivered to %s: record %s",
                self.name,
                outcome.record_id,
                extra={
                    "action": "delivery.done",
                    "record_id": outcome.record_id,
                    "record_created": outcome.created,
                    **context,
                },
            )
            return Finish.of(
                fresh,
                status=DeliveryStatus.DONE,
                result=result,
                connector=self.name,
                contact_key=group.head.contact_key,
                record_id=outcome.record_id,
                applied_sort_at=max(d.sort_at for d in fresh),
                ledger=after(group.ledger, planned.sent, crm_held(outcome))
                if planned.sent
                else None,
            )
        if isinstance(outcome, PermanentDelivery):
            log.warning(
                "%s refused the record: %s",
                self.name,
                outcome,
                extra={"action": "delivery.dead", **context},
            )
            return Finish.of(
                fresh,
                status=DeliveryStatus.DEAD,
                error=str(outcome),
                result={"detail": outcome.detail} if outcome.detail else None,
            )
        retry_after = outcome.retry_after if isinstance(outcome, RetryableDelivery) else None
        attempts = max(d.attempts for d in fresh)
        horizon_start = min(d.horizon_start for d in fresh)
        if isinstance(outcome, ConnectorUnusable):
            # The breaker holds the whole connector until a probe gets through; the delivery
            # must be due by then, not after its own backoff.
            paused_until = now + self.breaker.auth_cooldown
            due = paused_until if paused_until <= horizon_start + self._policy.horizon else None
        else:
            due = self._policy.next_attempt(attempts, horizon_start, now, retry_after)
        if due is None:
            log.warning(
                "%s: giving up after %d attempts: %s",
                self.name,
                attempts,
                outcome,
                extra={"action": "delivery.dead", **context},
            )
            return Finish.of(
                fresh,
                status=DeliveryStatus.DEAD,
                error=f"gave up after {attempts} attempts: {outcome}",
            )
        log.info(
            "%s: retry in %.0fs: %s",
            self.name,
            due - now,
            outcome,
            extra={"action": "delivery.retry", "attempts": attempts, **context},
        )
        return Finish.of(
            fresh, status=DeliveryStatus.PENDING, error=str(outcome), next_attempt_at=due
        )

    def _missing(
        self,
        fresh: list[Delivery],
        outcome: DeliveryResult,
        result: dict[str, object],
        now: float,
        context: dict[str, object],
    ) -> Finish:
        """No record to update or log on: wait for the contact's delivery that creates it
        (released the moment it lands), then end as the rule's `if_missing` says."""
        if_missing = fresh[0].operation.if_missing
        since = min(float((d.result or {}).get("awaiting_since", now)) for d in fresh)
        deadline = since + self._await_record
        reason = outcome.skipped or "no record"
        if if_missing != "skip" and now < deadline:
            log.info(
                "%s: %s; waiting up to %.0fs for the delivery that creates it",
                self.name,
                reason,
                deadline - now,
                extra={"action": "delivery.awaiting", **context},
            )
            return Finish.of(
                fresh,
                status=DeliveryStatus.AWAITING,
                error=reason,
                next_attempt_at=deadline,
                result={**result, "awaiting_since": since},
            )
        waited = f" (waited {now - since:.0f}s for it)" if if_missing != "skip" else ""
        if if_missing == "dead_letter":
            log.warning(
                "%s: %s%s",
                self.name,
                reason,
                waited,
                extra={"action": "delivery.dead", **context},
            )
            return Finish.of(fresh, status=DeliveryStatus.DEAD, error=reason + waited)
        log.info(
            "%s: nothing written: %s%s",
            self.name,
            reason,
            waited,
            extra={"action": "delivery.skipped", **context},
        )
        return Finish.of(fresh, status=DeliveryStatus.SKIPPED, result=result, error=reason + waited)
