"""The ledger: idempotency keys, every attempt, parked deliveries, the event history (SQLite or PostgreSQL).

One module per family of tables, each readable alone; :class:`Ledger` is all of them, the one object the
services use. Writes ride one group commit (``core``); ``retention`` and ``erasure`` keep personal data from
piling up.
"""

from __future__ import annotations

from services.common.ledger.core import (
    MAX_BATCH,
    LedgerCore,
    PhoneSearchUnavailable,
    idempotency_key,
    phone_hash,
)
from services.common.ledger.deliveries import Deliveries, Delivery
from services.common.ledger.engine import MIGRATIONS, alembic_config, make_engine, migrate, upgrade
from services.common.ledger.entities import PENDING, Entity, EntityMap
from services.common.ledger.erasure import Erasure
from services.common.ledger.history import EventRecord
from services.common.ledger.ingest import SPOOL_LOCK, WAITING_LOCK, Intake, Seen, Spooled, Waiting
from services.common.ledger.parked import Parked, ParkedDeliveries
from services.common.ledger.retention import Retention
from services.common.ledger.schema import SETTLED, Base, DedupeRow, DeliveryStatus

__all__ = [
    "MAX_BATCH",
    "MIGRATIONS",
    "PENDING",
    "SETTLED",
    "SPOOL_LOCK",
    "WAITING_LOCK",
    "Base",
    "DedupeRow",
    "Delivery",
    "DeliveryStatus",
    "Entity",
    "EventRecord",
    "Ledger",
    "LedgerCore",
    "Parked",
    "PhoneSearchUnavailable",
    "Seen",
    "Spooled",
    "Waiting",
    "alembic_config",
    "idempotency_key",
    "make_engine",
    "migrate",
    "phone_hash",
    "upgrade",
]


class Ledger(Deliveries, ParkedDeliveries, EntityMap, Intake, Retention, Erasure):
    """Idempotency, history and parked deliveries. One instance per process; safe for concurrent tasks."""
