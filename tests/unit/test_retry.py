import pytest

from bridge.errors import PermanentDelivery, RetryableDelivery
from bridge.retry import RetryPolicy

POLICY = RetryPolicy(
    in_call_attempts=3,
    in_call_wait=0.0,
    in_call_wait_max=0.01,
    backoff_initial=30,
    backoff_max=3600,
    horizon=86400,
)


@pytest.mark.parametrize(
    ("attempts", "low", "high"), [(1, 15, 30), (2, 30, 60), (5, 240, 480), (20, 1800, 3600)]
)
def test_backoff_doubles_with_jitter_up_to_the_cap(attempts, low, high):
    delays = {
        POLICY.next_attempt(attempts, created_at=0, now=100, retry_after=None) - 100
        for _ in range(50)
    }
    assert all(low <= d <= high for d in delays)
    assert len(delays) > 1  # jittered, so a fleet of retries does not arrive at once


def test_never_sooner_than_the_crm_asked():
    assert POLICY.next_attempt(1, created_at=0, now=100, retry_after=600) == 700


def test_past_the_horizon_the_delivery_is_given_up():
    assert POLICY.next_attempt(30, created_at=0, now=86000, retry_after=None) is None
    assert POLICY.next_attempt(1, created_at=0, now=1000, retry_after=None) is not None


async def test_in_call_retries_pass_a_blip():
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RetryableDelivery("503")
        return "ok"

    async for attempt in POLICY.in_call():
        with attempt:
            result = await flaky()
    assert result == "ok" and len(calls) == 3


async def test_in_call_retries_stop_at_once_on_permanent_errors_and_on_long_waits():
    for exc in (PermanentDelivery("400"), RetryableDelivery("429", retry_after=10)):
        calls = []
        with pytest.raises(type(exc)):
            async for attempt in POLICY.in_call():
                with attempt:
                    calls.append(1)
                    raise exc
        assert len(calls) == 1
