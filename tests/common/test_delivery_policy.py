"""Unit tests for services.common.delivery.policy: the retry schedule, jitter, Retry-After, throttling."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.delivery.policy import MAX_RETRY_AFTER_S, RetryPolicy, parse_schedule
from services.common.outcome import Outcome

DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
RETRYABLE = Outcome.retryable("HTTP 503", http_status=503)
THROTTLED = Outcome.retryable("HTTP 429", http_status=429, throttle=True)
TIMEOUT = Outcome.retryable("read timeout", throttle=True)


def mid() -> float:
    return 0.5


def low() -> float:
    return 0.0


def high() -> float:
    return 1.0


def test_default_schedule_without_jitter() -> None:
    policy = RetryPolicy()
    delays = [policy.next_delay(n, RETRYABLE, rand=mid) for n in range(1, 9)]
    assert delays == pytest.approx(list(DEFAULT_SCHEDULE))
    assert policy.schedule == DEFAULT_SCHEDULE
    assert policy.max_attempts() == 9


@pytest.mark.parametrize(("attempts_done", "base"), list(enumerate(DEFAULT_SCHEDULE, start=1)))
def test_jitter_bounds(attempts_done: int, base: float) -> None:
    policy = RetryPolicy()
    assert policy.next_delay(attempts_done, RETRYABLE, rand=low) == pytest.approx(base * 0.8)
    assert policy.next_delay(attempts_done, RETRYABLE, rand=high) == pytest.approx(base * 1.2)


def test_zero_jitter_ignores_rand() -> None:
    policy = RetryPolicy(jitter=0)
    assert policy.next_delay(3, RETRYABLE, rand=low) == 300
    assert policy.next_delay(3, RETRYABLE, rand=high) == 300


def test_retry_after_wins_when_longer() -> None:
    policy = RetryPolicy()
    outcome = Outcome.retryable("HTTP 503", http_status=503, retry_after=120)
    assert policy.next_delay(2, outcome, rand=high) == 120  # 5 s * 1.2 < 120 s


def test_retry_after_loses_when_shorter() -> None:
    policy = RetryPolicy()
    outcome = Outcome.retryable("HTTP 503", http_status=503, retry_after=10)
    assert policy.next_delay(3, outcome, rand=mid) == pytest.approx(300)


@pytest.mark.parametrize("outcome", [THROTTLED, TIMEOUT], ids=["429", "timeout"])
def test_throttle_floor(outcome: Outcome) -> None:
    policy = RetryPolicy()
    # Retry 1 would be immediate, retry 2 after ~5 s: both are lifted to the 60 s floor.
    assert policy.next_delay(1, outcome, rand=mid) == 60
    assert policy.next_delay(2, outcome, rand=high) == 60
    # Above the floor the schedule stands.
    assert policy.next_delay(3, outcome, rand=mid) == pytest.approx(300)


def test_throttle_with_longer_retry_after() -> None:
    outcome = Outcome.retryable("HTTP 429", http_status=429, retry_after=90, throttle=True)
    assert RetryPolicy().next_delay(1, outcome, rand=mid) == 90


def test_throttle_floor_is_configurable() -> None:
    assert RetryPolicy(throttle_floor_s=0).next_delay(1, THROTTLED, rand=mid) == 0


def test_exhausted_after_nine_attempts() -> None:
    policy = RetryPolicy()
    assert policy.next_delay(8, RETRYABLE, rand=mid) == pytest.approx(36000)
    assert policy.next_delay(9, RETRYABLE, rand=mid) is None
    assert policy.next_delay(10, RETRYABLE, rand=mid) is None
    assert policy.next_delay(9, THROTTLED, rand=mid) is None


def test_custom_schedule_sets_max_attempts() -> None:
    policy = RetryPolicy(schedule=(1, 2))
    assert policy.max_attempts() == 3
    assert policy.next_delay(2, RETRYABLE, rand=mid) == pytest.approx(2)
    assert policy.next_delay(3, RETRYABLE, rand=mid) is None
    assert RetryPolicy(schedule=()).next_delay(1, RETRYABLE, rand=mid) is None


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.permanent("HTTP 400", http_status=400),
        Outcome.success(http_status=200),
    ],
    ids=["permanent", "success"],
)
def test_not_retryable_returns_none(outcome: Outcome) -> None:
    assert RetryPolicy().next_delay(1, outcome, rand=mid) is None


def test_attempts_done_must_be_positive() -> None:
    with pytest.raises(ValueError, match="attempts_done"):
        RetryPolicy().next_delay(0, RETRYABLE)


def test_default_rand_stays_in_bounds() -> None:
    delay = RetryPolicy().next_delay(3, RETRYABLE)
    assert delay is not None
    assert 240 <= delay <= 360


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": (0, -1)}, "schedule"),
        ({"schedule": (float("inf"),)}, "schedule"),
        ({"jitter": -0.1}, "jitter"),
        ({"jitter": 1.0}, "jitter"),
        ({"throttle_floor_s": -1}, "throttle"),
    ],
)
def test_invalid_policy(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0,5s,5m,30m,2h,5h,10h,10h", DEFAULT_SCHEDULE),
        ("0", (0.0,)),
        ("1.5s, 2 ,0.5m", (1.5, 2.0, 30.0)),
        (" 1H , 2M ,3S ", (3600.0, 120.0, 3.0)),
        (".5h", (1800.0,)),
    ],
)
def test_parse_schedule(text: str, expected: tuple[float, ...]) -> None:
    assert parse_schedule(text) == expected


def test_parsed_default_matches_policy_default() -> None:
    assert RetryPolicy(schedule=parse_schedule("0,5s,5m,30m,2h,5h,10h,10h")) == RetryPolicy()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("5s,,5m", "item 2"),
        ("5s,", "item 2"),
        ("-5s", "item 1"),
        ("5d", "item 1"),
        ("5 s", "item 1"),
        ("s", "item 1"),
        ("1e3", "item 1"),
        ("nan", "item 1"),
        ("inf", "item 1"),
        ("1" * 400, "too large"),
        ("5s;5m", "item 1"),
    ],
)
def test_parse_schedule_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_schedule(text)


@given(
    attempts_done=st.integers(min_value=1, max_value=20),
    r=st.floats(min_value=0, max_value=1),
    retry_after=st.none() | st.floats(min_value=0, max_value=1e6),
    throttle=st.booleans(),
    jitter=st.floats(min_value=0, max_value=0.99),
)
def test_delay_within_bounds(
    attempts_done: int, r: float, retry_after: float | None, throttle: bool, jitter: float
) -> None:
    policy = RetryPolicy(jitter=jitter)
    outcome = Outcome.retryable("x", retry_after=retry_after, throttle=throttle)
    delay = policy.next_delay(attempts_done, outcome, rand=lambda: r)
    if attempts_done >= policy.max_attempts():
        assert delay is None
        return
    assert delay is not None
    base = policy.schedule[attempts_done - 1]
    after = min(retry_after or 0.0, MAX_RETRY_AFTER_S)  # a Retry-After is followed for a day at most
    floor = max(base * (1 - jitter), after, policy.throttle_floor_s if throttle else 0.0)
    ceiling = max(base * (1 + jitter), after, policy.throttle_floor_s if throttle else 0.0)
    assert delay >= 0
    assert delay >= after
    assert floor - 1e-9 <= delay <= ceiling + 1e-9


@pytest.mark.parametrize("after", [99_999_999_999_999.0, float("inf"), 1e308])
def test_a_huge_retry_after_is_followed_for_a_day_at_most(after: float) -> None:
    policy = RetryPolicy(schedule=(0, 5), jitter=0)
    delay = policy.next_delay(1, Outcome.retryable("busy", retry_after=after))
    assert delay == MAX_RETRY_AFTER_S
    assert delay is not None
    timedelta(seconds=delay)  # what the runtime does with it: no OverflowError


@pytest.mark.parametrize("after", [float("nan"), -5.0])
def test_a_nonsense_retry_after_is_ignored(after: float) -> None:
    policy = RetryPolicy(schedule=(0, 5), jitter=0)
    assert policy.next_delay(2, Outcome.retryable("busy", retry_after=after)) == 5
