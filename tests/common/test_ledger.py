"""The ledger on SQLite and PostgreSQL: idempotency keys, attempts, statuses, migrations."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from services.common.ledger import DeliveryStatus, Ledger, idempotency_key, upgrade
from services.common.outcome import Outcome

KEY = idempotency_key("maxma", "maxma", "new-client", "evt-1")


async def _begin(ledger: Ledger, key: str = KEY, event_id: str = "evt-1") -> DeliveryStatus:
    d = await ledger.begin(
        key, event_id=event_id, source="salon", connection="maxma", target="maxma", action="new-client"
    )
    return d.status


async def test_begin_is_idempotent_even_when_concurrent(ledger: Ledger) -> None:
    statuses = await asyncio.gather(*(_begin(ledger) for _ in range(10)))
    assert statuses == [DeliveryStatus.PENDING] * 10
    async with ledger.engine.connect() as conn:
        count = (await conn.execute(text("SELECT count(*) FROM deliveries"))).scalar_one()
    assert count == 1


async def test_success_settles_and_a_second_begin_sees_it(ledger: Ledger) -> None:
    await _begin(ledger)
    started = datetime.now(UTC)
    d = await ledger.record(
        KEY,
        Outcome.success(http_status=200, target_ref="2222000000001"),
        started_at=started,
        duration_s=0.012,
    )
    assert d.status is DeliveryStatus.DELIVERED
    assert d.attempts == 1
    assert d.target_ref == "2222000000001"
    assert d.delivered_at is not None
    assert d.delivered_at.tzinfo is not None
    again = await ledger.begin(
        KEY, event_id="evt-1", source="salon", connection="maxma", target="maxma", action="new-client"
    )
    assert again.status is DeliveryStatus.DELIVERED
    assert again.attempts == 1


async def test_attempts_are_kept_in_order_with_their_details(ledger: Ledger) -> None:
    await _begin(ledger)
    t0 = datetime.now(UTC) - timedelta(seconds=10)
    await ledger.record(KEY, Outcome.retryable("HTTP 503", http_status=503), started_at=t0, duration_s=0.5)
    d = await ledger.get(KEY)
    assert d is not None
    assert d.status is DeliveryStatus.PENDING
    assert d.error == "HTTP 503"
    await ledger.record(
        KEY,
        Outcome.success("a client with this externalId already exists", http_status=200, vendor_code="30"),
        started_at=datetime.now(UTC),
        duration_s=0.01,
    )
    attempts = await ledger.attempts(KEY)
    assert [(a.number, a.outcome, a.http_status, a.vendor_code) for a in attempts] == [
        (1, "retryable", 503, None),
        (2, "success", 200, "30"),
    ]
    assert attempts[0].started_at == t0
    assert abs(attempts[0].duration_ms - 500) < 1e-6


async def test_exhausted_retryable_is_failed_and_permanent_is_failed(ledger: Ledger) -> None:
    await _begin(ledger)
    d = await ledger.record(
        KEY, Outcome.retryable("timeout"), started_at=datetime.now(UTC), duration_s=1, final=True
    )
    assert d.status is DeliveryStatus.FAILED
    other = idempotency_key("maxma", "maxma", "new-client", "evt-2")
    await _begin(ledger, other, "evt-2")
    d = await ledger.record(
        other,
        Outcome.permanent("Maxma 25: card bound", vendor_code="25"),
        started_at=datetime.now(UTC),
        duration_s=0.1,
    )
    assert d.status is DeliveryStatus.FAILED
    assert d.vendor_code == "25"
    assert [x.idempotency_key for x in await ledger.for_event("evt-2")] == [other]


async def test_recent_lists_changes_after_a_point_in_time(ledger: Ledger) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    await _begin(ledger)
    await ledger.record(KEY, Outcome.success(), started_at=datetime.now(UTC), duration_s=0.01)
    recent = await ledger.recent(before)
    assert [d.idempotency_key for d in recent] == [KEY]
    assert await ledger.recent(recent[-1].updated_at) == []


async def test_upgrade_twice_is_harmless_and_ping_works(ledger: Ledger) -> None:
    await upgrade(ledger.engine)
    assert await ledger.ping()
    async with ledger.engine.connect() as conn:
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert version == "0003"


async def test_the_migrations_build_exactly_the_tables_the_code_declares(ledger: Ledger) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.common.ledger import Base

    def diff(conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(conn, opts={"compare_type": False})
        return [d for d in compare_metadata(ctx, Base.metadata) if not _index_name_only(d)]

    async with ledger.engine.connect() as conn:
        differences = await conn.run_sync(diff)
    assert differences == []


def _index_name_only(d: Any) -> bool:
    # Index names differ between `index=True` columns and op.create_index; the columns are what matter.
    return isinstance(d, tuple) and d[0] in ("add_index", "remove_index")
