"""The ledger: idempotency keys, every attempt, parked deliveries, the event history (SQLite or PostgreSQL).

Writes from concurrent deliveries are coalesced: one transaction carries every write queued while the
previous one ran (group commit), so a thousand deliveries a second do not cost two thousand transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    Text,
    TypeDecorator,
    bindparam,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.common.logging import get_logger
from services.common.outcome import Outcome, OutcomeKind

if TYPE_CHECKING:
    from alembic.config import Config
    from pydantic import SecretStr

log = get_logger("relay.ledger")

MIGRATIONS = Path(__file__).parent / "migrations"
MAX_BATCH = 500
# Advisory lock id of the spool drainer (PostgreSQL): any constant the other code does not use.
SPOOL_LOCK = 0x6B6C5350
WAITING_LOCK = 0x6B6C5357  # the normalizer that releases records waiting for the Klientiks API


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
    PARKED = "parked"
    DELIVERED = "delivered"
    FAILED = "failed"


SETTLED = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.FAILED})


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
    # Attempts made before the last replay: the retry schedule restarts from here.
    retry_base: Mapped[int] = mapped_column(Integer, default=0)
    # When a pending delivery may be tried again (a crash must not make it sooner).
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
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


class ParkedRow(Base):
    """A delivery waiting in the database: for its next retry, for a circuit, or behind its key."""

    __tablename__ = "parked"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # order within a lane
    idempotency_key: Mapped[str] = mapped_column(String(255), unique=True)
    target: Mapped[str] = mapped_column(String(32))
    lane: Mapped[str] = mapped_column(String(400), index=True)
    partition: Mapped[int] = mapped_column(Integer)
    due_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    reason: Mapped[str] = mapped_column(String(16))
    connection: Mapped[str] = mapped_column(String(130))
    action: Mapped[str] = mapped_column(String(64))
    kafka_key: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(Text)  # the CloudEvent as JSON
    replay: Mapped[int] = mapped_column(Integer, default=0)
    parked_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EventRow(Base):
    """What arrived and what it was normalized to: the history behind `relay events show|find`."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    source: Mapped[str] = mapped_column(String(64), index=True)
    event: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)
    client_id: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    # HMAC-SHA256 of the E.164 phone under `phone_hash_key`: findable by phone, irreversible without the key.
    phone_hash: Mapped[str | None] = mapped_column(String(64), index=True, nullable=True)
    kafka_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    inbox: Mapped[str] = mapped_column(Text)
    normalized: Mapped[str | None] = mapped_column(Text, nullable=True)
    quarantine_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Set when the normalizer dropped this webhook as a repeat of another one inside the dedupe window.
    duplicate_of: Mapped[str | None] = mapped_column(String(64), nullable=True)


class SpoolRow(Base):
    """A webhook accepted while Kafka was unreachable, waiting to be published to the inbox in order."""

    __tablename__ = "ingest_spool"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_id: Mapped[str] = mapped_column(String(64), unique=True)
    kafka_key: Mapped[str] = mapped_column(Text)
    record: Mapped[str] = mapped_column(Text)  # the InboxRecord as JSON
    spooled_at: Mapped[datetime] = mapped_column(UTCDateTime())


class StepRow(Base):
    """A finished step of a delivery and what the target returned for it (its ids), kept before the next."""

    __tablename__ = "delivery_steps"

    idempotency_key: Mapped[str] = mapped_column(String(255), primary_key=True)
    step: Mapped[str] = mapped_column(String(64), primary_key=True)
    result: Mapped[str] = mapped_column(Text)
    finished_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EntityRow(Base):
    """A Klientiks client or visit and the target's id for it, per connection, with a hash of what was sent."""

    __tablename__ = "entity_map"

    connection: Mapped[str] = mapped_column(String(130), primary_key=True)  # "{source}/{connection}"
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)  # "client", "visit", ...
    klientiks_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    target_id: Mapped[str] = mapped_column(Text)
    content_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class WaitingRow(Base):
    """An inbox record waiting for the Klientiks API (a thin webhook), or behind one of its key."""

    __tablename__ = "ingest_waiting"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)  # order within a key
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[str] = mapped_column(String(130), index=True)
    inbox_key: Mapped[str] = mapped_column(String(400), index=True)
    record: Mapped[str] = mapped_column(Text)  # the inbox record as read
    thin: Mapped[int] = mapped_column(Integer)  # 1: it needs the API; 0: it only waits behind its key
    waiting_since: Mapped[datetime] = mapped_column(UTCDateTime())


class DedupeRow(Base):
    """The normalizer's memory of recent webhooks: the first event of each identical request."""

    __tablename__ = "ingest_dedupe"

    fingerprint: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Webhooks of one scope replace each other's state (an appointment's changes): see `claim_fingerprints`.
    scope: Mapped[str] = mapped_column(String(400), index=True)
    event_id: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


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


@dataclass(frozen=True)
class Spooled:
    seq: int
    record_id: str
    kafka_key: str
    record: str


# The target_id of an entity whose create was sent and not yet answered (services/common/delivery/steps.py).
PENDING = "\x00pending"


@dataclass(frozen=True)
class Entity:
    """The target's id for a Klientiks entity, and the hash of what was last sent for it."""

    target_id: str
    content_hash: str | None

    @property
    def pending(self) -> bool:
        """Its create was sent and no answer was kept: the target may or may not have it."""
        return self.target_id == PENDING


def _waiting(r: Any) -> Waiting:
    return Waiting(r.seq, r.event_id, r.source, r.inbox_key, r.record, bool(r.thin))


@dataclass(frozen=True)
class Waiting:
    """An inbox record held back by the normalizer until the Klientiks API completes it."""

    seq: int
    event_id: str
    source: str
    inbox_key: str
    record: str
    thin: bool


@dataclass(frozen=True)
class Seen:
    """One webhook as the dedupe window sees it."""

    fingerprint: str
    scope: str
    event_id: str
    received_at: datetime
    # A state change (appointment-changed): an older different state of the scope stops counting as seen.
    supersedes: bool = False


def idempotency_key(target: str, connection: str, action: str, event_id: str) -> str:
    return f"{target}:{connection}:{action}:{event_id}"


def phone_hash(e164: str, key: bytes) -> str:
    """The phone index value: a plain SHA-256 of a 10-digit number is reversed in minutes, an HMAC is not."""
    return hmac.new(key, e164.encode(), hashlib.sha256).hexdigest()


class PhoneSearchUnavailable(RuntimeError):
    """Phone search asked of a ledger opened without ``phone_hash_key``."""

    def __init__(self) -> None:
        super().__init__(
            "phone search needs the phone index key; fix: set `phone_hash_key` in RELAY_CONFIG "
            "(or RELAY_PHONE_HASH_KEY) to the key the normalizer uses"
        )


def _private_sqlite_file(database: str | None) -> bool:
    """Create a new SQLite file 0600 before SQLite does (it would use 0644); its -wal/-shm copy the mode.

    True when the file was there already and anyone may read it.
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        return False
    path = Path(database)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # An existing file keeps the mode its operator gave it.
        with contextlib.suppress(OSError):
            return bool(path.stat().st_mode & stat.S_IROTH)
        return False
    except OSError:
        return False  # no such folder, read-only, ...: SQLite reports it better when it opens the file
    os.close(fd)  # an empty file is a valid, empty SQLite database
    return False


def make_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        warned = False

        # Before every new connection, not at engine creation: building a ledger must not create a file.
        @event.listens_for(engine.sync_engine, "do_connect")
        def _create_private(*_: Any) -> None:
            nonlocal warned
            if _private_sqlite_file(database) and not warned:
                warned = True
                log.warning("the ledger file is world-readable", path=database, fix=f"chmod 600 {database}*")

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
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply the Alembic migrations (``relay db upgrade``)."""

    # Alembic is imported only when migrating: the long-running roles need not carry it.
    from alembic import command

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


# ------------------------------------------------------------------------------------------ write batching


@dataclass
class _Op:
    kind: str
    args: dict[str, Any]
    future: asyncio.Future[Any] = field(repr=False)


class _WriteQueue:
    """Runs queued writes in one transaction each time the previous transaction is done."""

    def __init__(
        self, engine: AsyncEngine, apply: Callable[[AsyncConnection, list[_Op]], Awaitable[None]]
    ) -> None:
        self._engine = engine
        self._apply = apply
        self._ops: list[_Op] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, kind: str, **args: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append(_Op(kind, args, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await fut

    def submit_nowait(self, kind: str, **args: Any) -> None:
        """Queue a write for the next group commit without waiting for it (a failure is logged by the drain).

        For what may be lost to a crash at no cost but a repeated call; the writes queued after it (the
        delivery's record) commit in the same transaction or a later one.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)  # retrieved: no warning
        self._ops.append(_Op(kind, args, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._ops:
                batch, self._ops = self._ops[:MAX_BATCH], self._ops[MAX_BATCH:]
                try:
                    async with self._engine.begin() as conn:
                        await self._apply(conn, batch)
                except BaseException as e:
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
                    if not isinstance(e, Exception):
                        raise
                else:
                    for op in batch:
                        if not op.future.done():
                            op.future.set_result(op.args.get("result"))
        finally:
            self._task = None


_STATUS = {
    OutcomeKind.SUCCESS: DeliveryStatus.DELIVERED,
    OutcomeKind.PERMANENT: DeliveryStatus.FAILED,
}

_D = cast(Table, DeliveryRow.__table__)
_A = cast(Table, AttemptRow.__table__)
_P = cast(Table, ParkedRow.__table__)
_E = cast(Table, EventRow.__table__)
_S = cast(Table, SpoolRow.__table__)
_F = cast(Table, DedupeRow.__table__)
_W = cast(Table, WaitingRow.__table__)
_ST = cast(Table, StepRow.__table__)
_EN = cast(Table, EntityRow.__table__)


class Ledger:
    """Idempotency, history and parked deliveries. One instance per process; safe for concurrent tasks."""

    def __init__(self, engine: AsyncEngine, *, phone_key: SecretStr | None = None) -> None:
        self.engine = engine
        self._writes = _WriteQueue(engine, self._apply)
        # Without a key no phone index is written at all: an unkeyed digest would be the weakness again.
        self._phone_key = phone_key.get_secret_value().encode() if phone_key is not None else None

    @classmethod
    def from_url(cls, url: str, *, phone_key: SecretStr | None = None) -> Ledger:
        """``phone_key`` (``Settings.phone_hash_key``) is needed only to write or search the phone index."""
        return cls(make_engine(url), phone_key=phone_key)

    def _phone_hash(self, e164: str | None) -> str | None:
        return phone_hash(e164, self._phone_key) if e164 and self._phone_key is not None else None

    async def close(self) -> None:
        await self.engine.dispose()

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    # -- writes (batched) ----------------------------------------------------------------------------

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
                update(_P)
                .where(_P.c.target == target, _P.c.connection == connection, _P.c.reason == "circuit")
                .values(due_at=datetime.now(UTC))
            )

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
            if self.engine.dialect.name == "postgresql":
                got = (
                    await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SPOOL_LOCK})
                ).scalar()
                if not got:
                    return None
            rows = await conn.execute(select(_S).order_by(_S.c.seq).limit(limit))
            batch = [Spooled(r.seq, r.record_id, r.kafka_key, r.record) for r in rows]
            if batch:
                await publish(batch)
                await conn.execute(delete(_S).where(_S.c.seq.in_([b.seq for b in batch])))
            return len(batch)

    async def spool_depth(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(_S))).scalar_one())

    # -- resumable steps and the entity map (delivery services) -----------------------------------------

    async def finished_steps(self, key: str) -> dict[str, str]:
        """What each finished step of delivery ``key`` returned."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(_ST.c.step, _ST.c.result).where(_ST.c.idempotency_key == key))
            return {r.step: r.result for r in rows}

    async def flush(self) -> None:
        """Wait until every write queued so far (awaited or not) is committed."""
        await self._writes.submit("flush")

    async def finish_step(self, key: str, step: str, result: str) -> None:
        """Keep a finished step's result; committed before returning, so the next step may be sent."""
        await self._writes.submit("step", key=key, step=step, result=result)

    async def entity(self, connection: str, kind: str, klientiks_id: str) -> Entity | None:
        q = select(_EN.c.target_id, _EN.c.content_hash).where(
            _EN.c.connection == connection, _EN.c.kind == kind, _EN.c.klientiks_id == klientiks_id
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).first()
            return Entity(row.target_id, row.content_hash) if row else None

    async def remember_entity(
        self, connection: str, kind: str, klientiks_id: str, target_id: str, content_hash: str | None,
        *, wait: bool = True,
    ) -> None:  # fmt: skip
        """Keep the target's id (and what was sent) for an entity; committed before returning if ``wait``."""
        args = dict(connection=connection, entity_kind=kind, klientiks_id=klientiks_id, target_id=target_id,
                    content_hash=content_hash)  # fmt: skip
        if wait:
            await self._writes.submit("entity", **args)
        else:
            self._writes.submit_nowait("entity", **args)

    async def forget_entity(self, connection: str, kind: str, klientiks_id: str) -> None:
        await self._writes.submit(
            "forget", connection=connection, entity_kind=kind, klientiks_id=klientiks_id
        )

    # -- records waiting for the Klientiks API (the normalizer) ----------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, lock: int) -> AsyncIterator[bool]:
        """Whether this process holds ``lock`` (a PostgreSQL session lock) while the block runs.

        Always True on SQLite, which one process uses at a time.
        """
        if self.engine.dialect.name != "postgresql":
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
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(_W.c.inbox_key).where(_W.c.inbox_key.in_(set(keys))).distinct())
            return {r.inbox_key for r in rows}

    async def waiting_thin(self) -> dict[str, int]:
        """Per source, how many thin webhooks wait for the Klientiks API."""
        q = select(_W.c.source, func.count()).where(_W.c.thin == 1).group_by(_W.c.source)
        async with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in await conn.execute(q)}

    async def hold(self, records: Sequence[Waiting]) -> None:
        """Keep these records (in order) until :meth:`release`; a record held already stays as it is."""
        if not records:
            return
        now = datetime.now(UTC)
        async with self.engine.begin() as conn:
            held = {
                r.event_id
                for r in await conn.execute(
                    select(_W.c.event_id).where(_W.c.event_id.in_([w.event_id for w in records]))
                )
            }
            rows = [
                dict(event_id=w.event_id, source=w.source, inbox_key=w.inbox_key, record=w.record,
                     thin=int(w.thin), waiting_since=now)
                for w in records
                if w.event_id not in held
            ]  # fmt: skip
            if rows:
                await conn.execute(_W.insert(), rows)

    async def waiting_heads(self, limit: int = 100) -> list[Waiting]:
        """The oldest waiting record of each key (at most ``limit`` keys, oldest first)."""
        heads = select(func.min(_W.c.seq).label("seq")).group_by(_W.c.inbox_key).subquery()
        q = select(_W).join(heads, _W.c.seq == heads.c.seq).order_by(_W.c.seq).limit(limit)
        async with self.engine.connect() as conn:
            return [_waiting(r) for r in await conn.execute(q)]

    async def waiting_next(self, inbox_key: str) -> Waiting | None:
        q = select(_W).where(_W.c.inbox_key == inbox_key).order_by(_W.c.seq).limit(1)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).first()
            return _waiting(row) if row else None

    async def release(self, event_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(_W).where(_W.c.event_id == event_id))

    async def claim_fingerprints(self, seen: Sequence[Seen], *, window_s: float) -> dict[str, str]:
        """Remember these webhooks (in order); return {event id: first event id} for the repeats.

        A webhook repeats another when their fingerprints match, their ids differ and they were received
        within ``window_s`` of each other. The same id again is a redelivery, not a repeat: downstream
        idempotency covers it, and a replay must pass.
        """
        if not seen:
            return {}
        window = timedelta(seconds=window_s)
        repeats: dict[str, str] = {}
        async with self.engine.begin() as conn:
            rows = await conn.execute(select(_F).where(_F.c.fingerprint.in_({s.fingerprint for s in seen})))
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
                await conn.execute(delete(_F).where(_F.c.scope == scope, _F.c.fingerprint != fp))
            if changed:
                ins = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(_F)
                await conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=["fingerprint"],
                        set_={c: ins.excluded[c] for c in ("scope", "event_id", "received_at")},
                    ),
                    [dict(fingerprint=s.fingerprint, scope=s.scope, event_id=s.event_id,
                          received_at=s.received_at) for s in changed.values()],
                )  # fmt: skip
            # Forget what left the window; the index on received_at keeps this cheap.
            newest = max(s.received_at for s in seen)
            await conn.execute(delete(_F).where(_F.c.received_at < newest - 2 * window))
        return repeats

    def _upsert(self, table: Any, index: list[str], update: list[str]) -> Any:
        ins = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(table)
        return ins.on_conflict_do_update(index_elements=index, set_={c: ins.excluded[c] for c in update})

    def _insert_ignore(self, table: Any, index: str) -> Any:
        ins = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(table)
        return ins.on_conflict_do_nothing(index_elements=[index])

    async def _apply(self, conn: AsyncConnection, ops: list[_Op]) -> None:
        now = datetime.now(UTC)
        by_kind: dict[str, list[_Op]] = {}
        for op in ops:
            by_kind.setdefault(op.kind, []).append(op)
        if begins := by_kind.get("begin"):
            await self._apply_begins(conn, begins, now)
        if records := by_kind.get("record"):
            await self._apply_records(conn, records, now)
        if parks := by_kind.get("park"):
            await conn.execute(self._insert_ignore(_P, "idempotency_key"), [
                dict(idempotency_key=o.args["key"], target=o.args["target"], lane=o.args["lane"],
                     partition=o.args["partition"], due_at=o.args["due_at"], reason=o.args["reason"],
                     connection=o.args["connection"], action=o.args["action"], kafka_key=o.args["kafka_key"],
                     event=o.args["event"], replay=int(o.args["replay"]), parked_at=now)
                for o in parks
            ])  # fmt: skip
            await conn.execute(
                update(_D).where(_D.c.idempotency_key == bindparam("k")).values(status=DeliveryStatus.PARKED.value,
                                                                              updated_at=now),
                [{"k": o.args["key"]} for o in parks],
            )  # fmt: skip
        if reparks := by_kind.get("repark"):
            await conn.execute(
                update(_P).where(_P.c.idempotency_key == bindparam("k")).values(due_at=bindparam("due"),
                                                                              reason=bindparam("why")),
                [{"k": o.args["key"], "due": o.args["due_at"], "why": o.args["reason"]} for o in reparks],
            )  # fmt: skip
        if unparks := by_kind.get("unpark"):
            await conn.execute(delete(_P).where(_P.c.idempotency_key.in_([o.args["key"] for o in unparks])))
        if steps := by_kind.get("step"):
            await conn.execute(
                self._upsert(_ST, ["idempotency_key", "step"], ["result", "finished_at"]),
                [dict(idempotency_key=o.args["key"], step=o.args["step"], result=o.args["result"], finished_at=now)
                 for o in steps],
            )  # fmt: skip
        await self._apply_entities(conn, [o for o in ops if o.kind in ("entity", "forget")], now)
        if events := by_kind.get("event"):
            ins = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(_E)
            outcome = (
                "client_id",
                "phone_hash",
                "kafka_key",
                "normalized",
                "quarantine_reason",
                "duplicate_of",
            )
            # The last of one id in this batch wins, as it would one transaction later.
            rows = {o.args["id"]: {k: v for k, v in o.args.items() if k != "result"} for o in events}
            await conn.execute(
                ins.on_conflict_do_update(index_elements=["id"], set_={c: ins.excluded[c] for c in outcome}),
                list(rows.values()),
            )
        if spools := by_kind.get("spool"):
            await conn.execute(self._insert_ignore(_S, "record_id"), [
                dict(record_id=o.args["record_id"], kafka_key=o.args["kafka_key"], record=o.args["record"],
                     spooled_at=now) for o in spools
            ])  # fmt: skip

    async def _apply_entities(self, conn: AsyncConnection, ops: list[_Op], now: datetime) -> None:
        """Entity writes and forgets in the order they came (a claim, then its release, may share a batch)."""
        upsert = self._upsert(
            _EN, ["connection", "kind", "klientiks_id"], ["target_id", "content_hash", "updated_at"]
        )
        run: list[_Op] = []
        for i, op in enumerate(ops):
            run.append(op)
            if i + 1 < len(ops) and ops[i + 1].kind == op.kind:
                continue
            if op.kind == "entity":
                await conn.execute(upsert, [dict(connection=o.args["connection"], kind=o.args["entity_kind"],
                                                 klientiks_id=o.args["klientiks_id"], target_id=o.args["target_id"],
                                                 content_hash=o.args["content_hash"], updated_at=now) for o in run])  # fmt: skip
            else:
                for o in run:
                    await conn.execute(delete(_EN).where(
                        _EN.c.connection == o.args["connection"], _EN.c.kind == o.args["entity_kind"],
                        _EN.c.klientiks_id == o.args["klientiks_id"]))  # fmt: skip
            run = []

    async def _apply_begins(self, conn: AsyncConnection, ops: list[_Op], now: datetime) -> None:
        rows = [
            dict(idempotency_key=o.args["key"], event_id=o.args["event_id"], source=o.args["source"],
                 connection=o.args["connection"], target=o.args["target"], action=o.args["action"],
                 status=DeliveryStatus.PENDING.value, attempts=0, retry_base=0, created_at=now, updated_at=now)
            for o in ops
        ]  # fmt: skip
        await conn.execute(self._insert_ignore(_D, "idempotency_key"), rows)
        replays = [o.args["key"] for o in ops if o.args["replay"]]
        if replays:
            await conn.execute(
                update(_D)
                .where(_D.c.idempotency_key.in_(replays), _D.c.status == DeliveryStatus.FAILED.value)
                .values(status=DeliveryStatus.PENDING.value, retry_base=_D.c.attempts, updated_at=now)
            )
        keys = [o.args["key"] for o in ops]
        found = {
            r.idempotency_key: Delivery.of(r)
            for r in await conn.execute(select(_D).where(_D.c.idempotency_key.in_(keys)))
        }
        for o in ops:
            o.args["result"] = found[o.args["key"]]

    async def _apply_records(self, conn: AsyncConnection, ops: list[_Op], now: datetime) -> None:
        keys = [o.args["key"] for o in ops]
        current = {
            r.idempotency_key: r for r in await conn.execute(select(_D).where(_D.c.idempotency_key.in_(keys)))
        }
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
        await conn.execute(insert(_A), attempts)
        await conn.execute(
            update(_D).where(_D.c.idempotency_key == bindparam("k")).values(
                attempts=bindparam("attempts"), status=bindparam("status"), updated_at=bindparam("updated_at"),
                delivered_at=bindparam("delivered_at"), http_status=bindparam("http_status"),
                vendor_code=bindparam("vendor_code"), error=bindparam("error"), target_ref=bindparam("target_ref"),
                next_attempt_at=bindparam("next_attempt_at"),
            ),
            updates,
        )  # fmt: skip

    # -- reads ---------------------------------------------------------------------------------------

    async def get(self, key: str) -> Delivery | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(_D).where(_D.c.idempotency_key == key))).first()
            return Delivery.of(row) if row else None

    async def for_event(self, event_id: str) -> list[Delivery]:
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(_D).where(_D.c.event_id == event_id).order_by(_D.c.id))
            return [Delivery.of(r) for r in rows]

    async def attempts(self, key: str) -> list[Any]:
        async with self.engine.connect() as conn:
            q = (
                select(_A)
                .join(_D, _D.c.id == _A.c.delivery_id)
                .where(_D.c.idempotency_key == key)
                .order_by(_A.c.number)
            )
            return list(await conn.execute(q))

    async def recent(self, since: datetime, limit: int = 100) -> Sequence[Delivery]:
        """Deliveries updated after ``since``, oldest first (the live view of ``relay run``)."""
        async with self.engine.connect() as conn:
            q = select(_D).where(_D.c.updated_at > since).order_by(_D.c.updated_at).limit(limit)
            return [Delivery.of(r) for r in await conn.execute(q)]

    async def due_lanes(
        self, target: str, partitions: Sequence[int], now: datetime, limit: int = 1000
    ) -> list[tuple[str, int]]:
        """(lane, partition) of ``target`` whose first parked delivery is due, among these partitions."""
        if not partitions:
            return []
        heads = (
            select(_P.c.lane, func.min(_P.c.id).label("head"))
            .where(_P.c.target == target, _P.c.partition.in_(list(partitions)))
            .group_by(_P.c.lane)
            .subquery()
        )
        q = (
            select(_P.c.lane, _P.c.partition)
            .join(heads, heads.c.head == _P.c.id)
            .where(_P.c.due_at <= now)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [(r.lane, r.partition) for r in await conn.execute(q)]

    async def parked_lanes(self, target: str, partitions: Sequence[int]) -> dict[str, int]:
        """Every lane of ``target`` with something parked in these partitions, with its partition."""
        if not partitions:
            return {}
        q = (
            select(_P.c.lane, _P.c.partition)
            .where(_P.c.target == target, _P.c.partition.in_(list(partitions)))
            .distinct()
        )
        async with self.engine.connect() as conn:
            return {r.lane: r.partition for r in await conn.execute(q)}

    async def lane_head(self, lane: str) -> Parked | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(_P).where(_P.c.lane == lane).order_by(_P.c.id).limit(1))).first()
        if row is None:
            return None
        return Parked(row.idempotency_key, row.lane, row.partition, row.due_at, row.reason, row.connection,
                      row.action, row.kafka_key, row.event, bool(row.replay), row.id)  # fmt: skip

    async def parked_count(self, target: str | None = None) -> int:
        q = select(func.count()).select_from(_P)
        if target:
            q = q.where(_P.c.target == target)
        async with self.engine.connect() as conn:
            return int((await conn.execute(q)).scalar_one())

    async def event(self, event_id: str) -> EventRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(_E).where(_E.c.id == event_id))).first()
        if row is None:
            return None
        return EventRecord(row.id, row.source, row.event, row.received_at, row.client_id, row.kafka_key,
                           row.inbox, row.normalized, row.quarantine_reason, row.duplicate_of)  # fmt: skip

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
            conds.append(_E.c.phone_hash == phone_hash(phone, self._phone_key))
        if client_id:
            conds.append(_E.c.client_id == client_id)
        if not conds:
            return []
        q = select(_E).where(or_(*conds))
        if source:
            q = q.where(_E.c.source == source)
        q = q.order_by(_E.c.received_at.desc()).limit(limit)
        async with self.engine.connect() as conn:
            return [
                EventRecord(
                    r.id,
                    r.source,
                    r.event,
                    r.received_at,
                    r.client_id,
                    r.kafka_key,
                    r.inbox,
                    r.normalized,
                    r.quarantine_reason,
                    r.duplicate_of,
                )
                for r in await conn.execute(q)
            ]


class _RowView:
    """Attribute access over a dict, for Delivery.of on values computed in a batch."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
