"""The normalizer role: inbox records to typed events on ``klientiks.events.v1``; the rest to quarantine."""

from __future__ import annotations

import asyncio

from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import REGISTRY
from pydantic import ValidationError

from services.common.config import Settings
from services.common.events import CloudEvent, EventName
from services.common.kafka import EVENTS, INBOX, QUARANTINE, consumer_options, ensure_topics, make_broker
from services.common.ledger import Ledger, upgrade
from services.common.logging import get_logger
from services.common.metrics import MISSING_VALUES, NORMALIZED, QUARANTINED
from services.common.streamapp import worker_routes
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import KNOWN, Normalized, Rejected, normalize

GROUP = "relay-normalizer"
# Publishing failed (broker away): wait before the record is fetched again, not a hot loop.
REDELIVERY_PAUSE_S = 1.0

log = get_logger("relay.ingest.normalizer")


def create_normalizer(settings: Settings, *, migrate: bool = False) -> AsgiFastStream:
    """Assemble the normalizer. Nothing connects until the app starts."""
    broker = make_broker(settings.kafka, middlewares=[KafkaPrometheusMiddleware(registry=REGISTRY)])
    ledger = Ledger.from_url(settings.database_url)
    sources = {s.name: s for s in settings.sources}

    async def quarantine(
        raw: bytes, key: bytes | None, reason: str, detail: str, record: InboxRecord | None = None
    ) -> None:
        if record is not None:
            await _remember(record, raw, key, None, reason)
        await broker.publish(raw, QUARANTINE, key=key, headers={"reason": reason, "detail": detail[:500]})
        QUARANTINED.labels(reason).inc()
        log.warning("inbox record quarantined", reason=reason, detail=detail)

    @broker.subscriber(INBOX, ack_policy=AckPolicy.MANUAL, **consumer_options(settings.kafka, GROUP))
    async def handle(msg: KafkaMessage) -> None:
        raw: bytes = msg.raw_message.value  # type: ignore[union-attr]
        key: bytes | None = msg.raw_message.key  # type: ignore[union-attr]
        try:
            try:
                record = InboxRecord.from_bytes(raw)
            except ValidationError as e:
                await quarantine(raw, key, "bad_record", str(e))
            else:
                await _normalize_one(record, raw, key)
            await msg.ack()
        except Exception as e:
            log.error("normalizer failed; the record will be read again", error=repr(e))
            await asyncio.sleep(REDELIVERY_PAUSE_S)
            await msg.nack()

    async def _normalize_one(record: InboxRecord, raw: bytes, key: bytes | None) -> None:
        source = sources.get(record.source)
        if source is None:
            await quarantine(
                raw, key, "unknown_source", f"source {record.source!r} is not configured", record
            )
            return
        result = normalize(record, zone=source.zone, phone_region=source.phone_region)
        if isinstance(result, Rejected):
            await quarantine(raw, key, result.reason, result.detail, record)
            return
        assert isinstance(result, Normalized)
        event = result.event
        # History first: an event on the topic is always findable with `relay events show`.
        await _remember(record, raw, result.key.encode(), event, None)
        await broker.publish(
            event.kafka_value(),
            EVENTS,
            key=result.key.encode(),
            headers={k: v.decode() for k, v in event.kafka_headers()},
        )
        name = EventName(record.event).value
        NORMALIZED.labels(name).inc()
        for field, kind in result.missing:
            # Keys are the sender's choice: only known ones become label values.
            MISSING_VALUES.labels(name, field if field in KNOWN else "other", kind).inc()
        log.info(
            "event normalized",
            source=record.source,
            webhook=name,
            event_id=event.id,
            missing=[f"{f}:{k}" for f, k in result.missing],
        )

    async def _remember(
        record: InboxRecord, raw: bytes, key: bytes | None, event: CloudEvent | None, reason: str | None
    ) -> None:
        client = event.data.client if event else None
        await ledger.add_event(
            id=record.id, source=record.source, event=record.event, received_at=record.received_at,
            client_id=client.id if client else None, phone=client.phone if client else None,
            kafka_key=key.decode("utf-8", "replace") if key else None, inbox=raw.decode("utf-8", "replace"),
            normalized=event.model_dump_json() if event else None, quarantine_reason=reason,
        )  # fmt: skip

    async def startup() -> None:
        if migrate:
            await upgrade(ledger.engine)
        await ensure_topics(settings.kafka)

    async def shutdown() -> None:
        await ledger.close()

    return AsgiFastStream(
        broker,
        asgi_routes=worker_routes(broker, [("database", ledger.ping)]),
        on_startup=[startup],
        after_shutdown=[shutdown],
    )
