"""A scripted delivery target: the runtime's promises proved once, for every target to come, without a vendor.

Each event's outcomes follow a script (per client id); every call is recorded with its time. Nothing here
knows Maxma or any other vendor.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from services.common.delivery.runtime import Job
from services.common.delivery.steps import Steps
from services.common.events import CloudEvent
from services.common.outcome import Outcome

NAME = "fake"
SOURCE = "salon"
CONNECTION = "fake"
ACTION = "create"


@dataclass(frozen=True)
class Call:
    event_id: str
    client_id: str
    at: float  # time.monotonic() when the call arrived
    outcome: Outcome


@dataclass
class FakeTarget:
    """``script[client_id]`` is the outcomes of that client's next calls, in order; then success."""

    rate_limit_per_s: float | None = None
    latency_s: float = 0.0
    name: str = NAME
    script: dict[str, deque[Outcome]] = field(default_factory=lambda: defaultdict(deque))
    calls: list[Call] = field(default_factory=list)
    failing: Outcome | None = None  # every call fails like this while set (an outage)

    def fail(self, client_id: str, *outcomes: Outcome) -> None:
        self.script[client_id].extend(outcomes)

    def jobs(self, event: CloudEvent) -> list[Job]:
        return [Job(SOURCE, CONNECTION, ACTION, None, self.rate_limit_per_s)]

    async def deliver(self, job: Job, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome:
        client = event.data.client.id if event.data.client and event.data.client.id else ""
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        queued = self.script.get(client)
        outcome = self.failing or (
            queued.popleft() if queued else Outcome.success(target_ref=f"ref-{event.id}")
        )
        self.calls.append(Call(event.id, client, time.monotonic(), outcome))
        return outcome

    def calls_of(self, client_id: str) -> list[Call]:
        return [c for c in self.calls if c.client_id == client_id]

    def delivered(self) -> set[str]:
        return {c.event_id for c in self.calls if c.outcome.ok}
