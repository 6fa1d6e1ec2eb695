"""Deliveries, their attempts and their finished steps: what makes a delivery happen once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from services.common.ledger.core import LedgerCore, _Op
from services.common.ledger.schema import ATTEMPTS, DELIVERIES, STEPS, DeliveryStatus
from services.common.outcome import Outcome, OutcomeKind

_STATUS = {
    OutcomeKind.SUCCESS: DeliveryStatus.DELIVERED,
    OutcomeKind.PERMANENT: DeliveryStatus.FAILED,
}


@dataclass(frozen=True)
class Delivery:
    id: int
    idempotency_key: str
    event_id: str
    source: str
    connection: str
    target: str
    action: str
    status: DeliveryStatus
    attempts: int
    retry_base: int
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    http_status: int | None
    vendor_code: str | None
    error: str | None
    target_ref: str | None

    @classmethod
    def of(cls, row: Any) -> Delivery:
        return cls(
            row.id, row.idempotency_key, row.event_id, row.source, row.connection, row.target, row.action,
            DeliveryStatus(row.status), row.attempts, row.retry_base, row.next_attempt_at, row.created_at, row.updated_at,
            row.delivered_at, row.http_status, row.vendor_code, row.error, row.target_ref,
        )  # fmt: skip


class _RowView:
    """Attribute access over a dict, for Delivery.of on values computed in a batch."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


class Deliveries(LedgerCore):
    async def begin(
        self,
        key: str,
        *,
        event_id: str,
        source: str,
        connection: str,
        target: str,
        action: str,
        replay: bool = False,
    ) -> Delivery:
        """Record that a delivery is wanted (if new) and return its current state.

        ``replay`` turns a failed delivery back into a pending one whose retry schedule starts again; a
        delivered one stays delivered, so a replay never causes a second effect.
        """
        result: Delivery = await self._writes.submit(
            "begin", key=key, event_id=event_id, source=source, connection=connection, target=target,
            action=action, replay=replay,
        )  # fmt: skip
        return result

    async def record(
        self,
        key: str,
        outcome: Outcome,
        *,
        started_at: datetime,
        duration_s: float,
        final: bool = False,
        next_attempt_at: datetime | None = None,
    ) -> Delivery:
        """Store one attempt and move the delivery on; ``final`` settles a retryable outcome as failed."""
        result: Delivery = await self._writes.submit(
            "record",
            key=key,
            outcome=outcome,
            started_at=started_at,
            duration_s=duration_s,
            final=final,
            next_attempt_at=next_attempt_at,
        )
        return result

    async def finish_step(self, key: str, step: str, result: str) -> None:
        """Keep a finished step's result; committed before returning, so the next step may be sent."""
        await self._writes.submit("step", key=key, step=step, result=result)

    async def finished_steps(self, key: str) -> dict[str, str]:
        """What each finished step of delivery ``key`` returned."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(STEPS.c.step, STEPS.c.result).where(STEPS.c.idempotency_key == key)
            )
            return {r.step: r.result for r in rows}

    async def get(self, key: str) -> Delivery | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(DELIVERIES).where(DELIVERIES.c.idempotency_key == key))).first()
            return Delivery.of(row) if row else None

    async def for_event(self, event_id: str) -> list[Delivery]:
        q = select(DELIVERIES).where(DELIVERIES.c.event_id == event_id).order_by(DELIVERIES.c.id)
        async with self.engine.connect() as conn:
            return [Delivery.of(r) for r in await conn.execute(q)]

    async def attempts(self, key: str) -> list[Any]:
        async with self.engine.connect() as conn:
            q = (
                select(ATTEMPTS)
                .join(DELIVERIES, DELIVERIES.c.id == ATTEMPTS.c.delivery_id)
                .where(DELIVERIES.c.idempotency_key == key)
                .order_by(ATTEMPTS.c.number)
            )
            return list(await conn.execute(q))

    async def recent(self, since: datetime, limit: int = 100) -> Sequence[Delivery]:
        """Deliveries updated after ``since``, oldest first (the live view of ``relay run``)."""
        q = (
            select(DELIVERIES)
            .where(DELIVERIES.c.updated_at > since)
            .order_by(DELIVERIES.c.updated_at)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [Delivery.of(r) for r in await conn.execute(q)]

    # -- batched writes ------------------------------------------------------------------------------

    def _write_begin(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        rows = [
            dict(idempotency_key=o.args["key"], event_id=o.args["event_id"], source=o.args["source"],
                 connection=o.args["connection"], target=o.args["target"], action=o.args["action"],
                 status=DeliveryStatus.PENDING.value, attempts=0, retry_base=0, created_at=now, updated_at=now)
            for o in ops
        ]  # fmt: skip
        conn.execute(self._insert_ignore(DELIVERIES, "idempotency_key"), rows)
        replays = [o.args["key"] for o in ops if o.args["replay"]]
        if replays:
            conn.execute(
                update(DELIVERIES)
                .where(
                    DELIVERIES.c.idempotency_key.in_(replays),
                    DELIVERIES.c.status == DeliveryStatus.FAILED.value,
                )
                .values(status=DeliveryStatus.PENDING.value, retry_base=DELIVERIES.c.attempts, updated_at=now)
            )
        keys = [o.args["key"] for o in ops]
        found = {
            r.idempotency_key: Delivery.of(r)
            for r in conn.execute(select(DELIVERIES).where(DELIVERIES.c.idempotency_key.in_(keys)))
        }
        for o in ops:
            o.args["result"] = found[o.args["key"]]

    def _write_record(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        keys = [o.args["key"] for o in ops]
        q = select(DELIVERIES).where(DELIVERIES.c.idempotency_key.in_(keys))
        current = {r.idempotency_key: r for r in conn.execute(q)}
        attempts, updates = [], []
        for o in ops:
            row, outcome = current[o.args["key"]], o.args["outcome"]
            status = _STATUS.get(
                outcome.kind, DeliveryStatus.FAILED if o.args["final"] else DeliveryStatus.PENDING
            )
            number = row.attempts + 1
            attempts.append(dict(
                delivery_id=row.id, number=number, started_at=o.args["started_at"],
                duration_ms=o.args["duration_s"] * 1000, outcome=outcome.kind.value,
                http_status=outcome.http_status, vendor_code=outcome.vendor_code, error=outcome.reason or None,
            ))  # fmt: skip
            values = dict(
                k=row.idempotency_key, attempts=number, status=status.value, updated_at=now,
                delivered_at=now if status is DeliveryStatus.DELIVERED else None,
                http_status=outcome.http_status, vendor_code=outcome.vendor_code, error=outcome.reason or None,
                target_ref=outcome.target_ref or row.target_ref, next_attempt_at=o.args["next_attempt_at"],
            )  # fmt: skip
            updates.append(values)
            o.args["result"] = Delivery.of(_RowView({**row._asdict(), **values}))
        conn.execute(insert(ATTEMPTS), attempts)
        conn.execute(
            update(DELIVERIES).where(DELIVERIES.c.idempotency_key == bindparam("k")).values(
                attempts=bindparam("attempts"), status=bindparam("status"), updated_at=bindparam("updated_at"),
                delivered_at=bindparam("delivered_at"), http_status=bindparam("http_status"),
                vendor_code=bindparam("vendor_code"), error=bindparam("error"), target_ref=bindparam("target_ref"),
                next_attempt_at=bindparam("next_attempt_at"),
            ),
            updates,
        )  # fmt: skip

    def _write_step(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        conn.execute(
            self._upsert(STEPS, ["idempotency_key", "step"], ["result", "finished_at"]),
            [dict(idempotency_key=o.args["key"], step=o.args["step"], result=o.args["result"], finished_at=now)
             for o in ops],
        )  # fmt: skip
