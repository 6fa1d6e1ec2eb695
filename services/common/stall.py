"""Whether a consumer is still making progress: readiness and ``relay_consumer_stalled`` say when it is not."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from functools import partial

from services.common.metrics import CONSUMER_BATCH_FAILURES, CONSUMER_STALLED

FAILING = "failing"  # the same work has kept failing
STUCK = "stuck"  # one piece of work has been running
NOT_COMMITTING = "not_committing"  # records wait behind a commit position that does not move
REASONS = (FAILING, STUCK, NOT_COMMITTING)


class StallWatch:
    """Progress of one consumer, reported as a reason it is stalled (or None) after ``after_s`` seconds.

    A failure streak ends with the next success; a partition counts as not committing while it holds
    uncommitted records and its commit position has not moved for ``after_s``.
    """

    def __init__(self, group: str, after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.group, self.after_s, self._clock = group, after_s, clock
        self._failing_since: float | None = None
        self._busy_since: float | None = None
        self._positions: dict[Hashable, tuple[int | None, float]] = {}
        for reason in REASONS:
            # Evaluated on each scrape: the gauge is right even when nobody asks /readyz.
            CONSUMER_STALLED.labels(group, reason).set_function(partial(self._is, reason))

    def started(self) -> None:
        if self._busy_since is None:
            self._busy_since = self._clock()

    def succeeded(self) -> None:
        self._failing_since = self._busy_since = None

    def failed(self) -> None:
        CONSUMER_BATCH_FAILURES.labels(self.group).inc()
        self._busy_since = None
        if self._failing_since is None:
            self._failing_since = self._clock()

    def position(self, partition: Hashable, committable: int | None, pending: int) -> None:
        """Where ``partition`` could commit now, with ``pending`` records not yet finished."""
        if not pending:
            self._positions.pop(partition, None)
            return
        seen = self._positions.get(partition)
        if seen is None or seen[0] != committable:
            self._positions[partition] = (committable, self._clock())

    def forget(self, partition: Hashable) -> None:
        self._positions.pop(partition, None)

    def reason(self) -> str | None:
        now, limit = self._clock(), self.after_s
        if self._failing_since is not None and now - self._failing_since >= limit:
            return FAILING
        if self._busy_since is not None and now - self._busy_since >= limit:
            return STUCK
        if any(now - since >= limit for _, since in self._positions.values()):
            return NOT_COMMITTING
        return None

    def _is(self, reason: str) -> float:
        return float(self.reason() == reason)
