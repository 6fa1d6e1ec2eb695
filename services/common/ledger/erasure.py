"""Erasure: one client's personal data masked across the ledger, its ids and delivery states kept.

What identifies a person (the raw webhook, the normalized event, the phone index, vendor messages, hashes of
what was sent, webhooks not yet normalized) is masked or deleted; what stops a second effect stays (event
ids, idempotency keys, states, attempts, the target's ids). ``relay events forget``; docs/personal-data.md.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl

from sqlalchemy import ColumnElement, Executable, and_, bindparam, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.ledger.core import LedgerCore, PhoneSearchUnavailable, phone_hash
from services.common.ledger.schema import (
    ATTEMPTS,
    DEDUPE,
    DELIVERIES,
    ENTITIES,
    EVENTS,
    PARKED,
    SPOOL,
    STEPS,
    WAITING,
    DeliveryStatus,
)

__all__ = [
    "ERASED",
    "FORGOTTEN_PREFIX",
    "ClientMatch",
    "Erasure",
    "ErasureReport",
    "TableErasure",
    "forgotten_at",
    "forgotten_marker",
]

# What replaces a vendor's message (it may echo a name), and the error of a parked delivery settled by erasure.
ERASED = "erased on request"
# An erased event's `inbox`: valid JSON, told apart by this prefix (and by SQL LIKE, see `_plan`).
FORGOTTEN_PREFIX = '{"forgotten": true'
# Entity kinds whose "target id" is text last sent (a deal title may be templated from the client's name),
# not an id: deleted, which only makes the next change send it again.
TEXT_KINDS = frozenset({"visit-title"})
_CLIENT_PARAMS = frozenset({"client_id", "client_phone"})
_CHUNK = 500  # ids per IN (...): far below SQLite's and asyncpg's parameter limits
_T = TypeVar("_T")


def forgotten_marker(at: datetime) -> str:
    """The ``inbox`` of an erased event: that it was erased, and when."""
    return json.dumps({"forgotten": True, "at": at.astimezone(UTC).isoformat(timespec="seconds")})


def forgotten_at(inbox: str) -> datetime | None:
    """When an event's personal data was erased; None if it was not."""
    if not inbox.startswith(FORGOTTEN_PREFIX):
        return None
    try:
        at = json.loads(inbox).get("at")
        return datetime.fromisoformat(at) if isinstance(at, str) else datetime.min.replace(tzinfo=UTC)
    except (ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class ClientMatch:
    """One client of one source, by Klientiks ids and/or E.164 phone: which raw records are theirs."""

    source: str
    client_ids: frozenset[str] = frozenset()
    phone: str | None = None  # E.164
    phone_region: str = "RU"  # the source's, for phones in raw webhooks

    def inbox_client(self, raw: str | bytes) -> tuple[str | None, str | None] | None:
        """(client id, E.164 phone) a raw inbox record of this source names; None if not of this source.

        Read as the normalizer reads it (its own parsing rules), never raising: a body it cannot read leaves
        the query string, where Klientiks templates put the client.
        """
        # The normalizer's rules, not a copy of them: a phone spelled any way matches as it did there.
        # Imported here, so the ledger (imported by every service) does not load the ingest parser.
        from pydantic import ValidationError

        from services.ingest.inbox import InboxRecord
        from services.ingest.parsing import Params, normalize_phone, request_params

        try:
            record = InboxRecord.model_validate_json(raw)
        except ValidationError:
            return None
        if record.source != self.source:
            return None
        try:
            pairs = request_params(record.query, record.content_type, record.body_bytes())
        except ValueError:  # a ParamsError, or base64 that is not (a record the ingest API did not write)
            pairs = parse_qsl(record.query, keep_blank_values=True)
        params = Params.of(pairs, _CLIENT_PARAMS)
        phone = params.get("client_phone")
        return params.get("client_id"), normalize_phone(phone, self.phone_region) if phone else None

    def holds(self, client_id: str | None, phone: str | None) -> bool:
        return (client_id is not None and client_id in self.client_ids) or (
            self.phone is not None and phone == self.phone
        )

    def holds_inbox(self, raw: str | bytes) -> bool:
        """Whether a raw inbox record (a quarantined one, a spooled one) is a webhook of this client."""
        found = self.inbox_client(raw)
        return found is not None and self.holds(*found)

    def holds_event_data(self, value: bytes) -> bool:
        """Whether an event's data (``EventData`` JSON: a dead letter's value) names this client."""
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):
            return False
        client = data.get("client") if isinstance(data, dict) else None
        if not isinstance(client, dict):
            return False
        cid, phone = client.get("id"), client.get("phone")
        return self.holds(cid if isinstance(cid, str) else None, phone if isinstance(phone, str) else None)


@dataclass(frozen=True)
class TableErasure:
    """One table: the client's rows in it, and how many of them were (or would be) masked or deleted."""

    table: str
    matched: int
    masked: int = 0
    deleted: int = 0


@dataclass(frozen=True)
class ErasureReport:
    source: str
    client_ids: tuple[str, ...]  # the Klientiks ids found (given, or of the events the phone found)
    event_ids: tuple[str, ...]
    tables: tuple[TableErasure, ...]
    settled: tuple[str, ...]  # idempotency keys of parked deliveries settled as failed: they will not happen
    in_flight: tuple[str, ...]  # pending deliveries: a delivery service may still send what they carry
    newest_received: datetime | None  # the newest of the client's webhooks (for the topics' retention)
    dry_run: bool

    @property
    def found(self) -> bool:
        return any(t.matched for t in self.tables)

    @property
    def changes(self) -> int:
        return sum(t.masked + t.deleted for t in self.tables)

    def table(self, name: str) -> TableErasure:
        return next(t for t in self.tables if t.table == name)


@dataclass
class _Raw:
    """A webhook not yet (or never) normalized: a quarantined event, a waiting or spooled record."""

    table: str
    key: Any  # the row's key in its table
    event_id: str | None
    client_id: str | None
    phone: str | None


@dataclass
class _Plan:
    """What of the client each table holds; computed first, so a dry run and the erasure say the same."""

    event_ids: set[str] = field(default_factory=set)  # the events rows' and those of webhooks not in them yet
    events: dict[str, bool] = field(default_factory=dict)  # id -> still holds personal data
    client_ids: set[str] = field(default_factory=set)
    visit_ids: set[str] = field(default_factory=set)
    newest: datetime | None = None
    # id -> (idempotency key, status, error)
    deliveries: dict[int, tuple[str, str, str | None]] = field(default_factory=dict)
    attempts: dict[int, str | None] = field(default_factory=dict)  # id -> error
    parked: list[str] = field(default_factory=list)
    steps: int = 0
    dedupe: list[str] = field(default_factory=list)
    # (connection, kind, klientiks id) -> "keep" | "mask" | "delete"
    entities: dict[tuple[str, str, str], str] = field(default_factory=dict)
    spool: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)

    def report(self, source: str, dry_run: bool) -> ErasureReport:
        parked = set(self.parked)
        masked_errors = {i for i, (_, _, e) in self.deliveries.items() if _masks(e)}
        settled_ids = {i for i, (k, _, _) in self.deliveries.items() if k in parked}
        ent = list(self.entities.values())
        tables = (
            TableErasure("events", len(self.events), sum(self.events.values())),
            TableErasure("deliveries", len(self.deliveries), len(masked_errors | settled_ids)),
            TableErasure("delivery_attempts", len(self.attempts), sum(map(_masks, self.attempts.values()))),
            TableErasure("delivery_steps", self.steps),
            TableErasure("parked", len(self.parked), deleted=len(self.parked)),
            TableErasure("entity_map", len(ent), ent.count("mask"), ent.count("delete")),
            TableErasure("ingest_dedupe", len(self.dedupe), deleted=len(self.dedupe)),
            TableErasure("ingest_spool", len(self.spool), deleted=len(self.spool)),
            TableErasure("ingest_waiting", len(self.waiting), deleted=len(self.waiting)),
        )
        pending = DeliveryStatus.PENDING.value
        return ErasureReport(
            source=source,
            client_ids=tuple(sorted(self.client_ids)),
            event_ids=tuple(sorted(self.event_ids)),
            tables=tables,
            settled=tuple(sorted(self.parked)),
            in_flight=tuple(sorted(k for k, s, _ in self.deliveries.values() if s == pending)),
            newest_received=self.newest,
            dry_run=dry_run,
        )


def _masks(error: str | None) -> bool:
    return error is not None and error != ERASED


def _chunks(values: Iterable[_T]) -> Iterator[list[_T]]:
    batch: list[_T] = []
    for v in values:
        batch.append(v)
        if len(batch) == _CHUNK:
            yield batch
            batch = []
    if batch:
        yield batch


def _visits(normalized: str) -> set[str]:
    """The visit ids a normalized event names (the entity map keys visits by them)."""
    try:
        appointment = (json.loads(normalized).get("data") or {}).get("appointment") or {}
    except (ValueError, AttributeError):
        return set()
    ids = (appointment.get(k) for k in ("id", "parent_id")) if isinstance(appointment, dict) else ()
    return {i for i in ids if isinstance(i, str)}


def _closure(
    raws: list[_Raw], match: ClientMatch, event_ids: set[str]
) -> tuple[list[_Raw], ClientMatch, set[str]]:
    """The raw records of the client, the client and their event ids as the records widen them (a record found
    by the phone names the client's id, which finds the records without a phone)."""
    chosen: dict[int, _Raw] = {}
    event_ids = set(event_ids)
    while True:
        new = [
            (i, r) for i, r in enumerate(raws)
            if i not in chosen and (r.event_id in event_ids or match.holds(r.client_id, r.phone))
        ]  # fmt: skip
        if not new:
            return list(chosen.values()), match, event_ids
        for i, r in new:
            chosen[i] = r
        event_ids |= {r.event_id for _, r in new if r.event_id}
        ids = match.client_ids | {r.client_id for _, r in new if r.client_id}
        match = ClientMatch(match.source, frozenset(ids), match.phone, match.phone_region)


class Erasure(LedgerCore):
    async def forget_client(
        self,
        *,
        source: str,
        client_id: str | None = None,
        phone: str | None = None,
        phone_region: str = "RU",
        dry_run: bool = False,
    ) -> ErasureReport:
        """Mask or delete one client's personal data in every table, in one transaction; say what it touched.

        The client's events are those of ``source`` with this ``client_id`` or whose phone (any spelling,
        read with ``phone_region`` like the normalizer does) is ``phone``; both given: either. Their ids
        find the rest. Running it again is harmless and reports nothing left to mask. ``dry_run``: report
        what it would do, change nothing. Raise PhoneSearchUnavailable for a phone without the phone index
        key, ValueError for a phone that is not a valid number.
        """
        if not client_id and not phone:
            raise ValueError("give the client's id or phone")
        e164 = None
        if phone:
            if self._phone_key is None:
                raise PhoneSearchUnavailable
            from services.ingest.parsing import normalize_phone  # see ClientMatch.inbox_client

            e164 = normalize_phone(phone, phone_region)
            if e164 is None:
                raise ValueError(f"not a valid phone number of region {phone_region}")
        match = ClientMatch(source, frozenset({client_id} if client_id else ()), e164, phone_region)
        await self.flush()  # what this process queued about the client is in the tables first
        if dry_run:
            async with self.engine.connect() as conn:
                return (await self._plan(conn, match)).report(source, True)
        async with self.engine.begin() as conn:
            plan = await self._plan(conn, match)
            await self._erase(conn, plan, datetime.now(UTC))
        return plan.report(source, False)

    async def _rows(self, conn: AsyncConnection, q: Executable) -> AsyncIterator[Any]:
        # Streamed: a source's quarantined webhooks or the spool may be large, and only a few are the client's.
        result = await conn.stream(q.execution_options(yield_per=_CHUNK))
        async for row in result:
            yield row

    async def _plan(self, conn: AsyncConnection, match: ClientMatch) -> _Plan:
        plan = _Plan()
        source = match.source
        raws = await self._raw_records(conn, match)
        # The events the ids and the phone index find, the raw records of those, the events of the ids these
        # name (an event found by the phone names the client's id, which finds their events without a phone).
        ids: set[str] = set()
        searched: set[str] = set()
        index = phone_hash(match.phone, self._phone_key) if match.phone and self._phone_key else None
        chosen: list[_Raw] = []
        while True:
            conds: list[ColumnElement[bool]] = []
            if unsearched := sorted(match.client_ids - searched):
                conds.append(EVENTS.c.client_id.in_(unsearched))
                searched |= set(unsearched)
            if index is not None:
                conds.append(EVENTS.c.phone_hash == index)
                index = None
            if not conds:
                break
            found: set[str] = set()
            q = select(EVENTS.c.id, EVENTS.c.client_id).where(EVENTS.c.source == source, or_(*conds))
            async for r in self._rows(conn, q):
                ids.add(r.id)
                if r.client_id:
                    found.add(r.client_id)
            match = ClientMatch(source, match.client_ids | found, match.phone, match.phone_region)
            chosen, match, ids = _closure(raws, match, ids)
        plan.client_ids = set(match.client_ids)
        plan.event_ids = ids
        plan.waiting = [r.key for r in chosen if r.table == "ingest_waiting"]
        plan.spool = [r.key for r in chosen if r.table == "ingest_spool"]

        forgotten = EVENTS.c.inbox.startswith(FORGOTTEN_PREFIX).label("forgotten")
        for batch in _chunks(sorted(ids)):
            q = select(EVENTS.c.id, EVENTS.c.received_at, EVENTS.c.normalized, EVENTS.c.phone_hash, forgotten)
            for r in await conn.execute(q.where(EVENTS.c.source == source, EVENTS.c.id.in_(batch))):
                plan.events[r.id] = not r.forgotten or r.normalized is not None or r.phone_hash is not None
                plan.newest = max(plan.newest or r.received_at, r.received_at)
                if r.normalized:
                    plan.visit_ids |= _visits(r.normalized)
        for batch in _chunks(sorted(ids)):  # every id found, with an events row or not (a spooled webhook)
            q = select(DELIVERIES.c.id, DELIVERIES.c.idempotency_key, DELIVERIES.c.status, DELIVERIES.c.error)
            for r in await conn.execute(q.where(DELIVERIES.c.event_id.in_(batch))):
                plan.deliveries[r.id] = (r.idempotency_key, r.status, r.error)
            for r in await conn.execute(select(DEDUPE.c.fingerprint).where(DEDUPE.c.event_id.in_(batch))):
                plan.dedupe.append(r.fingerprint)
        for dbatch in _chunks(sorted(plan.deliveries)):
            q = select(ATTEMPTS.c.id, ATTEMPTS.c.error).where(ATTEMPTS.c.delivery_id.in_(dbatch))
            plan.attempts.update({r.id: r.error for r in await conn.execute(q)})
        for kbatch in _chunks(sorted(k for k, _, _ in plan.deliveries.values())):
            plan.parked += [
                r.idempotency_key
                for r in await conn.execute(
                    select(PARKED.c.idempotency_key).where(PARKED.c.idempotency_key.in_(kbatch))
                )
            ]
            steps = await conn.execute(select(STEPS.c.step).where(STEPS.c.idempotency_key.in_(kbatch)))
            plan.steps += len(steps.all())
        await self._plan_entities(conn, plan, source)
        return plan

    async def _raw_records(self, conn: AsyncConnection, match: ClientMatch) -> list[_Raw]:
        """The source's webhooks not normalized, with the client each names: they keep the client only in the
        raw record (a quarantined event has no client id or phone index, a spooled one no events row)."""
        source = match.source
        raws: list[_Raw] = []
        q = select(EVENTS.c.id, EVENTS.c.inbox).where(
            EVENTS.c.source == source, EVENTS.c.quarantine_reason.isnot(None), EVENTS.c.client_id.is_(None),
            ~EVENTS.c.inbox.startswith(FORGOTTEN_PREFIX),
        )  # fmt: skip
        async for r in self._rows(conn, q):
            raws.append(_Raw("events", r.id, r.id, *(match.inbox_client(r.inbox) or (None, None))))
        q = select(WAITING.c.seq, WAITING.c.event_id, WAITING.c.record).where(WAITING.c.source == source)
        async for r in self._rows(conn, q):
            raws.append(
                _Raw("ingest_waiting", r.seq, r.event_id, *(match.inbox_client(r.record) or (None, None)))
            )
        # The spool has no source column; its Kafka key (the routing key) starts with the source.
        q = select(SPOOL.c.seq, SPOOL.c.record_id, SPOOL.c.record).where(
            or_(SPOOL.c.kafka_key == source, SPOOL.c.kafka_key.startswith(f"{source}:", autoescape=True))
        )
        async for r in self._rows(conn, q):
            found = match.inbox_client(r.record)
            if found is not None:  # of this source: a record of another one never matches by its id
                raws.append(_Raw("ingest_spool", r.seq, r.record_id, *found))
        return raws

    async def _plan_entities(self, conn: AsyncConnection, plan: _Plan, source: str) -> None:
        """The source's entity rows of the client (``client``, and ``{x}:{client id}`` such as a lead) and
        of the client's visits; a kind keyed by visit may share the id of a client, so kinds are told apart."""
        of_source = ENTITIES.c.connection.startswith(f"{source}/", autoescape=True)
        keyed: list[ColumnElement[bool]] = []
        for batch in _chunks(sorted(plan.client_ids)):
            keyed.append(and_(ENTITIES.c.kind == "client", ENTITIES.c.klientiks_id.in_(batch)))
            keyed += [ENTITIES.c.klientiks_id.endswith(f":{c}", autoescape=True) for c in batch]
        for batch in _chunks(sorted(plan.visit_ids)):
            keyed.append(and_(ENTITIES.c.kind != "client", ENTITIES.c.klientiks_id.in_(batch)))
        for conds in _chunks(keyed):
            q = select(
                ENTITIES.c.connection, ENTITIES.c.kind, ENTITIES.c.klientiks_id, ENTITIES.c.content_hash
            )
            for r in await conn.execute(q.where(of_source, or_(*conds))):
                key = (r.connection, r.kind, r.klientiks_id)
                _, colon, last = r.klientiks_id.rpartition(":")
                by_client = (r.kind == "client" and r.klientiks_id in plan.client_ids) or (
                    bool(colon) and last in plan.client_ids
                )
                if r.kind in TEXT_KINDS and r.klientiks_id in plan.visit_ids:
                    plan.entities[key] = "delete"
                elif by_client and r.content_hash is not None:
                    plan.entities[key] = "mask"
                else:
                    plan.entities.setdefault(key, "keep")

    async def _erase(self, conn: AsyncConnection, plan: _Plan, now: datetime) -> None:
        marker = forgotten_marker(now)
        for batch in _chunks(sorted(i for i, holds in plan.events.items() if holds)):
            await conn.execute(
                update(EVENTS)
                .where(EVENTS.c.id.in_(batch))
                .values(inbox=marker, normalized=None, phone_hash=None)
            )
        for rows in _chunks(sorted(i for i, (_, _, e) in plan.deliveries.items() if _masks(e))):
            await conn.execute(update(DELIVERIES).where(DELIVERIES.c.id.in_(rows)).values(error=ERASED))
        for rows in _chunks(sorted(i for i, e in plan.attempts.items() if _masks(e))):
            await conn.execute(update(ATTEMPTS).where(ATTEMPTS.c.id.in_(rows)).values(error=ERASED))
        # A parked delivery carries the whole event: it will not be sent (nor dead-lettered, which would put
        # the event on Kafka again); its attempts stay as they were.
        for batch in _chunks(plan.parked):
            await conn.execute(delete(PARKED).where(PARKED.c.idempotency_key.in_(batch)))
            await conn.execute(
                update(DELIVERIES)
                .where(DELIVERIES.c.idempotency_key.in_(batch))
                .values(
                    status=DeliveryStatus.FAILED.value, error=ERASED, updated_at=now, next_attempt_at=None
                )
            )
        for batch in _chunks(plan.dedupe):
            await conn.execute(delete(DEDUPE).where(DEDUPE.c.fingerprint.in_(batch)))
        for seqs in _chunks(plan.spool):
            await conn.execute(delete(SPOOL).where(SPOOL.c.seq.in_(seqs)))
        for seqs in _chunks(plan.waiting):
            await conn.execute(delete(WAITING).where(WAITING.c.seq.in_(seqs)))
        entity = and_(
            ENTITIES.c.connection == bindparam("c"),
            ENTITIES.c.kind == bindparam("k"),
            ENTITIES.c.klientiks_id == bindparam("i"),
        )
        for action, stmt in (
            ("mask", update(ENTITIES).where(entity).values(content_hash=None)),
            ("delete", delete(ENTITIES).where(entity)),
        ):
            keys = [{"c": c, "k": k, "i": i} for (c, k, i), a in sorted(plan.entities.items()) if a == action]
            if keys:
                await conn.execute(stmt, keys)
