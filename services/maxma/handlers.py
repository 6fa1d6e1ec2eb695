"""Maxma as a delivery target: which deliveries an event needs, and how one is made."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.config import SourceConfig
from services.common.delivery.runtime import Job
from services.common.events import EVENT_BY_CE_TYPE, CloudEvent
from services.common.outcome import Outcome
from services.maxma.client import MaxmaClient
from services.maxma.mapping import MappingError, new_client_body
from services.maxma.settings import MaxmaConnection

TARGET = "maxma"


@dataclass(frozen=True)
class Route:
    source: SourceConfig
    connection: MaxmaConnection
    client: MaxmaClient


class MaxmaTarget:
    name = TARGET

    def __init__(self, routes: list[Route]) -> None:
        self._routes: dict[str, list[Route]] = {}
        for r in routes:
            self._routes.setdefault(r.source.name, []).append(r)

    def jobs(self, event: CloudEvent) -> list[Job]:
        name = EVENT_BY_CE_TYPE.get(event.type)
        if name is None:
            return []  # a type from a newer contract: no connection can subscribe to it yet
        jobs = []
        for route in self._routes.get(event.source_name, []):
            action = route.connection.events.get(name)
            if action is not None:
                conn = route.connection
                jobs.append(Job(route.source.name, conn.name, action, route, conn.rate_limit_per_s))
        return jobs

    async def deliver(self, job: Job, event: CloudEvent, idempotency_key: str) -> Outcome:
        route: Route = job.route
        try:
            body = new_client_body(event)
        except MappingError as e:
            return Outcome.permanent(str(e))
        return await route.client.call(job.action, body, idempotency_key=idempotency_key)
