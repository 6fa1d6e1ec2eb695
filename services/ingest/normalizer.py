"""The normalizer role: inbox records to typed events on ``klientiks.events.v1``; the rest to quarantine.

Identical webhooks inside the dedupe window become one event (the state is in the ledger, so it
survives restarts; identical webhooks share an inbox key, so they meet on one partition).

Records are handled in batches: one ledger transaction keeps the history of the whole batch, and the
batch's records are queued on the producer in order (per-key order holds) and awaited together.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from faststream import AckPolicy
from faststream.asgi import AsgiFastStream
from faststream.kafka.annotations import KafkaMessage
from faststream.kafka.prometheus import KafkaPrometheusMiddleware
from prometheus_client import REGISTRY
from pydantic import ValidationError

from services.common.config import Settings
from services.common.events import CloudEvent
from services.common.kafka import (
    EVENTS,
    INBOX,
    QUARANTINE,
    consumer_options,
    ensure_topics,
    make_broker,
    make_producer,
)
from services.common.ledger import Ledger, Seen, upgrade
from services.common.logging import get_logger
from services.common.metrics import DEDUPLICATED, ENRICHED, MISSING_VALUES, NORMALIZED, QUARANTINED
from services.common.streamapp import worker_routes
from services.ingest.dedupe import fingerprint, scope
from services.ingest.enrichment import enrich, enriched_key, needs_enrichment
from services.ingest.inbox import InboxRecord
from services.ingest.klientiks import KlientiksApis, KlientiksError
from services.ingest.parsing import KNOWN, Rejected, normalize

GROUP = "relay-normalizer"
BATCH = 500
# Publishing or the ledger failed: wait before the batch is fetched again, not a hot loop.
REDELIVERY_PAUSE_S = 1.0

log = get_logger("relay.ingest.normalizer")


@dataclass
class _Out:
    """Where one inbox record goes, and what the history keeps of it."""

    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]
    history: dict[str, Any] | None = None
    event_id: str | None = None
    source: str | None = None
    webhook: str | None = None
    reason: str | None = None
    missing: list[tuple[str, str]] = field(default_factory=list)
    seen: Seen | None = None  # what the dedupe window remembers of it
    duplicate_of: str | None = None
    event: CloudEvent | None = None
    raw: bytes = b""  # the inbox record as read, for quarantine after a failed enrichment
    inbox_key: bytes | None = None

    def set_event(self, event: CloudEvent, key: bytes) -> None:
        client = event.data.client
        self.event, self.value, self.key, self.headers = (
            event,
            event.kafka_value(),
            key,
            event.kafka_headers(),
        )
        if self.history is not None:
            self.history.update(
                kafka_key=key.decode(), client_id=client.id if client else None,
                phone=client.phone if client else None, normalized=event.model_dump_json(),
            )  # fmt: skip

    def quarantine(self, reason: str, detail: str) -> None:
        self.topic, self.value, self.key, self.reason, self.event = (
            QUARANTINE,
            self.raw,
            self.inbox_key,
            reason,
            None,
        )
        self.headers = [("reason", reason.encode()), ("detail", detail[:500].encode())]
        self.missing = []
        if self.history is not None:
            self.history.update(kafka_key=self.key.decode("utf-8", "replace") if self.key else None,
                                normalized=None, quarantine_reason=reason)  # fmt: skip


def _history(record: InboxRecord, raw: bytes, key: bytes | None, **kw: Any) -> dict[str, Any]:
    return dict(
        id=record.id, source=record.source, event=record.event, received_at=record.received_at,
        kafka_key=key.decode("utf-8", "replace") if key else None, inbox=raw.decode("utf-8", "replace"),
        client_id=None, phone=None, normalized=None, quarantine_reason=None,
    ) | kw  # fmt: skip


def route(raw: bytes, key: bytes | None, settings: Settings) -> _Out:
    """Decide what becomes of one inbox record (no I/O)."""

    def quarantined(reason: str, detail: str, record: InboxRecord | None = None) -> _Out:
        headers = [("reason", reason.encode()), ("detail", detail[:500].encode())]
        history = _history(record, raw, key, quarantine_reason=reason) if record else None
        return _Out(QUARANTINE, raw, key, headers, history, record.id if record else None,
                    record.source if record else None, record.event if record else None, reason)  # fmt: skip

    try:
        record = InboxRecord.from_bytes(raw)
    except ValidationError as e:
        return quarantined("bad_record", str(e))
    source = next((s for s in settings.sources if s.name == record.source), None)
    if source is None:
        return quarantined("unknown_source", f"source {record.source!r} is not configured", record)
    result = normalize(record, zone=source.zone, phone_region=source.phone_region)
    if isinstance(result, Rejected):
        return quarantined(result.reason, result.detail, record)
    event, out_key = result.event, result.key.encode()
    client = event.data.client
    history = _history(
        record, raw, out_key, client_id=client.id if client else None, phone=client.phone if client else None,
        normalized=event.model_dump_json(),
    )  # fmt: skip
    appointment = event.data.appointment
    where, supersedes = scope(record.source, record.event, appointment.id if appointment else None)
    seen = Seen(
        fingerprint(record.source, record.event, result.pairs),
        where,
        record.id,
        record.received_at,
        supersedes,
    )
    return _Out(EVENTS, event.kafka_value(), out_key, event.kafka_headers(), history, event.id, record.source,
                record.event, missing=result.missing, seen=seen, event=event, raw=raw, inbox_key=key)  # fmt: skip


def create_normalizer(settings: Settings, *, migrate: bool = False) -> AsgiFastStream:
    """Assemble the normalizer. Nothing connects until the app starts."""
    broker = make_broker(settings.kafka, middlewares=[KafkaPrometheusMiddleware(registry=REGISTRY)])
    ledger = Ledger.from_url(settings.database_url)
    apis = KlientiksApis.from_settings(settings)
    producers: list[AIOKafkaProducer] = []

    @broker.subscriber(
        INBOX,
        batch=True,
        max_records=BATCH,
        ack_policy=AckPolicy.MANUAL,
        **consumer_options(settings.kafka, GROUP),
    )
    async def handle(msg: KafkaMessage) -> None:
        raw = msg.raw_message
        records = raw if isinstance(raw, tuple) else (raw,)
        try:
            outs = [route(r.value, r.key, settings) for r in records]
            await _drop_repeats(outs)
            await asyncio.gather(
                *(_enrich(o) for o in outs if o.duplicate_of is None and o.event is not None)
            )
            # History first: an event on the topic is always findable with `relay events show`.
            await asyncio.gather(*(ledger.add_event(**o.history) for o in outs if o.history))
            producer = producers[0]
            # Queued one after another, so records of one key keep their order; then awaited together.
            sent = [
                await producer.send(o.topic, o.value, key=o.key, headers=o.headers)
                for o in outs
                if o.duplicate_of is None
            ]
            await asyncio.gather(*sent)
            await msg.ack()
        except Exception as e:
            log.error("normalizer failed; the batch will be read again", records=len(records), error=repr(e))
            await asyncio.sleep(REDELIVERY_PAUSE_S)
            await msg.nack()
            return
        for o in outs:
            _account(o)

    async def _drop_repeats(outs: list[_Out]) -> None:
        window = settings.ingest.dedupe_window_s
        seen = [o.seen for o in outs if o.seen is not None]
        if not window or not seen:
            return
        repeats = await ledger.claim_fingerprints(seen, window_s=window)
        for o in outs:
            if o.event_id in repeats and o.history is not None:
                o.duplicate_of = repeats[o.event_id]
                o.history["duplicate_of"] = o.duplicate_of

    async def _enrich(o: _Out) -> None:
        """Complete a thin webhook from the Klientiks API, if its source has credentials."""
        api = apis.for_source(o.source) if o.source else None
        if api is None or o.event is None or o.source is None or not needs_enrichment(o.event):
            return
        source = settings.source(o.source)
        try:
            appointment, client = await api.fetch_for(o.event, zone=source.zone)
        except KlientiksError as e:
            # Raw data is never lost: the record waits in quarantine for `relay quarantine replay`.
            reason = "enrichment_failed" if e.retryable else f"enrichment_{e.reason}"
            ENRICHED.labels(o.webhook or "unknown", reason).inc()
            o.quarantine(reason, f"Klientiks API: {e}")
            return
        if appointment is None and client is None:
            ENRICHED.labels(o.webhook or "unknown", "not_found").inc()
            log.warning("thin webhook not found in the Klientiks API; sent as it came", event_id=o.event_id,
                        source=o.source)  # fmt: skip
            return
        event = enrich(o.event, appointment, client, zone=source.zone, phone_region=source.phone_region)
        o.set_event(event, enriched_key(o.source, event).encode())
        o.missing = [(f, k) for f, k in o.missing if f in event.data.missing]
        ENRICHED.labels(o.webhook or "unknown", "enriched").inc()

    async def startup() -> None:
        if migrate:
            await upgrade(ledger.engine)
        await ensure_topics(settings.kafka)
        producer = make_producer(settings.kafka)
        await producer.start()
        producers.append(producer)

    async def shutdown() -> None:
        for p in producers:
            await p.stop()
        await apis.aclose()
        await ledger.close()

    return AsgiFastStream(
        broker,
        asgi_routes=worker_routes(broker, [("database", ledger.ping)]),
        on_startup=[startup],
        after_shutdown=[shutdown],
    )


def _account(o: _Out) -> None:
    """Metrics and the log line of one record, once it is safely published."""
    if o.duplicate_of is not None:
        DEDUPLICATED.labels(o.webhook or "unknown").inc()
        log.info("repeated webhook dropped", source=o.source, webhook=o.webhook, event_id=o.event_id,
                 duplicate_of=o.duplicate_of)  # fmt: skip
        return
    if o.topic == QUARANTINE:
        QUARANTINED.labels(o.reason or "unknown").inc()
        log.warning("inbox record quarantined", reason=o.reason, event_id=o.event_id, source=o.source)
        return
    name = o.webhook or "unknown"
    NORMALIZED.labels(name).inc()
    for f, kind in o.missing:
        # Keys are the sender's choice: only known ones become label values.
        MISSING_VALUES.labels(name, f if f in KNOWN else "other", kind).inc()
    log.info("event normalized", source=o.source, webhook=name, event_id=o.event_id,
             missing=[f"{f}:{k}" for f, k in o.missing])  # fmt: skip
