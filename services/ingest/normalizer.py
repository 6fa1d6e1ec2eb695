"""The normalizer role: inbox records to typed events on ``klientiks.events.v1``; the rest to quarantine.

Identical webhooks inside the dedupe window become one event (the state is in the ledger, so it
survives restarts; identical webhooks share an inbox key, so they meet on one partition).

Records are handled in batches: one ledger transaction keeps the history of the whole batch, and the
batch's records are queued on the producer in order (per-key order holds) and awaited together.

Every record is isolated: whatever one raises while it is parsed, enriched, serialized, written to the
history or queued, it goes to quarantine with the reason and the rest of the batch goes on. Only Kafka
or the ledger failing makes the batch be read again.

A thin webhook that needs the Klientiks API does not hold up its batch: it waits in the ledger
(``ingest_waiting``), with the later records of its key behind it, and a background task completes
and publishes them in order while everything else flows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import MessageSizeTooLargeError
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
from services.common.ledger import WAITING_LOCK, Ledger, Seen, Waiting, upgrade
from services.common.logging import get_logger
from services.common.metrics import (
    DEDUPLICATED,
    ENRICHED,
    ENRICHMENT_WAITING,
    MISSING_VALUES,
    NORMALIZED,
    QUARANTINED,
)
from services.common.retention import Purger
from services.common.stall import StallWatch
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
    raw: bytes = b""  # the inbox record as read, for quarantine
    inbox_key: bytes | None = None
    waits: bool = False  # held in the ledger for the Klientiks API (or behind a record that is)

    def set_event(self, event: CloudEvent, key: bytes) -> None:
        client = event.data.client
        value, headers, normalized = event.kafka_value(), event.kafka_headers(), event.model_dump_json()
        self.event, self.value, self.key, self.headers = event, value, key, headers
        if self.history is not None:
            self.history.update(
                kafka_key=key.decode(), client_id=client.id if client else None,
                phone=client.phone if client else None, normalized=normalized,
            )  # fmt: skip

    def quarantine(self, reason: str, detail: str) -> None:
        self.topic, self.value, self.key, self.reason, self.event = (
            QUARANTINE,
            self.raw,
            self.inbox_key,
            reason,
            None,
        )
        self.headers = _reason_headers(reason, detail)
        self.missing = []
        self.waits = False
        if self.history is not None:
            self.history.update(kafka_key=_text(self.key) if self.key else None, client_id=None, phone=None,
                                normalized=None, quarantine_reason=reason)  # fmt: skip


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _storable(value: Any) -> Any:
    """A value any database keeps: no NUL (PostgreSQL refuses it), no lone surrogate (no encoding has it)."""
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def _reason_headers(reason: str, detail: str) -> list[tuple[str, bytes]]:
    return [("reason", reason.encode()), ("detail", detail[:500].encode("utf-8", "backslashreplace"))]


def _history(record: InboxRecord, raw: bytes, key: bytes | None, **kw: Any) -> dict[str, Any]:
    return dict(
        id=record.id, source=record.source, event=record.event, received_at=record.received_at,
        kafka_key=_text(key) if key else None, inbox=_text(raw),
        client_id=None, phone=None, normalized=None, quarantine_reason=None,
    ) | kw  # fmt: skip


def _quarantined(raw: bytes, key: bytes | None, reason: str, detail: str, record: InboxRecord | None) -> _Out:
    history = _history(record, raw, key, quarantine_reason=reason) if record else None
    return _Out(QUARANTINE, raw, key, _reason_headers(reason, detail), history, record.id if record else None,
                record.source if record else None, record.event if record else None, reason, raw=raw,
                inbox_key=key)  # fmt: skip


def route(raw: bytes, key: bytes | None, settings: Settings) -> _Out:
    """Decide what becomes of one inbox record (no I/O); never raises: a record that breaks is quarantined."""
    record = None
    try:
        record = InboxRecord.from_bytes(raw)
    except ValidationError as e:
        return _quarantined(raw, key, "bad_record", str(e), None)
    try:
        return _route(record, raw, key, settings)
    except Exception as e:  # a bug or an input nobody foresaw must not stop the other records
        log.error("inbox record could not be normalized", event_id=record.id, error=repr(e)[:300])
        return _quarantined(raw, key, "normalizer_error", repr(e), record)


def _route(record: InboxRecord, raw: bytes, key: bytes | None, settings: Settings) -> _Out:
    source = next((s for s in settings.sources if s.name == record.source), None)
    if source is None:
        return _quarantined(raw, key, "unknown_source", f"source {record.source!r} is not configured", record)
    result = normalize(record, zone=source.zone, phone_region=source.phone_region)
    if isinstance(result, Rejected):
        return _quarantined(raw, key, result.reason, result.detail, record)
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
    ledger = Ledger.from_url(settings.database_url, phone_key=settings.phone_hash_key)
    if settings.phone_hash_key is None:
        log.warning(
            "phone_hash_key is not set: events are kept without a phone index (`relay events find --phone`)"
        )
    apis = KlientiksApis.from_settings(settings)
    producers: list[AIOKafkaProducer] = []
    watch = StallWatch(GROUP, settings.kafka.stall_after_s)
    waiting = _Waiting(ledger, StallWatch(f"{GROUP}-waiting", settings.kafka.stall_after_s))
    background: list[asyncio.Task[None]] = []

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
        watch.started()
        try:
            outs = [route(r.value, r.key, settings) for r in records]
            # History first: an event on the topic is always findable with `relay events show`.
            await _keep(outs)
            live = [o for o in outs if o.duplicate_of is None]
            held, refused = await _hold_back(live)
            await _write_history(refused)  # their new outcome
            await _publish([o for o in live if not o.waits])
            await msg.ack()
        except Exception as e:
            # Only Kafka or the ledger gets here (records are isolated): the batch is read again.
            watch.failed()
            log.error("normalizer failed; the batch will be read again", records=len(records), error=repr(e))
            await asyncio.sleep(REDELIVERY_PAUSE_S)
            await msg.nack()
            return
        watch.succeeded()
        if held:
            waiting.wake.set()
        for o in outs:
            if not o.waits:
                _account(o)

    async def _keep(outs: list[_Out]) -> None:
        """Claim the batch's fingerprints and keep its history: one transaction for the batch.

        If it fails while the ledger is up, the claim runs alone and the history one record at a time,
        which finds the records at fault.
        """
        window = settings.ingest.dedupe_window_s
        seen = [o.seen for o in outs if o.seen is not None]
        try:
            repeats = await ledger.intake(seen, [o.history for o in outs if o.history], window_s=window)
        except Exception as e:
            if not await ledger.ping():
                raise
            log.warning("event history refused a batch; writing it one record at a time", error=repr(e)[:300])
            _mark_repeats(outs, await ledger.claim_fingerprints(seen, window_s=window) if window else {})
            await _write_history(outs, one_by_one=True)
            return
        _mark_repeats(outs, repeats)

    def _thin(o: _Out) -> bool:
        return (
            o.event is not None
            and o.source is not None
            and apis.for_source(o.source) is not None
            and needs_enrichment(o.event)
        )

    async def _hold_back(live: list[_Out]) -> tuple[bool, list[_Out]]:
        """Hold thin webhooks, and records whose key has one waiting, in the ledger.

        Returns whether any was held, and the thin ones past the backlog (now quarantined).
        """
        candidates = [o for o in live if o.topic == EVENTS and o.inbox_key is not None]
        thin = {id(o) for o in candidates if _thin(o)}
        keys = {_text(o.inbox_key) for o in candidates if o.inbox_key is not None}
        waiting_keys = await ledger.waiting_keys(sorted(keys)) if thin or waiting.any else set()
        if not thin and not waiting_keys:
            return False, []
        backlog = await ledger.waiting_thin() if thin else {}
        limit = settings.ingest.enrichment_backlog
        held: list[Waiting] = []
        refused: list[_Out] = []
        for o in candidates:
            assert o.inbox_key is not None
            assert o.event_id is not None
            assert o.source is not None
            key = _text(o.inbox_key)
            if id(o) in thin:
                if backlog.get(o.source, 0) >= limit:
                    ENRICHED.labels(o.webhook or "unknown", "backlog").inc()
                    o.quarantine("enrichment_backlog", f"{limit} thin webhooks of this source already wait "
                                 "for the Klientiks API (ingest.enrichment_backlog)")  # fmt: skip
                    refused.append(o)
                    continue
                backlog[o.source] = backlog.get(o.source, 0) + 1
            elif key not in waiting_keys:
                continue
            o.waits = True
            waiting_keys.add(key)
            held.append(Waiting(0, o.event_id, o.source, key, _text(o.raw), id(o) in thin))
        await ledger.hold(held)
        if held:
            waiting.generation += 1
            waiting.any = True
        return bool(held), refused

    async def _write_history(outs: list[_Out], *, one_by_one: bool = False) -> None:
        """One transaction for the batch; if it fails, one record at a time finds the records at fault."""
        rows = [o for o in outs if o.history]
        if not one_by_one:
            try:
                await asyncio.gather(*(ledger.add_event(**o.history) for o in rows if o.history))
                return
            except Exception as e:
                if not await ledger.ping():
                    raise
                log.warning(
                    "event history refused a batch; writing it one record at a time", error=repr(e)[:300]
                )
        for o in rows:
            assert o.history is not None
            try:
                await ledger.add_event(**o.history)
                continue
            except Exception as e:
                if not await ledger.ping():
                    raise
                o.quarantine("history_failed", f"the event history refused it: {e!r}")
            assert o.history is not None
            try:  # kept as well as it can be: `relay events show` still finds the quarantined record
                await ledger.add_event(**{k: _storable(v) for k, v in o.history.items()})
            except Exception as e:
                if not await ledger.ping():
                    raise
                log.error("event history refused a record twice; quarantined without it", event_id=o.event_id,
                          error=repr(e)[:300])  # fmt: skip

    async def _publish(outs: list[_Out]) -> None:
        """Queue the records in order (per-key order holds), then await them together."""
        producer = producers[0]
        sent = []
        for o in outs:
            try:
                sent.append(await producer.send(o.topic, o.value, key=o.key, headers=o.headers))
                continue
            except (MessageSizeTooLargeError, TypeError, ValueError) as e:
                if o.topic == QUARANTINE:
                    raise  # the raw record itself cannot go anywhere: read it again rather than lose it
                o.quarantine("publish_failed", f"Kafka refused the event: {e!r}")
            if o.history is not None:
                await ledger.add_event(**o.history)
            sent.append(await producer.send(o.topic, o.value, key=o.key, headers=o.headers))
        await asyncio.gather(*sent)

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
        except Exception as e:  # a bug on reading what the API said: this record only, never its key
            ENRICHED.labels(o.webhook or "unknown", "error").inc()
            o.quarantine("enrichment_error", f"the Klientiks API's answer could not be read: {e!r}")
            return
        if appointment is None and client is None:
            ENRICHED.labels(o.webhook or "unknown", "not_found").inc()
            log.warning("thin webhook not found in the Klientiks API; sent as it came", event_id=o.event_id,
                        source=o.source)  # fmt: skip
            return
        try:
            event = enrich(o.event, appointment, client, zone=source.zone, phone_region=source.phone_region)
            o.set_event(event, enriched_key(o.source, event).encode())
        except Exception as e:  # what the API returned broke the mapping: this record only
            ENRICHED.labels(o.webhook or "unknown", "error").inc()
            o.quarantine("enrichment_error", f"the Klientiks API's record could not be used: {e!r}")
            return
        o.missing = [(f, k) for f, k in o.missing if f in event.data.missing]
        ENRICHED.labels(o.webhook or "unknown", "enriched").inc()

    async def _release(w: Waiting) -> None:
        """Complete one held record (if thin), keep its history and publish it; then let it go."""
        o = route(w.record.encode(), w.inbox_key.encode(), settings)
        if w.thin and o.event is not None:
            await _enrich(o)
        await _write_history([o])
        await _publish([o])
        await ledger.release(w.event_id)
        _account(o)

    waiting.release = _release

    async def startup() -> None:
        if migrate:
            await upgrade(ledger.engine)
        await ensure_topics(settings.kafka)
        producer = make_producer(settings.kafka)
        await producer.start()
        producers.append(producer)
        background.append(asyncio.create_task(waiting.run(), name="normalizer-waiting"))
        background.append(asyncio.create_task(Purger(ledger, settings).run(), name="normalizer-purge"))

    async def shutdown() -> None:
        for t in background:
            t.cancel()
        await waiting.stop()
        for t in background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for p in producers:
            await p.stop()
        await apis.aclose()
        await ledger.close()

    return AsgiFastStream(
        broker,
        asgi_routes=worker_routes(broker, [("database", ledger.ping)], progress=[watch, waiting.watch]),
        on_startup=[startup],
        after_shutdown=[shutdown],
    )


class _Waiting:
    """Releases the records held in the ledger: one task per key, in order; the API's rate limit paces them."""

    POLL_S = 0.5
    LOCK_RETRY_S = 5.0

    def __init__(self, ledger: Ledger, watch: StallWatch) -> None:
        self.ledger = ledger
        self.watch = watch  # a held record that keeps failing to be released (Kafka or the ledger)
        self.wake = asyncio.Event()
        # Whether any key may have a record waiting: while not, a batch needs no look at the ledger.
        self.any = True
        self.generation = 0  # bumped whenever records are held
        self.release: Callable[[Waiting], Awaitable[None]] | None = None
        self._keys: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Release waiting records while this process holds the lock (one normalizer at a time does)."""
        while True:
            try:
                async with self.ledger.exclusive(WAITING_LOCK) as mine:
                    if mine:
                        await self._serve()
            except Exception as e:
                log.error("waiting records could not be read; trying again", error=repr(e)[:300])
            await asyncio.sleep(self.LOCK_RETRY_S)

    async def _serve(self) -> None:
        while True:
            generation = self.generation
            heads = await self.ledger.waiting_heads(limit=1000)
            if heads:
                self.any = True
            elif not self._keys and generation == self.generation:
                self.any = False  # nothing was held while the ledger was read
            for w in heads:
                if w.inbox_key not in self._keys:
                    self._keys[w.inbox_key] = asyncio.create_task(self._drain(w))
            ENRICHMENT_WAITING.set(len(heads))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.POLL_S)
            self.wake.clear()

    async def _drain(self, w: Waiting | None) -> None:
        key = w.inbox_key if w else ""
        assert self.release is not None
        try:
            while w is not None:
                await self.release(w)
                self.watch.succeeded()
                w = await self.ledger.waiting_next(key)
        except Exception as e:  # Kafka or the ledger: the record stays held and is tried on a later poll
            self.watch.failed()
            log.error("a waiting record could not be released; trying again", error=repr(e)[:300])
            await asyncio.sleep(1)
        finally:
            self._keys.pop(key, None)

    async def stop(self) -> None:
        for t in list(self._keys.values()):
            t.cancel()
        for t in list(self._keys.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t


def _mark_repeats(outs: list[_Out], repeats: dict[str, str]) -> None:
    for o in outs:
        if o.event_id in repeats and o.history is not None:
            o.duplicate_of = repeats[o.event_id]
            o.history["duplicate_of"] = o.duplicate_of


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
