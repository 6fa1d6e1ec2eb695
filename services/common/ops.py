"""Operator tooling of ``relay dlq``, ``relay quarantine`` and ``relay events``: reading, replay, masking.

Pure functions parse and filter; the async functions are thin Kafka I/O. Nothing here commits offsets
or joins a consumer group, so looking at a dead-letter or quarantine topic never changes what a service
will read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.common.delivery.runtime import REPLAY_ACTION, REPLAY_CONNECTION, REPLAY_TARGET
from services.common.dlq import PREFIX
from services.common.events import header
from services.common.kafka import EVENTS, INBOX, QUARANTINE, dlq_topic
from services.common.masking import mask_data, mask_pairs, mask_text

__all__ = [
    "QUARANTINE_REPLAY_HEADER",
    "REPLAY_HEADERS",
    "DeadLetter",
    "DlqFilter",
    "QuarantineFilter",
    "Quarantined",
    "distinct",
    "mask_data",
    "mask_pairs",
    "mask_text",
    "parse_when",
    "quarantine_params",
    "read_dlq",
    "read_quarantine",
    "replay",
    "replay_headers",
    "replay_quarantine",
]

REPLAY_HEADERS = (REPLAY_TARGET, REPLAY_CONNECTION, REPLAY_ACTION)
# Polls with nothing new before a partition whose highwater we know counts as read to its end. Tansu's
# offsets can run past the last record after multi-record batches, so `position >= highwater` alone
# could wait forever.
_IDLE_POLLS = 3
_POLL_MS = 100
# Sends in flight at once while replaying; aiokafka keeps them in order per partition.
_REPLAY_WINDOW = 500
# Seconds a reader's consumer gets to close its connections once the read is over or has failed.
_STOP_TIMEOUT = 5.0
# Marks an inbox record put back by `relay quarantine replay`, so logs and debugging can tell it apart.
QUARANTINE_REPLAY_HEADER = ("relay-replay", b"quarantine")

_T = TypeVar("_T")


# ---------------------------------------------------------------------------------------------- parsing


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        # In UTC now: "0001-01-01T00:00+01:00" parses, but converting it later for display would overflow.
        return _aware(datetime.fromisoformat(text)).astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def _parse_int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


@dataclass(frozen=True)
class DeadLetter:
    """One record of ``relay.<target>.dlq``: the original event plus why it was given up."""

    target: str
    connection: str  # the connection name, as configured
    conn_id: str  # "{source}/{connection}", what the runtime matches a replay against
    action: str
    event_id: str
    source: str
    reason: str
    class_: str
    http_status: int | None
    vendor_code: str | None
    attempts: int
    first_attempt_at: datetime
    last_attempt_at: datetime
    idempotency_key: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    topic: str
    partition: int
    offset: int
    timestamp: datetime
    hint: str | None = None  # the vendor's advice (Maxma's ``hint``)
    opened_circuit: bool = False  # this failure opened the connection's circuit (credentials, shop)

    @classmethod
    def from_record(cls, rec: Any) -> DeadLetter:
        """Parse an aiokafka ``ConsumerRecord``; missing headers become empty values, never an error.

        A malformed dead letter still has to be listed: it is the only trace of a failed delivery.
        """
        headers = tuple((k, bytes(v or b"")) for k, v in (rec.headers or ()))

        def h(name: str) -> str | None:
            return header(headers, PREFIX + name)

        timestamp = datetime.fromtimestamp(rec.timestamp / 1000, UTC)
        source = (header(headers, "ce_source") or "").rsplit("/", 1)[-1]
        connection = h("connection") or ""
        target = h("target") or rec.topic.removeprefix("relay.").removesuffix(".dlq")
        last = _parse_time(h("last-attempt-at")) or timestamp
        return cls(
            target=target,
            connection=connection,
            conn_id=f"{source}/{connection}",
            action=h("action") or "",
            event_id=header(headers, "ce_id") or "",
            source=source,
            reason=h("reason") or "",
            class_=h("class") or "",
            http_status=_parse_int(h("http-status")),
            vendor_code=h("vendor-code"),
            attempts=_parse_int(h("attempts")) or 0,
            first_attempt_at=_parse_time(h("first-attempt-at")) or last,
            last_attempt_at=last,
            idempotency_key=h("idempotency-key") or "",
            key=rec.key,
            value=bytes(rec.value or b""),
            headers=headers,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            timestamp=timestamp,
            hint=h("vendor-hint") or None,
            opened_circuit=h("circuit") == "opened",
        )


@dataclass(frozen=True)
class DlqFilter:
    """Which dead letters an operator means; an unset field matches everything.

    ``since`` is inclusive and ``until`` exclusive, both on the last attempt.
    """

    targets: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    event_id: str | None = None
    reason: str | None = None

    def matches(self, dl: DeadLetter) -> bool:
        if self.targets and dl.target not in self.targets:
            return False
        if self.since is not None and dl.last_attempt_at < _aware(self.since):
            return False
        if self.until is not None and dl.last_attempt_at >= _aware(self.until):
            return False
        if self.event_id and dl.event_id != self.event_id:
            return False
        return not (self.reason and self.reason.casefold() not in dl.reason.casefold())


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``30m``, ``1h``, ``2d`` ago, or an ISO 8601 time (UTC when it has no offset); raise ValueError."""
    m = _DURATION.match(text)
    if m:
        try:
            ago = timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))})
            return (now or datetime.now(UTC)) - ago
        except OverflowError:
            # timedelta and datetime stop at 999999999 days and the year 1: an OverflowError otherwise.
            raise ValueError(f"{text!r} is too long ago: an age reaches back to the year 1 at most") from None
    try:
        return _aware(datetime.fromisoformat(text.strip().replace("Z", "+00:00")))
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 1h, 2d) nor an ISO time (2024-03-14T09:00:00+03:00)"
        ) from None


def replay_headers(dl: DeadLetter) -> list[tuple[str, bytes]]:
    """The original event's headers plus the three that aim the replay at one delivery only."""
    kept = [(k, v) for k, v in dl.headers if not k.startswith(PREFIX) and k not in REPLAY_HEADERS]
    return [
        *kept,
        (REPLAY_TARGET, dl.target.encode()),
        (REPLAY_CONNECTION, dl.conn_id.encode()),
        (REPLAY_ACTION, dl.action.encode()),
    ]


def _text_header(headers: Sequence[tuple[str, bytes]], name: str) -> str:
    # Not events.header(): a quarantine header cut mid-character must not hide the record from the list.
    return next((v.decode("utf-8", "replace") for k, v in headers if k == name), "")


@dataclass(frozen=True)
class Quarantined:
    """One record of ``klientiks.quarantine.v1``: the raw inbox record and why the normalizer set it aside.

    The inbox fields are read leniently (a ``bad_record`` may be anything); what cannot be read is empty.
    ``query`` and ``body`` are raw personal data: display them only through :func:`quarantine_params`.
    """

    event_id: str
    source: str
    event: str
    received_at: datetime  # the inbox record's, or the Kafka timestamp when it has none
    reason: str
    detail: str
    method: str
    query: str
    content_type: str | None
    body: str | None  # None when the body is not UTF-8 (the inbox record carries it as base64)
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    topic: str
    partition: int
    offset: int
    timestamp: datetime

    @classmethod
    def from_record(cls, rec: Any) -> Quarantined:
        """Parse an aiokafka ``ConsumerRecord``; never raises, as the record may be the unreadable kind."""
        headers = tuple((k, bytes(v or b"")) for k, v in (rec.headers or ()))
        value = bytes(rec.value or b"")
        try:
            loaded = json.loads(value)
        except ValueError:
            loaded = None
        fields: dict[str, Any] = loaded if isinstance(loaded, dict) else {}

        def text(name: str) -> str:
            v = fields.get(name)
            return v if isinstance(v, str) else ""

        timestamp = datetime.fromtimestamp(rec.timestamp / 1000, UTC)
        content_type = fields.get("content_type")
        return cls(
            event_id=text("id"),
            source=text("source"),
            event=text("event"),
            received_at=_parse_time(text("received_at")) or timestamp,
            reason=_text_header(headers, "reason"),
            detail=_text_header(headers, "detail"),
            method=text("method"),
            query=text("query"),
            content_type=content_type if isinstance(content_type, str) else None,
            body=None if fields.get("body_b64") is not None else text("body"),
            key=rec.key,
            value=value,
            headers=headers,
            topic=rec.topic,
            partition=rec.partition,
            offset=rec.offset,
            timestamp=timestamp,
        )


@dataclass(frozen=True)
class QuarantineFilter:
    """Which quarantined records an operator means; an unset field matches everything.

    Reasons, sources and webhook names match exactly, in any case. ``since`` is inclusive and ``until``
    exclusive, both on the time the webhook was received.
    """

    reasons: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    event_id: str | None = None

    def matches(self, q: Quarantined) -> bool:
        def among(value: str, wanted: tuple[str, ...]) -> bool:
            return not wanted or value.casefold() in {w.casefold() for w in wanted}

        if not (among(q.reason, self.reasons) and among(q.source, self.sources)):
            return False
        if not among(q.event, self.events):
            return False
        if self.since is not None and q.received_at < _aware(self.since):
            return False
        if self.until is not None and q.received_at >= _aware(self.until):
            return False
        return not (self.event_id and q.event_id != self.event_id)


def distinct(records: Iterable[Quarantined]) -> list[Quarantined]:
    """The first of each record id, in the given order.

    A replayed record that is quarantined again is on the topic twice, with the same id and value.
    Records without a readable id count as the same when their key and value are.
    """
    seen: set[object] = set()
    out: list[Quarantined] = []
    for q in records:
        ident: object = q.event_id or (q.key, q.value)
        if ident not in seen:
            seen.add(ident)
            out.append(q)
    return out


def _body_pairs(content_type: str | None, body: str) -> list[tuple[str, str]]:
    # The ingest API's rules (services/ingest/parsing.py), but never raising: a bad body is why some
    # records are here at all.
    ctype = (content_type or "").split(";")[0].strip().lower()
    if ctype == "application/json" or (not ctype and body.lstrip().startswith("{")):
        try:
            obj = json.loads(body)
        except ValueError:
            return [("(body)", body)]
        if not isinstance(obj, dict):
            return [("(body)", body)]
        return [
            (str(k), v if isinstance(v, str) else "" if v is None else json.dumps(v, ensure_ascii=False))
            for k, v in obj.items()
        ]
    if ctype in ("", "application/x-www-form-urlencoded", "text/plain"):
        return parse_qsl(body, keep_blank_values=True)
    return [("(body)", body)]


def quarantine_params(q: Quarantined) -> list[tuple[str, str]]:
    """The request's parameters (query string, then body) with personal data and secrets masked."""
    pairs = parse_qsl(q.query, keep_blank_values=True)
    if q.body is None:
        pairs.append(("(body)", "<not UTF-8>"))
    elif q.body.strip():
        pairs.extend(_body_pairs(q.content_type, q.body))
    return mask_pairs(pairs)


# ---------------------------------------------------------------------------------------------- Kafka I/O


async def read_dlq(
    bootstrap: str,
    targets: Iterable[str],
    flt: DlqFilter | None = None,
    *,
    # A parameter, not the caller's asyncio.timeout(): it also sizes the consumer's request timeout.
    timeout: float = 15.0,  # noqa: ASYNC109
) -> list[DeadLetter]:
    """Every matching dead letter of the targets' DLQ topics, from the start to their end as of now.

    No consumer group and no commits. A topic that does not exist yet has no dead letters. Raise
    TimeoutError when the topics cannot be read to their end within ``timeout`` seconds, ValueError when
    ``timeout`` is not a finite number above 0.
    """
    flt = flt or DlqFilter()

    def keep(rec: Any) -> DeadLetter | None:
        dl = DeadLetter.from_record(rec)
        return dl if flt.matches(dl) else None

    topics = list(dict.fromkeys(dlq_topic(t) for t in targets))
    return await _read_topics(bootstrap, topics, keep, timeout)


async def read_quarantine(
    bootstrap: str,
    flt: QuarantineFilter | None = None,
    *,
    timeout: float = 15.0,  # noqa: ASYNC109 - as read_dlq's
) -> list[Quarantined]:
    """Every matching record of klientiks.quarantine.v1, from its start to its end as of now.

    In partition and offset order (one key's records keep their order). No consumer group and no
    commits; a topic that does not exist yet is empty. Raise as :func:`read_dlq` does.
    """
    flt = flt or QuarantineFilter()

    def keep(rec: Any) -> Quarantined | None:
        q = Quarantined.from_record(rec)
        return q if flt.matches(q) else None

    return await _read_topics(bootstrap, [QUARANTINE], keep, timeout)


async def _read_topics(
    bootstrap: str,
    topics: Sequence[str],
    keep: Callable[[Any], _T | None],
    timeout: float,  # noqa: ASYNC109
) -> list[_T]:
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"the timeout must be a number of seconds above 0, not {timeout!r}")
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        request_timeout_ms=max(1000, int(timeout * 1000)),
    )
    # Stopped whatever happens, a failed or timed-out start() included: a consumer left open keeps its
    # connections and background tasks, and asyncio reports it as unclosed. Outside the timeout, which
    # may already have run out.
    try:
        async with asyncio.timeout(timeout):
            await consumer.start()
            existing = await consumer.topics()
            tps = [
                TopicPartition(topic, p)
                for topic in topics
                if topic in existing
                for p in sorted(consumer.partitions_for_topic(topic) or ())
            ]
            if not tps:
                return []
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            return await _read_to_end(consumer, tps, keep)
    finally:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_STOP_TIMEOUT):
                await consumer.stop()


async def _read_to_end(
    consumer: AIOKafkaConsumer, tps: Sequence[TopicPartition], keep: Callable[[Any], _T | None]
) -> list[_T]:
    # The end of each partition is its first known highwater: records that arrive later are not ours.
    ends: dict[TopicPartition, int] = {}
    idle: dict[TopicPartition, int] = dict.fromkeys(tps, 0)
    order = {tp: i for i, tp in enumerate(tps)}
    pending = set(tps)
    found: list[tuple[int, int, _T]] = []
    while pending:
        batch = await consumer.getmany(*pending, timeout_ms=_POLL_MS)
        for tp in list(pending):
            records = batch.get(tp, [])
            if tp not in ends and (hw := consumer.highwater(tp)) is not None:
                ends[tp] = hw
            for rec in records:
                if tp in ends and rec.offset >= ends[tp]:
                    continue
                item = keep(rec)
                if item is not None:
                    found.append((order[tp], rec.offset, item))
            idle[tp] = 0 if records else idle[tp] + 1
            if tp in ends and (await consumer.position(tp) >= ends[tp] or idle[tp] >= _IDLE_POLLS):
                pending.discard(tp)
                consumer.pause(tp)
    found.sort(key=lambda f: (f[0], f[1]))
    return [item for _, _, item in found]


_Send = tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]  # topic, value, key, headers


async def replay(
    bootstrap: str,
    dead_letters: Sequence[DeadLetter],
    *,
    on_progress: Callable[[int], None] | None = None,
    producer_config: Mapping[str, Any] | None = None,
) -> int:
    """Publish each dead letter's event to klientiks.events.v1 under its original key; return the count.

    ``on_progress`` gets the number acknowledged so far. Replays are in DLQ order, so one client's
    events keep their order. ``producer_config`` adds aiokafka options (client_id, timeouts); acks is
    always "all".
    """
    sends = ((EVENTS, dl.value, dl.key, replay_headers(dl)) for dl in dead_letters)
    return await _publish(bootstrap, sends, on_progress, producer_config)


async def replay_quarantine(
    bootstrap: str,
    records: Sequence[Quarantined],
    *,
    on_progress: Callable[[int], None] | None = None,
    producer_config: Mapping[str, Any] | None = None,
) -> int:
    """Put quarantined records back on klientiks.inbox.v1 for the normalizer; return how many.

    Each value goes unchanged under its original key (so to its original partition), in the given
    order, with only the ``relay-replay: quarantine`` header. A record id given twice is published once
    (:func:`distinct`). ``on_progress`` and ``producer_config`` are as for :func:`replay`.
    """
    sends = ((INBOX, q.value, q.key, [QUARANTINE_REPLAY_HEADER]) for q in distinct(records))
    return await _publish(bootstrap, sends, on_progress, producer_config)


async def _publish(
    bootstrap: str,
    sends: Iterable[_Send],
    on_progress: Callable[[int], None] | None,
    producer_config: Mapping[str, Any] | None,
) -> int:
    producer = AIOKafkaProducer(**{**(producer_config or {}), "bootstrap_servers": bootstrap, "acks": "all"})
    await producer.start()
    done = 0
    try:
        window: list[asyncio.Future[Any]] = []
        for topic, value, key, headers in sends:
            window.append(await producer.send(topic, value, key=key, headers=headers))
            if len(window) >= _REPLAY_WINDOW:
                done = await _settle(window, done, on_progress)
        done = await _settle(window, done, on_progress)
    finally:
        await producer.stop()
    return done


async def _settle(
    window: list[asyncio.Future[Any]], done: int, on_progress: Callable[[int], None] | None
) -> int:
    last_report = 0.0
    for fut in window:
        await fut
        done += 1
        # A callback per record would redraw a progress bar thousands of times a second.
        if on_progress is not None and (time.monotonic() - last_report > 0.05 or fut is window[-1]):
            on_progress(done)
            last_report = time.monotonic()
    window.clear()
    return done
