"""The event history: what arrived and what it was normalized to (``relay events show|find``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.engine import Connection

from services.common.ledger.core import LedgerCore, PhoneSearchUnavailable, _Op, phone_hash
from services.common.ledger.schema import EVENTS

# What a later write of the same event id replaces: its outcome, never what arrived.
_OUTCOME = ("client_id", "phone_hash", "kafka_key", "normalized", "quarantine_reason", "duplicate_of")
_COLUMNS = ("id", "source", "event", "received_at", "inbox", *_OUTCOME)


@dataclass(frozen=True)
class EventRecord:
    id: str
    source: str
    event: str
    received_at: datetime
    client_id: str | None
    kafka_key: str | None
    inbox: str
    normalized: str | None
    quarantine_reason: str | None
    duplicate_of: str | None = None

    @classmethod
    def of(cls, r: Any) -> EventRecord:
        return cls(r.id, r.source, r.event, r.received_at, r.client_id, r.kafka_key, r.inbox, r.normalized,
                   r.quarantine_reason, r.duplicate_of)  # fmt: skip


class History(LedgerCore):
    async def add_event(
        self, *, id: str, source: str, event: str, received_at: datetime, client_id: str | None,
        phone: str | None, kafka_key: str | None, inbox: str, normalized: str | None,
        quarantine_reason: str | None, duplicate_of: str | None = None,
    ) -> None:  # fmt: skip
        """Keep what arrived and what it became; the same id again (a replay) records its new outcome."""
        await self._writes.submit(
            "event", id=id, source=source, event=event, received_at=received_at, client_id=client_id,
            phone_hash=self._phone_hash(phone), kafka_key=kafka_key, inbox=inbox,
            normalized=normalized, quarantine_reason=quarantine_reason, duplicate_of=duplicate_of,
        )  # fmt: skip

    def _history_row(self, history: dict[str, Any]) -> dict[str, Any]:
        """An ``add_event`` keyword set as a row: the phone becomes its index value."""
        row = {k: v for k, v in history.items() if k != "phone"}
        row["phone_hash"] = self._phone_hash(history.get("phone"))
        row.setdefault("duplicate_of", None)
        return row

    async def event(self, event_id: str) -> EventRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(EVENTS).where(EVENTS.c.id == event_id))).first()
        return EventRecord.of(row) if row else None

    async def find_events(
        self,
        *,
        phone: str | None = None,
        client_id: str | None = None,
        source: str | None = None,
        limit: int = 50,
    ) -> list[EventRecord]:
        conds = []
        if phone:
            if self._phone_key is None:
                raise PhoneSearchUnavailable
            conds.append(EVENTS.c.phone_hash == phone_hash(phone, self._phone_key))
        if client_id:
            conds.append(EVENTS.c.client_id == client_id)
        if not conds:
            return []
        q = select(EVENTS).where(or_(*conds))
        if source:
            q = q.where(EVENTS.c.source == source)
        q = q.order_by(EVENTS.c.received_at.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [EventRecord.of(r) for r in await conn.execute(q)]

    def _write_event(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        self._upsert_events(conn, (o.args for o in ops))

    def _upsert_events(self, conn: Connection, rows: Iterable[dict[str, Any]]) -> None:
        # The last of one id in this batch wins, as it would one transaction later.
        by_id = {r["id"]: {c: r[c] for c in _COLUMNS} for r in rows}
        if by_id:
            conn.execute(self._upsert(EVENTS, ["id"], list(_OUTCOME)), list(by_id.values()))
