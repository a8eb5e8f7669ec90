"""The sliding-window limiter, on a fake clock whose sleep only moves the clock."""

from __future__ import annotations

import asyncio

import pytest

from bridge.errors import RetryableDelivery
from bridge.ratelimit import RateLimiter


class FakeTime:
    """A clock that `sleep` advances; it yields once so that other tasks run in between."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def limiter(
    requests: int = 3, per_seconds: float = 10.0, margin: float = 0.0
) -> tuple[RateLimiter, FakeTime]:
    clock = FakeTime()
    return RateLimiter(requests, per_seconds, margin=margin, clock=clock, sleep=clock.sleep), clock


async def test_never_more_than_n_starts_in_any_window():
    rl, clock = limiter(requests=3, per_seconds=10.0)
    starts: list[float] = []

    async def call(pause_after: float) -> None:
        await rl.acquire()
        starts.append(clock())
        clock.now += pause_after  # the caller's own work takes time too

    # Uneven gaps, concurrent callers: the window must hold for every start.
    await asyncio.gather(*(call(gap) for gap in [0, 0.5, 3, 0, 7, 0.1, 0, 0, 12, 0, 0, 0, 0]))
    assert len(starts) == 13
    assert starts == sorted(starts)
    for i in range(len(starts) - 3):
        assert starts[i + 3] - starts[i] >= 10.0, (i, starts)
    assert rl.waited_seconds == pytest.approx(sum(clock.slept))
    assert rl.waited_seconds > 0


async def test_a_full_window_waits_exactly_until_the_oldest_start_leaves_it():
    rl, clock = limiter(requests=2, per_seconds=10.0)
    assert await rl.acquire() == 0
    clock.now += 4
    assert await rl.acquire() == 0
    assert await rl.acquire() == pytest.approx(6.0)  # the first start leaves at +10
    assert clock() == pytest.approx(1010.0)


async def test_waiters_are_served_first_in_first_out():
    rl, _ = limiter(requests=1, per_seconds=1.0)
    order: list[int] = []

    async def call(i: int) -> None:
        await rl.acquire()
        order.append(i)

    tasks = []
    for i in range(8):
        tasks.append(asyncio.create_task(call(i)))
        await asyncio.sleep(0)  # task i queues before task i + 1 exists
    await asyncio.gather(*tasks)
    assert order == list(range(8))


async def test_pause_holds_every_start_until_it_ends():
    rl, _ = limiter(requests=100, per_seconds=10.0)
    rl.pause(7.0)
    assert rl.paused_for() == pytest.approx(7.0)
    assert await rl.acquire() == pytest.approx(7.0)
    assert rl.paused_for() == 0
    # a shorter pause never cuts a longer one short
    rl.pause(30.0)
    rl.pause(5.0)
    assert rl.paused_for() == pytest.approx(30.0)


async def test_observe_slows_down_when_the_crm_has_fewer_left_than_we_think():
    rl, _ = limiter(requests=10, per_seconds=10.0)
    await rl.acquire()
    rl.observe(remaining=2)  # others spent most of the window: 2 left, not our 9
    assert await rl.acquire() == 0
    assert await rl.acquire() == 0
    assert await rl.acquire() == pytest.approx(10.0)


async def test_observe_never_speeds_up_and_ignores_missing_headers():
    rl, _ = limiter(requests=2, per_seconds=10.0)
    await rl.acquire()
    await rl.acquire()
    rl.observe(remaining=50)  # the CRM's own count is higher than our share: keep ours
    rl.observe(remaining=None)
    assert await rl.acquire() == pytest.approx(10.0)


async def test_nothing_left_waits_for_the_oldest_slot_to_free_not_a_whole_window():
    rl, clock = limiter(requests=10, per_seconds=10.0)
    for _ in range(3):
        await rl.acquire()  # ours, at t=0
    clock.now += 6
    rl.observe(remaining=0)  # others took the other 7 meanwhile
    assert rl.paused_for() == 0
    # the others' calls are taken to be as old as our oldest: a slot frees at t=10
    assert await rl.acquire() == pytest.approx(4.0)


async def test_nothing_left_and_no_calls_of_ours_waits_a_window():
    rl, _ = limiter(requests=10, per_seconds=10.0)
    rl.observe(remaining=0)
    assert await rl.acquire() == pytest.approx(10.0)


async def test_a_margin_keeps_starts_longer_than_the_crms_window():
    rl, _ = limiter(requests=1, per_seconds=10.0, margin=0.5)
    await rl.acquire()
    assert await rl.acquire() == pytest.approx(10.5)


async def test_observe_agreeing_with_our_own_count_adds_no_pause():
    rl, clock = limiter(requests=2, per_seconds=10.0)
    await rl.acquire()
    clock.now += 9
    await rl.acquire()
    rl.observe(remaining=0, window_seconds=10.0)  # the CRM saw exactly our two
    assert rl.paused_for() == 0
    assert await rl.acquire() == pytest.approx(1.0)  # the first start leaves the window


def test_a_limit_needs_at_least_one_request_and_a_window():
    with pytest.raises(ValueError):
        RateLimiter(0, 10.0)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)


class FakeWindow:
    """A shared window on the fake clock, as another instance's limiter would see it."""

    def __init__(self, clock: FakeTime) -> None:
        self.clock = clock
        self.starts: list[float] = []
        self.paused_until = 0.0
        self.pauses: list[float] = []

    async def take(self, requests: int, per_seconds: float, pause: float) -> float:
        now = self.clock.now
        if pause > 0:
            self.pauses.append(pause)
            self.paused_until = max(self.paused_until, now + pause)
        if self.paused_until > now:
            return self.paused_until - now
        self.starts = [s for s in self.starts if s > now - per_seconds]
        if len(self.starts) < requests:
            self.starts.append(now)
            return 0.0
        return self.starts[0] + per_seconds - now


async def test_a_shared_window_limits_all_instances_together():
    clock = FakeTime()
    window = FakeWindow(clock)
    # Two instances, each with its own limiter of 3 per 10 s, sharing one window.
    limiters = [RateLimiter(3, 10.0, clock=clock, sleep=clock.sleep) for _ in range(2)]
    for rl in limiters:
        rl.share(window)
    starts: list[float] = []

    async def call(rl: RateLimiter) -> None:
        await rl.acquire()
        starts.append(clock.now)

    await asyncio.gather(*(call(limiters[i % 2]) for i in range(9)))
    assert sorted(starts) == [1000.0] * 3 + [1010.0] * 3 + [1020.0] * 3


async def test_a_pause_is_published_to_the_shared_window_at_once():
    clock = FakeTime()
    window = FakeWindow(clock)
    first = RateLimiter(3, 10.0, clock=clock, sleep=clock.sleep)
    first.share(window)
    # This instance saw a 429 with Retry-After: 30, and its connector failed fast: no acquire.
    first.pause(30.0)
    await asyncio.gather(*first._publishing)
    assert window.pauses == [30.0] and window.paused_until == 1030.0


async def test_a_pause_longer_than_a_window_fails_fast():
    rl, clock = limiter(requests=3, per_seconds=10.0)
    rl.pause(30.0)
    with pytest.raises(RetryableDelivery) as refused:
        await rl.acquire()
    assert refused.value.retry_after == pytest.approx(30.0)
    assert clock.slept == []  # nobody slept out the pause holding a worker and its lease


async def test_a_long_pause_published_by_another_instance_becomes_a_local_one():
    clock = FakeTime()
    window = FakeWindow(clock)
    window.paused_until = 1030.0  # another instance saw a 429 with Retry-After: 30
    rl = RateLimiter(3, 10.0, clock=clock, sleep=clock.sleep)
    rl.share(window)
    with pytest.raises(RetryableDelivery) as refused:
        await rl.acquire()
    assert refused.value.retry_after == pytest.approx(30.0)
    assert clock.slept == [] and rl.paused_for() == pytest.approx(30.0)
    # Later calls fail fast here, without asking the shared window again.
    window.paused_until = 0.0
    with pytest.raises(RetryableDelivery):
        await rl.acquire()
    assert window.starts == []


async def test_a_short_shared_wait_is_waited_out():
    clock = FakeTime()
    window = FakeWindow(clock)
    window.paused_until = 1004.0  # within one window: cheaper to wait than to reschedule
    rl = RateLimiter(3, 10.0, clock=clock, sleep=clock.sleep)
    rl.share(window)
    assert await rl.acquire() == pytest.approx(4.0)
    assert window.starts == [1004.0]
