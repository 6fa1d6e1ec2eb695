"""Unit tests for services.common.delivery.protection: the token bucket and the circuit breaker."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.delivery.protection import CircuitBreaker, CircuitState, TokenBucket


class FakeClock:
    """A settable monotonic clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --- TokenBucket ---------------------------------------------------------------------------------


def test_concurrent_reservations_are_spaced(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=5, burst=1, clock=clock)
    waits = [bucket.reserve() for _ in range(10)]
    assert waits == pytest.approx([i * 0.2 for i in range(10)])


def test_burst_then_spacing(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=2, burst=3, clock=clock)
    waits = [bucket.reserve() for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0.5, 1.0, 1.5])


def test_burst_defaults_to_rate(clock: FakeClock) -> None:
    assert TokenBucket(rate_per_s=5, clock=clock).burst == 5
    assert TokenBucket(rate_per_s=0.5, clock=clock).burst == 1
    fast = TokenBucket(rate_per_s=5, clock=clock)
    assert [fast.reserve() for _ in range(6)] == pytest.approx([0, 0, 0, 0, 0, 0.2])


def test_refill_over_time(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=5, burst=2, clock=clock)
    assert [bucket.reserve() for _ in range(2)] == [0, 0]
    clock.advance(0.2)  # one token back
    assert bucket.reserve() == 0
    assert bucket.reserve() == pytest.approx(0.2)
    clock.advance(60)  # refills to burst, not beyond
    assert [bucket.reserve() for _ in range(3)] == pytest.approx([0, 0, 0.2])


def test_reservation_debt_is_repaid_by_time(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=5, burst=1, clock=clock)
    for _ in range(5):
        bucket.reserve()  # the last one waits 0.8 s
    clock.advance(0.5)
    assert bucket.reserve() == pytest.approx(0.5)  # queued behind the earlier reservations


def test_clock_stepping_back_does_not_drain(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=1, burst=2, clock=clock)
    clock.advance(-100)
    assert bucket.reserve() == 0
    assert bucket.reserve() == 0


def test_rate_limit_holds_over_window(clock: FakeClock) -> None:
    rate, burst, window = 5.0, 1.0, 10.0
    bucket = TokenBucket(rate_per_s=rate, burst=burst, clock=clock)
    start = clock.now
    # 200 callers arrive every 0.05 s: four times what the rate allows.
    acted_at = []
    for i in range(200):
        clock.now = start + i * 0.05
        acted_at.append(clock.now - start + bucket.reserve())
    assert sum(1 for t in acted_at if t <= window) <= rate * window + burst


@given(
    rate=st.floats(min_value=0.1, max_value=100),
    burst=st.floats(min_value=1, max_value=50),
    gaps=st.lists(st.floats(min_value=0, max_value=2), min_size=1, max_size=300),
)
def test_rate_limit_holds_for_any_arrivals(rate: float, burst: float, gaps: list[float]) -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate_per_s=rate, burst=burst, clock=clock)
    acted_at = []
    for gap in gaps:
        clock.advance(gap)
        acted_at.append(clock.now + bucket.reserve())
    # Any window [a, b] holds at most rate * (b - a) + burst actions.
    acted_at.sort()
    for i, first in enumerate(acted_at):
        for j in range(i, len(acted_at)):
            assert j - i + 1 <= rate * (acted_at[j] - first) + burst + 1e-6


async def test_acquire_sleeps_on_injected_sleep(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=5, burst=1, clock=clock)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.advance(seconds)

    start = clock.now
    waits = [await bucket.acquire(sleep=fake_sleep) for _ in range(4)]
    assert waits == pytest.approx([0, 0.2, 0.2, 0.2])
    assert slept == pytest.approx([0.2, 0.2, 0.2])  # no sleep call for a zero wait
    assert clock.now - start == pytest.approx(0.6)


async def test_acquire_concurrent_callers_queue_fairly(clock: FakeClock) -> None:
    bucket = TokenBucket(rate_per_s=5, burst=1, clock=clock)
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    waits = await asyncio.gather(*(bucket.acquire(sleep=fake_sleep) for _ in range(5)))
    assert list(waits) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert slept == pytest.approx([0.2, 0.4, 0.6, 0.8])


@pytest.mark.parametrize(
    ("rate", "burst", "match"),
    [
        (0, None, "rate_per_s"),
        (-1, None, "rate_per_s"),
        (float("inf"), None, "rate_per_s"),
        (float("nan"), None, "rate_per_s"),
        (1, 0.5, "burst"),
        (1, float("inf"), "burst"),
    ],
)
def test_bucket_rejects_bad_settings(rate: float, burst: float | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenBucket(rate_per_s=rate, burst=burst)


# --- CircuitBreaker ------------------------------------------------------------------------------


def state(breaker: CircuitBreaker) -> CircuitState:
    # A call, not the property: mypy would narrow `breaker.state` across the calls that change it.
    return breaker.state


def open_breaker(clock: FakeClock) -> CircuitBreaker:
    """A breaker (threshold 3, open 30 s, cap 100 s) just opened."""
    breaker = CircuitBreaker(failure_threshold=3, open_for_s=30, max_open_for_s=100, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN
    return breaker


def test_closed_until_threshold(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=3, clock=clock)
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.retry_at() == clock.now
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.allow()
    breaker.record_failure()
    assert state(breaker) is CircuitState.OPEN


def test_only_consecutive_failures_count(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=3, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is CircuitState.CLOSED


def test_open_blocks_until_cooldown(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    opened = clock.now
    assert breaker.retry_at() == opened + 30
    assert not breaker.allow()
    clock.advance(29.9)
    assert not breaker.allow()
    assert state(breaker) is CircuitState.OPEN


def test_state_read_does_not_grant_probe(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(30)
    assert state(breaker) is CircuitState.OPEN
    assert state(breaker) is CircuitState.OPEN
    assert breaker.retry_at() <= clock.now
    assert breaker.allow()
    assert state(breaker) is CircuitState.HALF_OPEN


def test_half_open_single_probe(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(30)
    assert breaker.allow()
    assert state(breaker) is CircuitState.HALF_OPEN
    assert [breaker.allow() for _ in range(5)] == [False] * 5
    clock.advance(10)
    assert not breaker.allow()


def test_probe_success_closes_and_resets(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(30)
    assert breaker.allow()
    breaker.record_failure()  # re-opens for 60 s
    clock.advance(60)
    assert breaker.allow()
    breaker.record_success()
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.allow()
    assert breaker.retry_at() == clock.now
    # Counters and the open duration are back to their start.
    breaker.record_failure()
    breaker.record_failure()
    assert state(breaker) is CircuitState.CLOSED
    breaker.record_failure()
    assert breaker.retry_at() == clock.now + 30


def test_probe_failure_doubles_open_time_capped(clock: FakeClock) -> None:
    breaker = open_breaker(clock)  # open 30 s, cap 100 s
    durations = []
    for _ in range(4):
        clock.advance(breaker.retry_at() - clock.now)
        assert breaker.allow()
        breaker.record_failure()
        assert state(breaker) is CircuitState.OPEN
        durations.append(breaker.retry_at() - clock.now)
        assert not breaker.allow()
    assert durations == [60, 100, 100, 100]


def test_late_failure_while_open_does_not_extend(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    retry_at = breaker.retry_at()
    clock.advance(10)
    breaker.record_failure()  # from a call let through before it opened
    assert state(breaker) is CircuitState.OPEN
    assert breaker.retry_at() == retry_at


def test_release_probe_lets_another_probe_through(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(30)
    assert breaker.allow()
    breaker.release_probe()
    assert state(breaker) is CircuitState.OPEN
    assert breaker.retry_at() == clock.now
    assert breaker.allow()
    assert state(breaker) is CircuitState.HALF_OPEN
    assert not breaker.allow()
    # Releasing keeps the back-off: a failure now still doubles it.
    breaker.record_failure()
    assert breaker.retry_at() == clock.now + 60


def test_release_probe_is_a_no_op_otherwise(clock: FakeClock) -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_for_s=30, clock=clock)
    breaker.release_probe()
    assert state(breaker) is CircuitState.CLOSED
    breaker.record_failure()
    retry_at = breaker.retry_at()
    breaker.release_probe()
    assert state(breaker) is CircuitState.OPEN
    assert breaker.retry_at() == retry_at


def test_lost_probe_is_regranted_after_open_duration(clock: FakeClock) -> None:
    breaker = open_breaker(clock)
    clock.advance(30)
    assert breaker.allow()  # this probe is never reported
    assert breaker.retry_at() == clock.now + 30
    clock.advance(29)
    assert not breaker.allow()
    clock.advance(1)
    assert breaker.allow()
    assert state(breaker) is CircuitState.HALF_OPEN
    assert not breaker.allow()


# (state before, event, state after); "allow" is taken once the cooldown is over.
TRANSITIONS = [
    (CircuitState.CLOSED, "allow", CircuitState.CLOSED),
    (CircuitState.CLOSED, "success", CircuitState.CLOSED),
    (CircuitState.CLOSED, "failure", CircuitState.OPEN),  # at threshold 1
    (CircuitState.CLOSED, "release", CircuitState.CLOSED),
    (CircuitState.OPEN, "allow", CircuitState.HALF_OPEN),
    (CircuitState.OPEN, "success", CircuitState.CLOSED),
    (CircuitState.OPEN, "failure", CircuitState.OPEN),
    (CircuitState.OPEN, "release", CircuitState.OPEN),
    (CircuitState.HALF_OPEN, "allow", CircuitState.HALF_OPEN),
    (CircuitState.HALF_OPEN, "success", CircuitState.CLOSED),
    (CircuitState.HALF_OPEN, "failure", CircuitState.OPEN),
    (CircuitState.HALF_OPEN, "release", CircuitState.OPEN),
]


@pytest.mark.parametrize(("before", "event", "after"), TRANSITIONS)
def test_state_transitions(clock: FakeClock, before: CircuitState, event: str, after: CircuitState) -> None:
    breaker = CircuitBreaker(failure_threshold=1, open_for_s=30, clock=clock)
    if before is not CircuitState.CLOSED:
        breaker.record_failure()
        clock.advance(30)
    if before is CircuitState.HALF_OPEN:
        assert breaker.allow()
    assert state(breaker) is before
    {
        "allow": breaker.allow,
        "success": breaker.record_success,
        "failure": breaker.record_failure,
        "release": breaker.release_probe,
    }[event]()
    assert state(breaker) is after


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"open_for_s": 0}, "open_for_s"),
        ({"open_for_s": float("nan")}, "open_for_s"),
        ({"open_for_s": 60, "max_open_for_s": 30}, "max_open_for_s"),
    ],
)
def test_breaker_rejects_bad_settings(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CircuitBreaker(**kwargs)  # type: ignore[arg-type]
