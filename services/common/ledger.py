"""The delivery ledger: idempotency keys, every attempt, the operation history (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    event,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.outcome import Outcome, OutcomeKind

MIGRATIONS = Path(__file__).parent / "migrations"


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite stores naive text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the ledger")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class DeliveryRow(Base):
    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    event_id: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(64))
    connection: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    vendor_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    target_ref: Mapped[str | None] = mapped_column(String(255), nullable=True)


class AttemptRow(Base):
    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    duration_ms: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(String(16))
    http_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    vendor_code: Mapped[str | None] = mapped_column(String(32), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


@dataclass(frozen=True)
class Delivery:
    idempotency_key: str
    event_id: str
    source: str
    connection: str
    target: str
    action: str
    status: DeliveryStatus
    attempts: int
    created_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    http_status: int | None
    vendor_code: str | None
    error: str | None
    target_ref: str | None

    @classmethod
    def of(cls, row: DeliveryRow) -> Delivery:
        return cls(
            row.idempotency_key,
            row.event_id,
            row.source,
            row.connection,
            row.target,
            row.action,
            DeliveryStatus(row.status),
            row.attempts,
            row.created_at,
            row.updated_at,
            row.delivered_at,
            row.http_status,
            row.vendor_code,
            row.error,
            row.target_ref,
        )


def idempotency_key(target: str, connection: str, action: str, event_id: str) -> str:
    return f"{target}:{connection}:{action}:{event_id}"


def make_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        # Several processes share one file in the embedded run: WAL lets readers and a writer coexist.
        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # Safe against process crashes; only a power loss can undo the last commits, and the
            # targets' natural keys (Maxma externalId) still stop a second effect then.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply the Alembic migrations (``relay db upgrade``)."""

    def run(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema and let go of it."""
    engine = make_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


class Ledger:
    """Idempotency and history of deliveries. One instance per process; safe for concurrent tasks."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str) -> Ledger:
        return cls(make_engine(url))

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def begin(
        self, key: str, *, event_id: str, source: str, connection: str, target: str, action: str
    ) -> Delivery:
        """Record that a delivery is wanted (if new) and return its current state."""
        now = datetime.now(UTC)
        values = dict(
            idempotency_key=key,
            event_id=event_id,
            source=source,
            connection=connection,
            target=target,
            action=action,
            status=DeliveryStatus.PENDING.value,
            attempts=0,
            created_at=now,
            updated_at=now,
        )
        dialect = self.engine.dialect.name
        ins = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(DeliveryRow)
        async with self._sessions.begin() as s:
            await s.execute(ins.values(**values).on_conflict_do_nothing(index_elements=["idempotency_key"]))
            row = (
                await s.execute(select(DeliveryRow).where(DeliveryRow.idempotency_key == key))
            ).scalar_one()
            return Delivery.of(row)

    async def record(
        self, key: str, outcome: Outcome, *, started_at: datetime, duration_s: float, final: bool = False
    ) -> Delivery:
        """Store one attempt and move the delivery on; ``final`` settles a retryable outcome as failed."""
        now = datetime.now(UTC)
        status = {
            OutcomeKind.SUCCESS: DeliveryStatus.DELIVERED,
            OutcomeKind.PERMANENT: DeliveryStatus.FAILED,
            OutcomeKind.RETRYABLE: DeliveryStatus.FAILED if final else DeliveryStatus.PENDING,
        }[outcome.kind]
        async with self._sessions.begin() as s:
            row = (
                await s.execute(
                    select(DeliveryRow).where(DeliveryRow.idempotency_key == key).with_for_update()
                )
            ).scalar_one()
            number = row.attempts + 1
            s.add(
                AttemptRow(
                    delivery_id=row.id,
                    number=number,
                    started_at=started_at,
                    duration_ms=duration_s * 1000,
                    outcome=outcome.kind.value,
                    http_status=outcome.http_status,
                    vendor_code=outcome.vendor_code,
                    error=outcome.reason or None,
                )
            )
            await s.execute(
                update(DeliveryRow)
                .where(DeliveryRow.id == row.id)
                .values(
                    attempts=number,
                    status=status.value,
                    updated_at=now,
                    delivered_at=now if status is DeliveryStatus.DELIVERED else None,
                    http_status=outcome.http_status,
                    vendor_code=outcome.vendor_code,
                    error=outcome.reason or None,
                    target_ref=outcome.target_ref or row.target_ref,
                )
            )
            await s.flush()
            row = (await s.execute(select(DeliveryRow).where(DeliveryRow.id == row.id))).scalar_one()
            await s.refresh(row)
            return Delivery.of(row)

    async def get(self, key: str) -> Delivery | None:
        async with self._sessions() as s:
            row = (
                await s.execute(select(DeliveryRow).where(DeliveryRow.idempotency_key == key))
            ).scalar_one_or_none()
            return Delivery.of(row) if row else None

    async def for_event(self, event_id: str) -> list[Delivery]:
        async with self._sessions() as s:
            rows = (await s.execute(select(DeliveryRow).where(DeliveryRow.event_id == event_id))).scalars()
            return [Delivery.of(r) for r in rows]

    async def attempts(self, key: str) -> list[AttemptRow]:
        async with self._sessions() as s:
            q = (
                select(AttemptRow)
                .join(DeliveryRow, DeliveryRow.id == AttemptRow.delivery_id)
                .where(DeliveryRow.idempotency_key == key)
                .order_by(AttemptRow.number)
            )
            return list((await s.execute(q)).scalars())

    async def recent(self, since: datetime, limit: int = 100) -> Sequence[Delivery]:
        """Deliveries updated after ``since``, oldest first (the live view of ``relay run``)."""
        async with self._sessions() as s:
            q = (
                select(DeliveryRow)
                .where(DeliveryRow.updated_at > since)
                .order_by(DeliveryRow.updated_at)
                .limit(limit)
            )
            return [Delivery.of(r) for r in (await s.execute(q)).scalars()]
