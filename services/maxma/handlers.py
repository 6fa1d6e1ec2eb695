"""Delivering one event to every Maxma connection of its source, once in effect."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from services.common.config import SourceConfig
from services.common.dlq import dead_letter_headers
from services.common.events import EVENT_BY_CE_TYPE, CloudEvent
from services.common.failpoints import hit
from services.common.ledger import DeliveryStatus, Ledger, idempotency_key
from services.common.logging import get_logger
from services.common.metrics import ATTEMPT_LATENCY, DELIVERIES, DLQ, END_TO_END, IN_FLIGHT
from services.common.outcome import Outcome, OutcomeKind
from services.maxma.client import MaxmaClient
from services.maxma.mapping import MappingError, new_client_body
from services.maxma.settings import MaxmaConnection

TARGET = "maxma"
MAX_BACKOFF_S = 30.0

log = get_logger("relay.maxma")

DeadLetter = Callable[[CloudEvent, dict[str, str]], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    source: SourceConfig
    connection: MaxmaConnection
    client: MaxmaClient


def backoff(attempt: int, retry_after: float | None) -> float:
    """Seconds before attempt ``attempt`` (2, 3, ...): doubling from 1 s, never sooner than Retry-After."""
    base = min(2.0 ** (attempt - 2), MAX_BACKOFF_S)
    return max(base, retry_after or 0.0)


class MaxmaDelivery:
    def __init__(
        self,
        routes: list[Route],
        ledger: Ledger,
        dead_letter: DeadLetter,
        *,
        failpoints: frozenset[str] = frozenset(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._routes: dict[str, list[Route]] = {}
        for r in routes:
            self._routes.setdefault(r.source.name, []).append(r)
        self._ledger = ledger
        self._dead_letter = dead_letter
        self._failpoints = failpoints
        self._sleep = sleep

    async def handle(self, event: CloudEvent) -> None:
        name = EVENT_BY_CE_TYPE.get(event.type)
        if name is None:
            return  # a type from a newer contract: no Maxma connection can subscribe to it yet
        for route in self._routes.get(event.source_name, []):
            action = route.connection.events.get(name)
            if action is not None:
                await self._deliver(route, action, event)

    async def _deliver(self, route: Route, action: str, event: CloudEvent) -> None:
        conn = route.connection
        key = idempotency_key(TARGET, conn.name, action, event.id)
        delivery = await self._ledger.begin(
            key,
            event_id=event.id,
            source=route.source.name,
            connection=conn.name,
            target=TARGET,
            action=action,
        )
        if delivery.status is not DeliveryStatus.PENDING:
            DELIVERIES.labels(TARGET, action, "skipped").inc()
            log.info(
                "delivery already settled", event_id=event.id, action=action, status=delivery.status.value
            )
            return
        try:
            body = new_client_body(event)
        except MappingError as e:
            now = datetime.now(UTC)
            await self._settle(
                route,
                action,
                event,
                key,
                Outcome.permanent(str(e)),
                now,
                0.0,
                delivery.attempts + 1,
                delivery.created_at,
            )
            return
        attempt = delivery.attempts
        outcome = Outcome.retryable("not attempted")
        while True:
            attempt += 1
            if attempt > delivery.attempts + 1:
                await self._sleep(backoff(attempt - delivery.attempts, outcome.retry_after))
            started, t0 = datetime.now(UTC), time.perf_counter()
            IN_FLIGHT.labels(TARGET).inc()
            try:
                outcome = await route.client.call(action, body, idempotency_key=key)
            finally:
                IN_FLIGHT.labels(TARGET).dec()
            elapsed = time.perf_counter() - t0
            ATTEMPT_LATENCY.labels(TARGET, action).observe(elapsed)
            hit("maxma.after_send", self._failpoints)
            final = (
                outcome.kind is not OutcomeKind.RETRYABLE or attempt - delivery.attempts >= conn.max_attempts
            )
            if final:
                await self._settle(
                    route, action, event, key, outcome, started, elapsed, attempt, delivery.created_at
                )
                return
            DELIVERIES.labels(TARGET, action, outcome.kind.value).inc()
            await self._ledger.record(key, outcome, started_at=started, duration_s=elapsed)
            log.warning(
                "delivery attempt failed; retrying",
                event_id=event.id,
                action=action,
                attempt=attempt,
                reason=outcome.reason,
                http_status=outcome.http_status,
                vendor_code=outcome.vendor_code,
            )

    async def _settle(
        self,
        route: Route,
        action: str,
        event: CloudEvent,
        key: str,
        outcome: Outcome,
        started: datetime,
        elapsed: float,
        attempts: int,
        first_at: datetime,
    ) -> None:
        conn = route.connection
        if not outcome.ok:
            # Dead-letter first: a crash before the ledger write then repeats the dead letter, never loses it.
            headers = dead_letter_headers(
                outcome,
                target=TARGET,
                connection=conn.name,
                action=action,
                idempotency_key=key,
                attempts=attempts,
                first_attempt_at=first_at,
                last_attempt_at=started,
            )
            await self._dead_letter(event, headers)
            DLQ.labels(TARGET, outcome.kind.value).inc()
        await self._ledger.record(key, outcome, started_at=started, duration_s=elapsed, final=True)
        DELIVERIES.labels(TARGET, action, outcome.kind.value).inc()
        if outcome.ok:
            END_TO_END.labels(TARGET).observe((datetime.now(UTC) - event.relayreceivedat).total_seconds())
            log.info(
                "delivered",
                event_id=event.id,
                action=action,
                connection=conn.name,
                attempts=attempts,
                note=outcome.reason or None,
                ms=round(elapsed * 1000, 2),
            )
        else:
            log.error(
                "delivery failed; sent to the dead-letter topic",
                event_id=event.id,
                action=action,
                connection=conn.name,
                attempts=attempts,
                reason=outcome.reason,
                http_status=outcome.http_status,
                vendor_code=outcome.vendor_code,
            )
