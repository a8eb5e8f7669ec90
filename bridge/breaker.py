"""A circuit breaker per connector: stop hammering a CRM that keeps failing.

closed -> (threshold consecutive failures) -> open for a cool-down -> half-open: one probe
-> closed on success, open again (cool-down doubled, up to a cap) on failure. A refused
login opens it for the authentication pause straight away. While open, deliveries simply stay
queued: nothing is dropped.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        threshold: int = 5,
        cooldown: float = 30.0,
        cooldown_max: float = 600.0,
        auth_cooldown: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.cooldown_max = cooldown_max
        self.auth_cooldown = auth_cooldown
        self._clock = clock
        self.failures = 0
        self.opened_until = 0.0
        self._current_cooldown = cooldown
        self._tripped = False
        self.reason: str | None = None  # why it opened, for readiness and status
        self.kind: str | None = None  # what a person must fix: "auth", "configuration"
        self.auth_failed = False

    @property
    def state(self) -> BreakerState:
        if not self._tripped:
            return BreakerState.CLOSED
        if self._clock() < self.opened_until:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def wait_seconds(self) -> float:
        """How long until a probe may go; 0 when closed or half-open."""
        return max(0.0, self.opened_until - self._clock()) if self._tripped else 0.0

    def record_success(self) -> None:
        self.failures = 0
        self._tripped = False
        self._current_cooldown = self.cooldown
        self.reason = None
        self.kind = None
        self.auth_failed = False

    def record_failure(self, reason: str, *, auth: bool = False, kind: str | None = None) -> None:
        """A failed call; `auth` (the connector cannot be used until a person fixes its
        credentials or set-up, `kind` says which) opens it for the authentication pause."""
        self.failures += 1
        if auth:
            self._open(self.auth_cooldown, reason)
            self.auth_failed = True
            self.kind = kind or "auth"
        elif self._tripped:
            # A failed probe: wait longer next time.
            self._current_cooldown = min(self._current_cooldown * 2, self.cooldown_max)
            self._open(self._current_cooldown, reason)
        elif self.failures >= self.threshold:
            self._open(self._current_cooldown, reason)

    def reset(self) -> None:
        """The config was reloaded: give the connector a fresh chance."""
        self.record_success()

    def _open(self, seconds: float, reason: str) -> None:
        self._tripped = True
        self.opened_until = self._clock() + seconds
        self.reason = reason
