"""The one place that decides whether a failed delivery goes again, and when.

Two layers: a short in-call retry with tenacity for network blips (seconds), then a
reschedule in the store with exponential backoff and full jitter (minutes to hours),
never sooner than the CRM's `retry_after`, until the horizon passes and the delivery is
dead-lettered.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type
from tenacity.wait import wait_random_exponential

from bridge.config import DeliveryConfig
from bridge.errors import RetryableDelivery


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff settings, from the `delivery:` section of the config."""

    in_call_attempts: int = 3
    in_call_wait: float = 0.5
    in_call_wait_max: float = 5.0
    backoff_initial: float = 30.0
    backoff_max: float = 3600.0
    horizon: float = 86400.0

    @classmethod
    def from_config(cls, config: DeliveryConfig) -> RetryPolicy:
        return cls(
            in_call_attempts=config.in_call_attempts,
            in_call_wait=config.in_call_wait,
            in_call_wait_max=config.in_call_wait_max,
            backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
            horizon=config.horizon,
        )

    def in_call(self) -> AsyncRetrying:
        """Retry a retryable failure a few times at once, unless the CRM asks for a long wait."""
        backoff = wait_random_exponential(multiplier=self.in_call_wait, max=self.in_call_wait_max)

        def wait(state: RetryCallState) -> float:
            return max(backoff(state), _retry_after(state) or 0.0)

        def stop(state: RetryCallState) -> bool:
            # A wait longer than the in-call cap belongs to the store's schedule, not to a
            # worker slot held open.
            too_long = (_retry_after(state) or 0.0) > self.in_call_wait_max
            return too_long or state.attempt_number >= self.in_call_attempts

        return AsyncRetrying(
            stop=stop, wait=wait, retry=retry_if_exception_type(RetryableDelivery), reraise=True
        )

    def next_attempt(
        self, attempts: int, created_at: float, now: float, retry_after: float | None
    ) -> float | None:
        """When to try a delivery again after `attempts` failed claims; None: give up."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** max(attempts - 1, 0))
        delay = max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)
        due = now + delay
        if due > created_at + self.horizon:
            return None
        return due


def _retry_after(state: RetryCallState) -> float | None:
    exc = state.outcome.exception() if state.outcome else None
    return exc.retry_after if isinstance(exc, RetryableDelivery) else None
