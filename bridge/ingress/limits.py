"""Limits on what one request, one source or everyone together may cost the daemon.

Every refusal is a PayloadError with a stable code; the server turns it into a JSON answer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bridge.errors import PayloadError


def check_json_shape(data: Any, max_depth: int, max_fields: int) -> None:
    """Refuse a parsed JSON document nested deeper than `max_depth` or holding more than
    `max_fields` keys and array items in all: both cost memory and time in every later step
    (validation, rules, storage) out of proportion to the body's size."""
    fields = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > max_depth:
            raise PayloadError(400, "json_too_deep", f"JSON nested deeper than {max_depth} levels")
        fields += len(value)
        if fields > max_fields:
            raise PayloadError(
                400, "json_too_many_fields", f"JSON holds more than {max_fields} fields"
            )
        stack.extend((child, depth + 1) for child in children)


class TokenBucket:
    """`rate` requests a second on average, up to `burst` at once. In memory: one daemon owns
    a SQLite store, and the bucket only protects that daemon."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self._clock = rate, float(burst), clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> float:
        """Take one token: 0 when there was one, else the seconds until there will be."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate


class RateLimits:
    """One bucket per source, rebuilt when a reload changes the source's limit."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[tuple[float, int], TokenBucket]] = {}

    def check(self, source: str, rate: float, burst: int) -> None:
        """Raise 429 `rate_limited` (with the seconds to wait) when the source is over."""
        known = self._buckets.get(source)
        if known is None or known[0] != (rate, burst):
            known = ((rate, burst), TokenBucket(rate, burst, self._clock))
            self._buckets[source] = known
        wait = known[1].take()
        if wait > 0:
            raise PayloadError(
                429,
                "rate_limited",
                f"source {source!r} is over its rate limit; retry later",
                retry_after=max(1, math.ceil(wait)),
            )


def overloaded() -> PayloadError:
    return PayloadError(
        503, "overloaded", "too many requests in progress; retry shortly", retry_after=1
    )
