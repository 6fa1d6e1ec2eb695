"""The ledger on SQLite and PostgreSQL: idempotency keys, attempts, statuses, migrations."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from sqlalchemy import text

from services.common.delivery.steps import Steps
from services.common.ledger import (
    PENDING,
    WAITING_LOCK,
    DeliveryStatus,
    Ledger,
    PhoneSearchUnavailable,
    Waiting,
    idempotency_key,
    make_engine,
    upgrade,
)
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
    from alembic.script import ScriptDirectory

    from services.common.ledger import alembic_config

    # The newest revision, whichever that is: one head, no branches.
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert version >= "0004"


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


# Personal data at rest (issue 8, part 7)

PHONE = "+79161234567"
KEY_A = SecretStr("phone-index-key-A-0123456789abcdef")
KEY_B = SecretStr("phone-index-key-B-0123456789abcdef")


async def _add_event(ledger: Ledger, event_id: str, phone: str | None = PHONE) -> None:
    await ledger.add_event(
        id=event_id, source="salon", event="client-created", received_at=datetime.now(UTC), client_id="42",
        phone=phone, kafka_key="salon:42", inbox="{}", normalized=None, quarantine_reason=None,
    )  # fmt: skip


async def _stored_hash(ledger: Ledger, event_id: str) -> str | None:
    async with ledger.engine.connect() as conn:
        q = text("SELECT phone_hash FROM events WHERE id = :id")
        value: str | None = (await conn.execute(q, {"id": event_id})).scalar_one()
    return value


async def test_a_new_sqlite_ledger_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    ledger = Ledger.from_url(f"sqlite+aiosqlite:///{path}")
    try:
        assert not path.exists()  # building a ledger creates nothing; the first connection does
        await upgrade(ledger.engine)
        await _begin(ledger)
        files = sorted(tmp_path.glob("relay.db*"))
        assert [f.name for f in files] == ["relay.db", "relay.db-shm", "relay.db-wal"]
        for f in files:
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    finally:
        await ledger.close()


async def test_an_existing_ledger_file_keeps_the_mode_its_operator_chose(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    path.touch()
    path.chmod(0o640)
    ledger = Ledger.from_url(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade(ledger.engine)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        await ledger.close()


async def test_the_phone_index_is_an_hmac_under_the_configured_key(db_url: str) -> None:
    a = Ledger.from_url(db_url, phone_key=KEY_A)
    b = Ledger.from_url(db_url, phone_key=KEY_B)
    try:
        await upgrade(a.engine)
        await _add_event(a, "e-a")
        await _add_event(b, "e-b")
        hash_a, hash_b = await _stored_hash(a, "e-a"), await _stored_hash(a, "e-b")
        assert (
            hash_a == hmac.new(KEY_A.get_secret_value().encode(), PHONE.encode(), hashlib.sha256).hexdigest()
        )
        assert hash_a != hashlib.sha256(PHONE.encode()).hexdigest()
        assert hash_b not in (None, hash_a)
        # Each key finds its own rows only: the index is useless without the key.
        assert [e.id for e in await a.find_events(phone=PHONE)] == ["e-a"]
        assert [e.id for e in await b.find_events(phone=PHONE)] == ["e-b"]
    finally:
        await a.close()
        await b.close()


async def test_without_a_key_no_phone_index_is_kept_and_phone_search_says_why(ledger: Ledger) -> None:
    await _add_event(ledger, "e-nokey")
    assert await _stored_hash(ledger, "e-nokey") is None
    assert [e.id for e in await ledger.find_events(client_id="42")] == ["e-nokey"]
    with pytest.raises(PhoneSearchUnavailable, match="phone_hash_key"):
        await ledger.find_events(phone=PHONE)


async def test_upgrading_drops_the_unsalted_phone_hashes_of_earlier_versions(db_url: str) -> None:
    ledger = Ledger.from_url(db_url, phone_key=KEY_A)
    try:
        await upgrade(ledger.engine, "0003")
        async with ledger.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO events (id, source, event, received_at, client_id, phone_hash, inbox) "
                    "VALUES ('e-old', 'salon', 'client-created', :t, '42', :h, '{}')"
                ),
                {
                    "t": datetime.now(UTC).replace(tzinfo=None),
                    "h": hashlib.sha256(PHONE.encode()).hexdigest(),
                },
            )
        await upgrade(ledger.engine)
        assert await _stored_hash(ledger, "e-old") is None
        assert [e.id for e in await ledger.find_events(client_id="42")] == ["e-old"]
    finally:
        await ledger.close()


async def test_records_held_for_the_klientiks_api_come_back_per_key_in_order(ledger: Ledger) -> None:
    held = [
        Waiting(0, "a1", "salon", "salon:appointment:1", "{}", True),
        Waiting(0, "b1", "salon", "salon:2", "{}", False),
        Waiting(0, "a2", "salon", "salon:appointment:1", "{}", False),
    ]
    await ledger.hold(held)
    await ledger.hold(held[:1])  # a batch read again holds nothing twice
    assert await ledger.waiting_keys(["salon:appointment:1", "salon:9"]) == {"salon:appointment:1"}
    assert await ledger.waiting_thin() == {"salon": 1}
    assert [w.event_id for w in await ledger.waiting_heads()] == ["a1", "b1"]
    await ledger.release("a1")
    nxt = await ledger.waiting_next("salon:appointment:1")
    assert nxt is not None
    assert (nxt.event_id, nxt.thin) == ("a2", False)
    await ledger.release("a2")
    await ledger.release("b1")
    assert await ledger.waiting_heads() == []


async def test_one_process_at_a_time_holds_an_exclusive_lock(db_url: str) -> None:
    first, second = Ledger.from_url(db_url), Ledger.from_url(db_url)
    try:
        async with first.exclusive(WAITING_LOCK) as mine:
            assert mine
            if db_url.startswith("postgresql"):
                async with second.exclusive(WAITING_LOCK) as theirs:
                    assert not theirs
        async with second.exclusive(WAITING_LOCK) as theirs:
            assert theirs  # released with the block
    finally:
        await first.close()
        await second.close()


async def test_finished_steps_and_the_entity_map_are_kept_and_updated(ledger: Ledger) -> None:
    assert await ledger.finished_steps("k1") == {}
    await ledger.finish_step("k1", "create", "contact-1")
    await ledger.finish_step("k1", "create", "contact-1b")  # a step finished again keeps the newest result
    await ledger.finish_step("k1", "attach", "deal-1")
    await ledger.finish_step("k2", "create", "contact-2")
    assert await ledger.finished_steps("k1") == {"create": "contact-1b", "attach": "deal-1"}

    assert await ledger.entity("salon/weeek", "client", "42") is None
    await ledger.remember_entity("salon/weeek", "client", "42", "c-9", "h1")
    await ledger.remember_entity("salon/weeek", "client", "42", "c-9", "h2")
    await ledger.remember_entity("other/weeek", "client", "42", "c-1", None)
    found = await ledger.entity("salon/weeek", "client", "42")
    assert found is not None
    assert (found.target_id, found.content_hash) == ("c-9", "h2")
    other = await ledger.entity("other/weeek", "client", "42")
    assert other is not None
    assert other.target_id == "c-1"  # per connection
    assert await ledger.entity("salon/weeek", "visit", "42") is None  # per kind


async def test_a_claimed_create_is_kept_in_doubt_on_both_databases(ledger: Ledger) -> None:
    steps = Steps(ledger, "cpahouse:salon/cpa:lead:e1", "salon/cpa", target="cpahouse")
    await steps.claim("lead", "42")
    claimed = await ledger.entity("salon/cpa", "lead", "42")
    assert claimed is not None
    assert claimed.pending
    await steps.release("lead", "42")
    assert await ledger.entity("salon/cpa", "lead", "42") is None


async def test_upgrading_turns_an_old_in_doubt_marker_into_the_new_one(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/old.db"
    engine = make_engine(url)
    await upgrade(engine, "0007")
    async with engine.begin() as conn:
        await conn.execute(text(
            "INSERT INTO entity_map VALUES ('salon/cpa', 'lead', '42', char(0) || 'pending', NULL, '2026-11-01')"
        ))  # fmt: skip
    await upgrade(engine)
    await engine.dispose()
    ledger = Ledger.from_url(url)
    found = await ledger.entity("salon/cpa", "lead", "42")
    await ledger.close()
    assert found is not None
    assert found.pending
    assert found.target_id == PENDING
