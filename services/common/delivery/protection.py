"""Protecting a target from us: a per-connection token bucket and a circuit breaker."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum


class TokenBucket:
    """Per-connection rate limit.

    Tokens refill at `rate_per_s` up to `burst`. `reserve()` always takes a token, letting the
    balance go negative: each caller is told how long to wait for its own token, so concurrent
    callers queue in call order without a lock and the rate holds however many there are.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not math.isfinite(rate_per_s) or rate_per_s <= 0:
            raise ValueError(f"rate_per_s must be finite and > 0, got {rate_per_s!r}")
        burst = max(1.0, rate_per_s) if burst is None else burst
        # Below one token, even a lone caller would always wait.
        if not math.isfinite(burst) or burst < 1:
            raise ValueError(f"burst must be finite and >= 1, got {burst!r}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock()

    def reserve(self) -> float:
        """Take one token now; return the seconds to wait before acting (0.0 if one was available)."""
        now = self._clock()
        # max(): a clock that steps back must not drain the bucket.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
        self._updated = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate_per_s

    def try_take(self) -> float:
        """Take a token if one is there (0.0); else take nothing and return the seconds until one is."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._updated) * self.rate_per_s)
        self._updated = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate_per_s

    async def acquire(self, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> float:
        """Reserve a token and sleep until it is due; return the wait."""
        wait = self.reserve()
        if wait > 0:
            await sleep(wait)
        return wait


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after `failure_threshold` consecutive failures; after `open_for_s` lets ONE probe
    through (half-open); a probe success closes it, a probe failure re-opens it for twice as long
    (capped at `max_open_for_s`).

    The caller should record only RETRYABLE outcomes as failures: a permanent 4xx for one bad
    record says nothing about the endpoint's health. This class just counts.

    A probe that is granted and never reported (success, failure or `release_probe()`) would
    wedge the breaker half-open, so after the current open duration another probe is granted.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        open_for_s: float = 30.0,
        max_open_for_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
        if not math.isfinite(open_for_s) or open_for_s <= 0:
            raise ValueError(f"open_for_s must be finite and > 0, got {open_for_s!r}")
        if not math.isfinite(max_open_for_s) or max_open_for_s < open_for_s:
            raise ValueError(f"max_open_for_s must be finite and >= open_for_s, got {max_open_for_s!r}")
        self.failure_threshold = failure_threshold
        self.open_for_s = open_for_s
        self.max_open_for_s = max_open_for_s
        self._clock = clock
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._open_for = open_for_s
        # OPEN: when a probe may be granted; HALF_OPEN: when the outstanding probe counts as lost.
        self._retry_at = 0.0

    @property
    def state(self) -> CircuitState:
        """The current state; stays OPEN after the cooldown until `allow()` grants the probe."""
        return self._state

    def allow(self) -> bool:
        """Whether a call may go to the target now; in OPEN after the cooldown, grants the one probe."""
        if self._state is CircuitState.CLOSED:
            return True
        now = self._clock()
        if now < self._retry_at:
            return False
        self._state = CircuitState.HALF_OPEN
        self._retry_at = now + self._open_for
        return True

    def retry_at(self) -> float:
        """Clock time at which `allow()` may next return True (now if closed)."""
        if self._state is CircuitState.CLOSED:
            return self._clock()
        return self._retry_at

    def record_success(self) -> None:
        """Close, forgetting past failures and back-off."""
        self._state = CircuitState.CLOSED
        self._failures = 0
        self._open_for = self.open_for_s

    def record_failure(self) -> None:
        """Count a failure: open at the threshold; a failed probe re-opens for twice as long."""
        self._failures += 1
        now = self._clock()
        if self._state is CircuitState.HALF_OPEN:
            self._open_for = min(self._open_for * 2, self.max_open_for_s)
            self._open(now)
        elif self._state is CircuitState.CLOSED and self._failures >= self.failure_threshold:
            self._open(now)
        # Already OPEN: a late failure from a call let through earlier must not extend the cooldown.

    def trip(self) -> None:
        """Open at once: a failure every call would share (refused credentials, a setting the target rejects).

        A tripped probe re-opens for twice as long, as a failed one does.
        """
        if self._state is CircuitState.HALF_OPEN:
            self._open_for = min(self._open_for * 2, self.max_open_for_s)
        self._failures = max(self._failures, self.failure_threshold)
        self._open(self._clock())

    def release_probe(self) -> None:
        """Hand back an unused probe so another can be granted at once."""
        if self._state is CircuitState.HALF_OPEN:
            self._state = CircuitState.OPEN
            self._retry_at = self._clock()

    def _open(self, now: float) -> None:
        self._state = CircuitState.OPEN
        self._retry_at = now + self._open_for
