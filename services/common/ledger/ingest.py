"""The normalizer's and the ingest API's tables: the spool, the dedupe window, records waiting for the API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import Connection

from services.common.ledger.core import _Op
from services.common.ledger.history import History
from services.common.ledger.schema import DEDUPE, SPOOL, WAITING

# Advisory lock ids (PostgreSQL): any constants the other code does not use.
SPOOL_LOCK = 0x6B6C5350  # the spool drainer
WAITING_LOCK = 0x6B6C5357  # the normalizer that releases records waiting for the Klientiks API


@dataclass(frozen=True)
class Spooled:
    seq: int
    record_id: str
    kafka_key: str
    record: str


@dataclass(frozen=True)
class Waiting:
    """An inbox record held back by the normalizer until the Klientiks API completes it."""

    seq: int
    event_id: str
    source: str
    inbox_key: str
    record: str
    thin: bool

    @classmethod
    def of(cls, r: Any) -> Waiting:
        return cls(r.seq, r.event_id, r.source, r.inbox_key, r.record, bool(r.thin))


@dataclass(frozen=True)
class Seen:
    """One webhook as the dedupe window sees it."""

    fingerprint: str
    scope: str
    event_id: str
    received_at: datetime
    # A state change (appointment-changed): an older different state of the scope stops counting as seen.
    supersedes: bool = False


class Intake(History):
    _dedupe_forgotten_at: datetime | None = None  # the received_at of the last forgetting (this process)

    # -- the spool (the ingest API, while Kafka is unreachable) ------------------------------------------

    async def spool(self, *, record_id: str, kafka_key: str, record: str) -> None:
        """Keep a webhook Kafka did not take; committed (with others queued meanwhile) before returning."""
        await self._writes.submit("spool", record_id=record_id, kafka_key=kafka_key, record=record)

    async def drain_spool(
        self, publish: Callable[[list[Spooled]], Awaitable[None]], limit: int = 500
    ) -> int | None:
        """Hand the oldest spooled webhooks to ``publish``; delete them once it returns. Returns the count.

        None: another process is draining (PostgreSQL only). One drainer at a time keeps the spool's
        order; on PostgreSQL a transaction-scoped advisory lock elects it and a crash releases it.
        """
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                got = (
                    await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SPOOL_LOCK})
                ).scalar()
                if not got:
                    return None
            rows = await conn.execute(select(SPOOL).order_by(SPOOL.c.seq).limit(limit))
            batch = [Spooled(r.seq, r.record_id, r.kafka_key, r.record) for r in rows]
            if batch:
                await publish(batch)
                await conn.execute(delete(SPOOL).where(SPOOL.c.seq.in_([b.seq for b in batch])))
            return len(batch)

    async def spool_depth(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(SPOOL))).scalar_one())

    def _write_spool(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        conn.execute(self._insert_ignore(SPOOL, "record_id"), [
            dict(record_id=o.args["record_id"], kafka_key=o.args["kafka_key"], record=o.args["record"],
                 spooled_at=now) for o in ops
        ])  # fmt: skip

    # -- the dedupe window and the history of a batch (the normalizer) -----------------------------------

    async def intake(
        self, seen: Sequence[Seen], histories: Sequence[dict[str, Any]], *, window_s: float
    ) -> dict[str, str]:
        """Claim a batch's fingerprints and keep its history in one transaction; returns the repeats.

        ``histories`` are :meth:`add_event` keyword sets; a repeat's gets ``duplicate_of``. With
        ``window_s`` 0 nothing is claimed and nothing repeats.
        """
        result: dict[str, str] = await self._writes.submit(
            "intake", seen=list(seen) if window_s else [], window_s=window_s,
            rows=[self._history_row(h) for h in histories],
        )  # fmt: skip
        return result

    def _write_intake(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        for o in ops:  # one per normalizer batch; several only when batches of two callers meet
            repeats = self._claim(conn, o.args["seen"], o.args["window_s"])
            for row in o.args["rows"]:
                if row["id"] in repeats:
                    row["duplicate_of"] = repeats[row["id"]]
            self._upsert_events(conn, o.args["rows"])
            o.args["result"] = repeats

    async def claim_fingerprints(self, seen: Sequence[Seen], *, window_s: float) -> dict[str, str]:
        """Remember these webhooks (in order); return {event id: first event id} for the repeats.

        A webhook repeats another when their fingerprints match, their ids differ and they were received
        within ``window_s`` of each other. The same id again is a redelivery, not a repeat: downstream
        idempotency covers it, and a replay must pass.
        """
        if not seen:
            return {}
        async with self.engine.begin() as conn:
            return await conn.run_sync(self._claim, seen, window_s)

    def _claim(self, conn: Connection, seen: Sequence[Seen], window_s: float) -> dict[str, str]:
        if not seen:
            return {}
        window = timedelta(seconds=window_s)
        repeats: dict[str, str] = {}
        rows = conn.execute(select(DEDUPE).where(DEDUPE.c.fingerprint.in_({s.fingerprint for s in seen})))
        known: dict[str, tuple[str, str, datetime]] = {
            r.fingerprint: (r.scope, r.event_id, r.received_at) for r in rows
        }
        changed: dict[str, Seen] = {}
        superseded: dict[str, str] = {}  # scope -> the fingerprint that now stands for it
        for s in seen:
            prior = known.get(s.fingerprint)
            if prior and prior[1] != s.event_id and abs(s.received_at - prior[2]) <= window:
                repeats[s.event_id] = prior[1]
                continue
            if prior and prior[1] == s.event_id:
                continue
            known[s.fingerprint] = (s.scope, s.event_id, s.received_at)
            changed[s.fingerprint] = s
            if s.supersedes:
                superseded[s.scope] = s.fingerprint
                for fp, (scope, _, _) in list(known.items()):
                    if scope == s.scope and fp != s.fingerprint:
                        del known[fp]
                        changed.pop(fp, None)
        for scope, fp in superseded.items():
            conn.execute(delete(DEDUPE).where(DEDUPE.c.scope == scope, DEDUPE.c.fingerprint != fp))
        if changed:
            conn.execute(
                self._upsert(DEDUPE, ["fingerprint"], ["scope", "event_id", "received_at"]),
                [dict(fingerprint=s.fingerprint, scope=s.scope, event_id=s.event_id, received_at=s.received_at)
                 for s in changed.values()],
            )  # fmt: skip
        # Forget what left the window, once per tenth of it (a statement per batch was a tenth of the
        # normalizer's ledger time); rows a little past the window are only never matched.
        newest = max(s.received_at for s in seen)
        last = self._dedupe_forgotten_at
        if last is None or newest - last >= window / 10 or newest < last:
            conn.execute(delete(DEDUPE).where(DEDUPE.c.received_at < newest - 2 * window))
            self._dedupe_forgotten_at = newest
        return repeats

    # -- records waiting for the Klientiks API (the normalizer) ------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, lock: int) -> AsyncIterator[bool]:
        """Whether this process holds ``lock`` (a PostgreSQL session lock) while the block runs.

        Always True on SQLite, which one process uses at a time.
        """
        if self.dialect != "postgresql":
            yield True
            return
        async with self.engine.connect() as conn:
            got = bool((await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": lock})).scalar())
            try:
                yield got
            finally:
                if got:
                    with contextlib.suppress(Exception):
                        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock})

    async def waiting_keys(self, keys: Sequence[str]) -> set[str]:
        """Which of these inbox keys have a record waiting: later records of those keys wait behind it."""
        if not keys:
            return set()
        q = select(WAITING.c.inbox_key).where(WAITING.c.inbox_key.in_(set(keys))).distinct()
        async with self.engine.connect() as conn:
            return {r.inbox_key for r in await conn.execute(q)}

    async def waiting_thin(self) -> dict[str, int]:
        """Per source, how many thin webhooks wait for the Klientiks API."""
        q = select(WAITING.c.source, func.count()).where(WAITING.c.thin == 1).group_by(WAITING.c.source)
        async with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in await conn.execute(q)}

    async def hold(self, records: Sequence[Waiting]) -> None:
        """Keep these records (in order) until :meth:`release`; a record held already stays as it is."""
        if not records:
            return
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            q = select(WAITING.c.event_id).where(WAITING.c.event_id.in_([w.event_id for w in records]))
            held = {r.event_id for r in await conn.execute(q)}
            rows = [
                dict(event_id=w.event_id, source=w.source, inbox_key=w.inbox_key, record=w.record,
                     thin=int(w.thin), waiting_since=now)
                for w in records
                if w.event_id not in held
            ]  # fmt: skip
            if rows:
                await conn.execute(WAITING.insert(), rows)

    async def waiting_heads(self, limit: int = 100) -> list[Waiting]:
        """The oldest waiting record of each key (at most ``limit`` keys, oldest first)."""
        heads = select(func.min(WAITING.c.seq).label("seq")).group_by(WAITING.c.inbox_key).subquery()
        q = select(WAITING).join(heads, WAITING.c.seq == heads.c.seq).order_by(WAITING.c.seq).limit(limit)
        async with self.engine.connect() as conn:
            return [Waiting.of(r) for r in await conn.execute(q)]

    async def waiting_next(self, inbox_key: str) -> Waiting | None:
        q = select(WAITING).where(WAITING.c.inbox_key == inbox_key).order_by(WAITING.c.seq).limit(1)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).first()
            return Waiting.of(row) if row else None

    async def release(self, event_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(WAITING).where(WAITING.c.event_id == event_id))
