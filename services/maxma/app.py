"""Assembles the maxma delivery service: consumer, ledger, HTTP client, health and metrics routes."""

from __future__ import annotations

import asyncio

import httpx
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import REGISTRY
from pydantic import ValidationError

from services.common.config import Settings, target_connections
from services.common.events import CloudEvent
from services.common.failpoints import hit
from services.common.http import worker_routes
from services.common.kafka import EVENTS, consumer_options, dlq_topic, ensure_topics, make_broker
from services.common.ledger import Ledger, upgrade
from services.common.logging import get_logger
from services.maxma.client import MaxmaClient
from services.maxma.handlers import TARGET, MaxmaDelivery, Route
from services.maxma.settings import MaxmaConnection

GROUP = "relay-maxma"
# The ledger or the broker failed mid-delivery: pause before the event is read again.
REDELIVERY_PAUSE_S = 1.0

log = get_logger("relay.maxma")


def create_app(settings: Settings, *, migrate: bool = False) -> AsgiFastStream:
    """Assemble the service; validates its connections now, connects nothing until started."""
    connections = list(target_connections(settings, TARGET, MaxmaConnection))
    broker = make_broker(settings.kafka, middlewares=[KafkaPrometheusMiddleware(registry=REGISTRY)])
    ledger = Ledger.from_url(settings.database_url)
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=200, max_keepalive_connections=50))
    routes = [
        Route(
            source,
            conn,
            MaxmaClient(http, conn.base_url, conn.processing_key.get_secret_value(), conn.timeout_s),
        )
        for source, conn in connections
    ]

    async def dead_letter(event: CloudEvent, headers: dict[str, str]) -> None:
        all_headers = {k: v.decode() for k, v in event.kafka_headers()} | headers
        await broker.publish(
            event.kafka_value(), dlq_topic(TARGET), key=event.id.encode(), headers=all_headers
        )

    delivery = MaxmaDelivery(routes, ledger, dead_letter, failpoints=settings.failpoints)

    @broker.subscriber(EVENTS, ack_policy=AckPolicy.MANUAL, **consumer_options(settings.kafka, GROUP))
    async def handle(msg: KafkaMessage) -> None:
        raw = msg.raw_message
        try:
            event = CloudEvent.from_kafka(raw.headers, raw.value)  # type: ignore[union-attr]
        except (ValidationError, ValueError) as e:
            # Not of our contract: nothing any retry could fix. Logged, counted, skipped.
            log.error("undecodable event skipped", error=str(e)[:500], offset=raw.offset)  # type: ignore[union-attr]
            await msg.ack()
            return
        try:
            await delivery.handle(event)
            hit("maxma.after_record", settings.failpoints)
            await msg.ack()
        except Exception as e:
            log.error("delivery interrupted; the event will be read again", event_id=event.id, error=repr(e))
            await asyncio.sleep(REDELIVERY_PAUSE_S)
            await msg.nack()

    async def startup() -> None:
        if migrate:
            await upgrade(ledger.engine)
        await ensure_topics(settings.kafka)
        log.info("maxma service starting", connections=len(routes))

    async def shutdown() -> None:
        await http.aclose()
        await ledger.close()

    return AsgiFastStream(
        broker,
        asgi_routes=worker_routes(broker, [("database", ledger.ping)]),
        on_startup=[startup],
        after_shutdown=[shutdown],
    )
