"""StallWatch: when a consumer counts as stalled, on a clock the test moves."""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.common.stall import FAILING, NOT_COMMITTING, STUCK, StallWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _gauge(group: str, reason: str) -> float | None:
    return REGISTRY.get_sample_value("relay_consumer_stalled", {"group": group, "reason": reason})


def test_a_failure_streak_stalls_after_the_limit_and_a_success_ends_it() -> None:
    clock = Clock()
    w = StallWatch("g-fail", 30, clock)
    w.failed()
    clock.now += 29
    w.failed()  # the streak started at the first failure
    assert w.reason() is None
    clock.now += 1
    assert w.reason() == FAILING
    assert _gauge("g-fail", FAILING) == 1.0
    w.succeeded()
    assert w.reason() is None
    assert _gauge("g-fail", FAILING) == 0.0


def test_work_that_never_finishes_is_stuck() -> None:
    clock = Clock()
    w = StallWatch("g-stuck", 30, clock)
    w.started()
    clock.now += 30
    assert w.reason() == STUCK
    assert _gauge("g-stuck", STUCK) == 1.0
    w.succeeded()
    w.started()
    assert w.reason() is None


def test_a_commit_position_that_does_not_move_while_records_wait_is_not_committing() -> None:
    clock = Clock()
    w = StallWatch("g-commit", 30, clock)
    w.position(0, 5, pending=3)
    clock.now += 20
    w.position(0, 5, pending=10)  # lag grows, nothing committed
    w.position(1, 7, pending=1)
    clock.now += 10
    assert w.reason() == NOT_COMMITTING
    w.position(0, 6, pending=9)  # it moved
    assert w.reason() is None
    clock.now += 30
    w.position(0, 6, pending=0)  # nothing waits: nothing to commit is not a stall
    w.position(1, 7, pending=0)
    assert w.reason() is None
    w.position(2, 1, pending=1)
    clock.now += 31
    w.forget(2)  # revoked
    assert w.reason() is None
