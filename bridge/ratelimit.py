"""Client-side rate limiting: stay under the CRM's documented limit instead of hitting 429s.

`RateLimiter` is a sliding-window log: at most `requests` calls start in any `per_seconds`
window, which matches HubSpot's rolling ten-second limit exactly (a token bucket would let a
full bucket plus a window's refill through and earn a 429). The CRM's own counters (response
headers) are authoritative, because other integrations share the same allowance: `observe`
folds them in, and `pause` honours an explicit Retry-After.

Several daemons on one PostgreSQL store share each connector's allowance: `share` hands the
limiter the store's window for the connector (`Store.shared_window`), and every start then also
needs a slot in that window, which the database serialises. The local log still applies (it
holds the CRM's phantoms). A pause (a 429's Retry-After) is published to the others as soon as
`pause` is called, and a pause longer than one window, this instance's or one published by
another, fails fast with RetryableDelivery (the delivery is rescheduled) rather than holding a
worker, and its claim's lease, asleep in `acquire`. `pauses` reports the current pause, with
the kind and reason its `pause` call gave, for a connector's `pauses()` (status, metrics).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from bridge.errors import LeaseExpired, RetryableDelivery, StoreUnavailable

if TYPE_CHECKING:
    from bridge.store.base import SharedWindow
    from connectors.base import Pause

log = logging.getLogger("crm_bridge.ratelimit")
# `connectors.base.Pause.kind`: what a limiter's pause is for, as status and metrics show it.
PauseKind = Literal["rate_limit", "daily_allocation", "concurrency", "configuration", "auth"]


# Seconds left in the lease of the delivery the current task sends, or None: a delivery worker
# sets it around its connector calls, and `acquire` refuses a slot that comes too late, since
# another instance may claim (and send) the delivery once the lease has run out.
lease_left: contextvars.ContextVar[Callable[[], float] | None] = contextvars.ContextVar(
    "crm_bridge_lease_left", default=None
)


class RateLimiter:
    """At most `requests` starts per rolling `per_seconds`; FIFO among waiters."""

    def __init__(
        self,
        requests: int,
        per_seconds: float,
        *,
        margin: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if requests < 1 or per_seconds <= 0:
            raise ValueError("a rate limit needs requests >= 1 and per_seconds > 0")
        self.requests = requests
        # The CRM counts a call when it reaches it, a little after we start it: a start is
        # kept in the log `margin` seconds longer than the CRM's window, or the first call of
        # each new window can still be counted in the old one and earn a 429.
        self.per_seconds = per_seconds + margin
        self._clock = clock
        self._sleep = sleep
        self._starts: collections.deque[float] = collections.deque()
        self._paused_until = 0.0
        self._pause_kind: PauseKind = "rate_limit"
        self._pause_reason = ""
        self._lock = asyncio.Lock()
        self.waited_seconds = 0.0  # total time callers spent waiting here, for metrics
        self._shared: SharedWindow | None = None
        self._unpublished_pause = False  # publishing failed (or no loop ran): at next acquire
        self._publishing: set[asyncio.Task[None]] = set()

    def share(self, window: SharedWindow | None) -> None:
        """Count starts in `window` too: the allowance every instance on the store shares."""
        self._shared = window

    def _delay(self, now: float) -> float:
        while self._starts and self._starts[0] <= now - self.per_seconds:
            self._starts.popleft()
        if now < self._paused_until:
            return self._paused_until - now
        if len(self._starts) < self.requests:
            return 0.0
        return self._starts[0] + self.per_seconds - now

    async def acquire(self) -> float:
        """Wait for a slot and take it; returns the seconds waited."""
        waited = 0.0
        left = lease_left.get()
        async with self._lock:
            while (delay := await self._next_delay()) > 0:
                if (paused := self.paused_for()) > self.per_seconds:
                    # Rescheduled in the store, not slept out here holding a worker and a lease.
                    raise RetryableDelivery(
                        f"rate limit: paused for {paused:.0f}s", retry_after=paused
                    )
                if left is not None and delay >= left():
                    raise LeaseExpired(f"the claim's lease ends before a slot frees ({delay:.1f}s)")
                await self._sleep(delay)
                waited += delay
            if left is not None and left() <= 0:
                raise LeaseExpired("the claim's lease ended while waiting for a slot")
            self._starts.append(self._clock())
        self.waited_seconds += waited
        return waited

    async def _next_delay(self) -> float:
        if self._shared is not None and self._unpublished_pause:
            # Tell the other instances first: they would otherwise earn 429s meanwhile.
            self._unpublished_pause = False
            await self._shared.take(self.requests, self.per_seconds, self.paused_for())
        delay = self._delay(self._clock())
        if delay > 0 or self._shared is None:
            return delay
        wait = await self._shared.take(self.requests, self.per_seconds, 0.0)
        if wait > self.per_seconds:
            # Longer than a window: a pause another instance published. Held here too, so
            # that the calls after this one fail fast without asking the store.
            if self._clock() + wait > self._paused_until:
                self._pause_kind = "rate_limit"
                self._pause_reason = "another instance sharing this limit paused it"
            self._paused_until = max(self._paused_until, self._clock() + wait)
        return wait

    def paused_for(self) -> float:
        """Seconds the current pause still lasts; 0 when not paused."""
        return max(0.0, self._paused_until - self._clock())

    def pause(self, seconds: float, reason: str = "", kind: PauseKind = "rate_limit") -> None:
        """Start nothing for `seconds` (the CRM said Retry-After, or its window is spent);
        `reason` and `kind` are what `pauses` reports (the pause that ends last wins).

        With a shared window the pause is published to the other instances at once (in a
        task: the connectors call this from their error paths, which do not wait for it)."""
        until = self._clock() + seconds
        if until >= self._paused_until:
            self._pause_kind = kind
            self._pause_reason = reason or f"the CRM asked for a pause of {seconds:.0f}s"
        self._paused_until = max(self._paused_until, until)
        if self._shared is None:
            return
        try:
            task = asyncio.get_running_loop().create_task(self._publish())
        except RuntimeError:  # no loop runs here: the next acquire publishes it
            self._unpublished_pause = True
            return
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self) -> None:
        assert self._shared is not None
        try:
            await self._shared.take(self.requests, self.per_seconds, self.paused_for())
        except StoreUnavailable as exc:
            self._unpublished_pause = True  # the next acquire tries again
            log.warning(
                "could not share a rate-limit pause yet: %s",
                exc,
                extra={"action": "ratelimit.publish_failed"},
            )

    def pauses(self, wall: Callable[[], float] = time.time) -> list[Pause]:
        """The current pause as a connector reports it (`Connector.pauses`); [] when none.
        `until` is wall-clock time (`wall`), as status and metrics show it."""
        from connectors.base import Pause  # connectors.base imports this module

        left = self.paused_for()
        if left <= 0:
            return []
        reason = self._pause_reason or "paused"
        return [Pause(kind=self._pause_kind, reason=reason, until=wall() + left)]

    def observe(self, remaining: int | None, window_seconds: float | None = None) -> None:
        """Fold in the CRM's count of what is left in the current window.

        When others use the same allowance the CRM has fewer left than we think: fill our log
        with phantom starts so that we slow down before the CRM answers 429. The phantoms are
        dated like our oldest start (or now, when we have none): the others' calls are
        somewhere in the window, and that is the earliest a slot can free. No pause: the
        rolling window frees slots one by one, and the log follows it. When the CRM agrees
        with our log (or has more left: it has not counted our latest calls yet), the log
        decides.
        """
        if remaining is None:
            return
        now = self._clock()
        self._delay(now)  # drop expired starts
        missing = (self.requests - len(self._starts)) - max(remaining, 0)
        if missing <= 0:
            return
        stamp = self._starts[0] if self._starts else now
        self._starts.extendleft([stamp] * missing)
