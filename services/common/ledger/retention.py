"""Retention: how long each kind of row keeps personal data, and the batched purge that ends it.

Each table is purged oldest first, at most ``batch`` rows per transaction, and after each transaction the
purge waits as long as it took: SQLite's one write lock and PostgreSQL's row locks are never held long, and
the group commit's transactions (deliveries being recorded) take turns with the purge's.

Never purged by age (``KEPT``): ``parked``, ``ingest_spool`` and ``ingest_waiting`` hold live work (a delivery
waiting for its retry, a webhook not yet in Kafka, one waiting for the Klientiks API); each row leaves when its
work is done, and deleting it would lose a delivery or a webhook.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import ColumnElement, Select, Table, and_, delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from services.common.ledger.core import LedgerCore
from services.common.ledger.entities import PENDING
from services.common.ledger.schema import (
    ATTEMPTS,
    DEDUPE,
    DELIVERIES,
    ENTITIES,
    EVENTS,
    SETTLED,
    STEPS,
)

# Advisory lock id (PostgreSQL) of the background purge: one replica purges at a time.
PURGE_LOCK = 0x6B6C5052
# What the purge removes, in the order it removes it; and what it never removes by age.
TABLES = ("events", "delivery_attempts", "deliveries", "delivery_steps", "entity_map", "ingest_dedupe")
KEPT = ("parked", "ingest_spool", "ingest_waiting")
# Both drivers bind at most 32,767 parameters, and a batch's keys are bound one each.
MAX_PURGE_BATCH = 10_000

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class RetentionPolicy:
    """How old a row of each table may get, in days (None: kept for ever); see ``RetentionSettings``."""

    events_days: float | None = 30.0
    attempts_days: float | None = 90.0
    deliveries_days: float | None = None  # settled deliveries, with their attempts and steps
    entities_days: float | None = None  # never an entity whose create is in doubt (PENDING)
    dedupe_s: float | None = None  # the dedupe window's memory: 2 x ingest.dedupe_window_s

    def cutoffs(self, now: datetime) -> dict[str, datetime | None]:
        """Per table of ``TABLES``: its rows older than this go (None: none go by age)."""

        def before(days: float | None) -> datetime | None:
            return None if days is None else now - timedelta(days=days)

        deliveries = before(self.deliveries_days)
        return {
            "events": before(self.events_days),
            "delivery_attempts": before(self.attempts_days),
            "deliveries": deliveries,
            "delivery_steps": deliveries,  # a step goes with its delivery, never alone
            "entity_map": before(self.entities_days),
            "ingest_dedupe": None if self.dedupe_s is None else now - timedelta(seconds=self.dedupe_s),
        }


@dataclass(frozen=True)
class PurgeReport:
    """Rows removed per table of ``TABLES`` (a dry run: rows that would be), and the cutoffs applied."""

    rows: dict[str, int]
    cutoffs: dict[str, datetime | None]
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.rows.values())


@dataclass(frozen=True)
class _ByAge:
    """A table whose rows go once ``age`` is before the cutoff (and ``only`` holds)."""

    table: Table
    keys: tuple[Any, ...]  # the primary key's columns
    age: Any
    only: ColumnElement[bool] | None = None

    def old(self, cutoff: datetime) -> ColumnElement[bool]:
        cond = self.age < cutoff
        return cond if self.only is None else and_(cond, self.only)


_BY_AGE = {
    "events": _ByAge(EVENTS, (EVENTS.c.id,), EVENTS.c.received_at),
    "delivery_attempts": _ByAge(ATTEMPTS, (ATTEMPTS.c.id,), ATTEMPTS.c.started_at),
    "entity_map": _ByAge(
        ENTITIES,
        (ENTITIES.c.connection, ENTITIES.c.kind, ENTITIES.c.klientiks_id),
        ENTITIES.c.updated_at,
        # An in-doubt create (the target may have the object) is an operator's to resolve, not the clock's.
        ENTITIES.c.target_id != PENDING,
    ),
    "ingest_dedupe": _ByAge(DEDUPE, (DEDUPE.c.fingerprint,), DEDUPE.c.received_at),
}


def _settled_before(cutoff: datetime) -> ColumnElement[bool]:
    """Deliveries whose key may go: settled (a pending or parked one is live work) and untouched since."""
    return and_(DELIVERIES.c.status.in_(sorted(s.value for s in SETTLED)), DELIVERIES.c.updated_at < cutoff)


class Retention(LedgerCore):
    async def purge(
        self,
        policy: RetentionPolicy,
        *,
        now: datetime,
        dry_run: bool = False,
        batch: int = 1000,
        progress: Progress | None = None,
    ) -> PurgeReport:
        """Remove every row past ``policy`` at ``now``, oldest first, at most ``batch`` rows per transaction.

        ``progress(table, rows)`` hears of each committed batch (so a purge that fails half-way still counts
        what it removed). A dry run removes nothing and counts what a purge would remove.
        """
        if not 1 <= batch <= MAX_PURGE_BATCH:
            raise ValueError(f"batch must be 1 to {MAX_PURGE_BATCH}, not {batch}")
        cutoffs = policy.cutoffs(now)
        if dry_run:
            return PurgeReport(await self._would_purge(cutoffs), cutoffs, dry_run=True)
        rows = dict.fromkeys(TABLES, 0)

        def removed(counts: dict[str, int]) -> None:
            for table, n in counts.items():
                rows[table] += n
                if progress is not None and n:
                    progress(table, n)

        for table in TABLES:
            cutoff = cutoffs[table]
            if cutoff is None or table == "delivery_steps":  # the steps go in the deliveries' batches
                continue
            one = (
                partial(self._purge_deliveries, cutoff, batch)
                if table == "deliveries"
                else partial(self._purge_by_age, table, _BY_AGE[table], cutoff, batch)
            )
            await self._in_batches(one, batch, removed)
        return PurgeReport(rows, cutoffs)

    async def _in_batches(
        self,
        one: Callable[[], Awaitable[tuple[int, dict[str, int]]]],
        batch: int,
        removed: Callable[[dict[str, int]], None],
    ) -> None:
        """Run ``one`` transaction after another until one finds fewer than ``batch`` rows."""
        while True:
            started = time.monotonic()
            found, counts = await one()
            removed(counts)
            if found < batch:
                return
            # As long as the batch took: other writers (the group commit) get the database half the time.
            # SQLite's busy handler polls for the lock: a lock taken back at once would starve them.
            await asyncio.sleep(time.monotonic() - started)

    def _oldest(
        self, keys: tuple[Any, ...], where: ColumnElement[bool], order: Any, batch: int
    ) -> Select[Any]:
        q = select(*keys).where(where).order_by(order).limit(batch)
        # PostgreSQL: a row a writer holds is left for the next run rather than waited for.
        return q.with_for_update(skip_locked=True) if self.dialect == "postgresql" else q

    async def _purge_by_age(
        self, table: str, rule: _ByAge, cutoff: datetime, batch: int
    ) -> tuple[int, dict[str, int]]:
        old = rule.old(cutoff)
        key = rule.keys[0] if len(rule.keys) == 1 else tuple_(*rule.keys)
        # One statement: the candidates and their deletion in one transaction on either database, the
        # condition checked again on each row (a row updated meanwhile on PostgreSQL stays).
        stmt = delete(rule.table).where(key.in_(self._oldest(rule.keys, old, rule.age, batch)), old)
        async with self.engine.begin() as conn:
            n = (await conn.execute(stmt)).rowcount
        return n, {table: n}

    async def _purge_deliveries(self, cutoff: datetime, batch: int) -> tuple[int, dict[str, int]]:
        """One batch of settled deliveries, with their attempts and finished steps, in one transaction."""
        old = _settled_before(cutoff)
        pick = self._oldest((DELIVERIES.c.id,), old, DELIVERIES.c.updated_at, batch)
        async with self.engine.begin() as conn:
            ids = list((await conn.execute(pick)).scalars())
            if not ids:
                return 0, {}
            # Checked again: a replay may have made one pending since it was picked (SQLite reads outside
            # the transaction until its first write; PostgreSQL holds the picked rows locked).
            mine = and_(DELIVERIES.c.id.in_(ids), old)
            # Explicitly, not by the foreign key's cascade alone: so they are counted.
            theirs = ATTEMPTS.c.delivery_id.in_(select(DELIVERIES.c.id).where(mine))
            attempts = await self._delete(conn, delete(ATTEMPTS).where(theirs))
            gone = delete(DELIVERIES).where(mine).returning(DELIVERIES.c.idempotency_key)
            keys = list((await conn.execute(gone)).scalars())
            steps = (
                await self._delete(conn, delete(STEPS).where(STEPS.c.idempotency_key.in_(keys)))
                if keys
                else 0
            )
        return len(ids), {"deliveries": len(keys), "delivery_attempts": attempts, "delivery_steps": steps}

    @staticmethod
    async def _delete(conn: AsyncConnection, stmt: Any) -> int:
        return int((await conn.execute(stmt)).rowcount)

    async def _would_purge(self, cutoffs: dict[str, datetime | None]) -> dict[str, int]:
        """What :meth:`purge` would remove at these cutoffs, counted the way it removes it."""
        counts = dict.fromkeys(TABLES, 0)
        async with self.engine.connect() as conn:

            async def count(table: Table, where: ColumnElement[bool]) -> int:
                return int(
                    (await conn.execute(select(func.count()).select_from(table).where(where))).scalar_one()
                )

            for table, rule in _BY_AGE.items():
                if (cutoff := cutoffs[table]) is not None:
                    counts[table] = await count(rule.table, rule.old(cutoff))
            if (cutoff := cutoffs["deliveries"]) is not None:
                old = _settled_before(cutoff)
                counts["deliveries"] = await count(DELIVERIES, old)
                # Their attempts the age purge, which runs first, has not taken already.
                theirs: ColumnElement[bool] = ATTEMPTS.c.delivery_id.in_(select(DELIVERIES.c.id).where(old))
                if (attempts := cutoffs["delivery_attempts"]) is not None:
                    theirs = and_(theirs, ATTEMPTS.c.started_at >= attempts)
                counts["delivery_attempts"] += await count(ATTEMPTS, theirs)
                keys = select(DELIVERIES.c.idempotency_key).where(old)
                counts["delivery_steps"] = await count(STEPS, STEPS.c.idempotency_key.in_(keys))
        return counts
