"""When to retry a failed delivery: a fixed schedule with jitter, Retry-After and a throttle floor."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from services.common.outcome import Outcome, OutcomeKind

_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
# A Retry-After is followed up to a day: a target's answer must not park a delivery for ever, nor overflow
# a datetime (`Retry-After: 99999999999999`).
MAX_RETRY_AFTER_S = 86_400.0
_STEP = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([smh]?)")


@dataclass(frozen=True)
class RetryPolicy:
    """Delays between delivery attempts; one instance is shared by all deliveries to a target."""

    # Delay before retry 1, 2, ... after a failed attempt: immediately, 5 s, 5 min, 30 min,
    # 2 h, 5 h, 10 h, 10 h — Svix's schedule, which spans a target's day-long outage.
    schedule: tuple[float, ...] = (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    # ±20%, so items that failed together do not all come back together.
    jitter: float = 0.2
    # At least this long after a 429 or a timeout: retrying an overloaded target at once makes it worse.
    throttle_floor_s: float = 60

    def __post_init__(self) -> None:
        if any(not math.isfinite(d) or d < 0 for d in self.schedule):
            raise ValueError(f"retry schedule delays must be finite and >= 0, got {self.schedule!r}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"retry jitter must be in [0, 1), got {self.jitter!r}")
        if not math.isfinite(self.throttle_floor_s) or self.throttle_floor_s < 0:
            raise ValueError(f"throttle floor must be finite and >= 0, got {self.throttle_floor_s!r}")

    def max_attempts(self) -> int:
        """The first attempt plus one retry per schedule entry."""
        return 1 + len(self.schedule)

    def next_delay(
        self, attempts_done: int, outcome: Outcome, rand: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to stop (exhausted or not retryable).

        `attempts_done` counts attempts made so far, including the one that produced `outcome`.
        """
        if attempts_done < 1:
            raise ValueError(f"attempts_done must be >= 1, got {attempts_done}")
        if outcome.kind is not OutcomeKind.RETRYABLE or attempts_done >= self.max_attempts():
            return None
        base = self.schedule[attempts_done - 1]
        low, high = base * (1 - self.jitter), base * (1 + self.jitter)
        delay = low + (high - low) * rand()
        # The target knows its own recovery time better than our schedule does.
        after = outcome.retry_after or 0.0
        delay = max(delay, min(after, MAX_RETRY_AFTER_S) if after > 0 else 0.0)  # NaN and negatives: ignored
        if outcome.throttle:
            delay = max(delay, self.throttle_floor_s)
        return max(delay, 0.0)


def parse_schedule(text: str) -> tuple[float, ...]:
    """Parse "0,5s,5m,30m,2h" (units s/m/h, a bare number is seconds) into delays in seconds."""
    steps = [part.strip() for part in text.split(",")]
    if steps == [""]:
        raise ValueError("retry schedule is empty; expected e.g. '0,5s,5m,30m,2h'")
    delays: list[float] = []
    for i, step in enumerate(steps, start=1):
        match = _STEP.fullmatch(step.lower())
        if match is None:
            raise ValueError(
                f"retry schedule item {i} is {step!r}; expected a non-negative number with an "
                "optional unit s, m or h, e.g. '0,5s,5m,30m,2h'"
            )
        delay = float(match[1]) * _UNIT_SECONDS[match[2]]
        if not math.isfinite(delay):
            raise ValueError(f"retry schedule item {i} is {step!r}, which is too large")
        delays.append(delay)
    return tuple(delays)
