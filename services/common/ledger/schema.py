"""The ledger's tables: one row class per table, and the Core tables the families query."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import cast

from sqlalchemy import DateTime, Float, ForeignKey, Integer, String, Table, Text, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)  # the retention purge
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
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)  # the retention purge


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


DELIVERIES = cast(Table, DeliveryRow.__table__)
ATTEMPTS = cast(Table, AttemptRow.__table__)
PARKED = cast(Table, ParkedRow.__table__)
EVENTS = cast(Table, EventRow.__table__)
SPOOL = cast(Table, SpoolRow.__table__)
DEDUPE = cast(Table, DedupeRow.__table__)
WAITING = cast(Table, WaitingRow.__table__)
STEPS = cast(Table, StepRow.__table__)
ENTITIES = cast(Table, EntityRow.__table__)
