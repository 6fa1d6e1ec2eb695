"""Parked deliveries: waiting in the database for a retry, a circuit, or the lane ahead of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.engine import Connection

from services.common.ledger.core import LedgerCore, _Op
from services.common.ledger.schema import DELIVERIES, PARKED, DeliveryStatus


@dataclass(frozen=True)
class Parked:
    idempotency_key: str
    lane: str
    partition: int
    due_at: datetime
    reason: str
    connection: str
    action: str
    kafka_key: str
    event: str
    replay: bool
    seq: int


class ParkedDeliveries(LedgerCore):
    async def park(
        self, key: str, *, target: str, lane: str, partition: int, due_at: datetime, reason: str,
        connection: str, action: str, kafka_key: str, event: str, replay: bool = False,
    ) -> None:  # fmt: skip
        """Keep a delivery in the database until ``due_at`` (and until the lane reaches it)."""
        await self._writes.submit(
            "park", key=key, target=target, lane=lane, partition=partition, due_at=due_at, reason=reason,
            connection=connection, action=action, kafka_key=kafka_key, event=event, replay=replay,
        )  # fmt: skip

    async def repark(self, key: str, *, due_at: datetime, reason: str) -> None:
        await self._writes.submit("repark", key=key, due_at=due_at, reason=reason)

    async def unpark(self, key: str) -> None:
        await self._writes.submit("unpark", key=key)

    async def release_circuit(self, target: str, connection: str) -> None:
        """A circuit closed: what it parked is due now, not when the open period would have ended."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(PARKED)
                .where(
                    PARKED.c.target == target, PARKED.c.connection == connection, PARKED.c.reason == "circuit"
                )
                .values(due_at=datetime.now(UTC))
            )

    async def due_lanes(
        self, target: str, partitions: Sequence[int], now: datetime, limit: int = 1000
    ) -> list[tuple[str, int]]:
        """(lane, partition) of ``target`` whose first parked delivery is due, among these partitions."""
        if not partitions:
            return []
        heads = (
            select(PARKED.c.lane, func.min(PARKED.c.id).label("head"))
            .where(PARKED.c.target == target, PARKED.c.partition.in_(list(partitions)))
            .group_by(PARKED.c.lane)
            .subquery()
        )
        q = (
            select(PARKED.c.lane, PARKED.c.partition)
            .join(heads, heads.c.head == PARKED.c.id)
            .where(PARKED.c.due_at <= now)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [(r.lane, r.partition) for r in await conn.execute(q)]

    async def parked_lanes(self, target: str, partitions: Sequence[int]) -> dict[str, int]:
        """Every lane of ``target`` with something parked in these partitions, with its partition."""
        if not partitions:
            return {}
        q = (
            select(PARKED.c.lane, PARKED.c.partition)
            .where(PARKED.c.target == target, PARKED.c.partition.in_(list(partitions)))
            .distinct()
        )
        async with self.engine.connect() as conn:
            return {r.lane: r.partition for r in await conn.execute(q)}

    async def lane_head(self, lane: str) -> Parked | None:
        q = select(PARKED).where(PARKED.c.lane == lane).order_by(PARKED.c.id).limit(1)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).first()
        if row is None:
            return None
        return Parked(row.idempotency_key, row.lane, row.partition, row.due_at, row.reason, row.connection,
                      row.action, row.kafka_key, row.event, bool(row.replay), row.id)  # fmt: skip

    async def parked_count(self, target: str | None = None) -> int:
        q = select(func.count()).select_from(PARKED)
        if target:
            q = q.where(PARKED.c.target == target)
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    # -- batched writes ------------------------------------------------------------------------------

    def _write_park(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        conn.execute(self._insert_ignore(PARKED, "idempotency_key"), [
            dict(idempotency_key=o.args["key"], target=o.args["target"], lane=o.args["lane"],
                 partition=o.args["partition"], due_at=o.args["due_at"], reason=o.args["reason"],
                 connection=o.args["connection"], action=o.args["action"], kafka_key=o.args["kafka_key"],
                 event=o.args["event"], replay=int(o.args["replay"]), parked_at=now)
            for o in ops
        ])  # fmt: skip
        conn.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.idempotency_key == bindparam("k"))
            .values(status=DeliveryStatus.PARKED.value, updated_at=now),
            [{"k": o.args["key"]} for o in ops],
        )

    def _write_repark(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        conn.execute(
            update(PARKED)
            .where(PARKED.c.idempotency_key == bindparam("k"))
            .values(due_at=bindparam("due"), reason=bindparam("why")),
            [{"k": o.args["key"], "due": o.args["due_at"], "why": o.args["reason"]} for o in ops],
        )

    def _write_unpark(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        conn.execute(delete(PARKED).where(PARKED.c.idempotency_key.in_([o.args["key"] for o in ops])))
