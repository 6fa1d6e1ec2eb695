"""Retention of personal data: the ledger's batched purge on SQLite and PostgreSQL, the normalizer's purger,
`relay ledger purge`, and the Kafka topics' retention to match."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import REGISTRY
from pydantic import ValidationError
from sqlalchemy import event, func, insert, select, text
from typer.testing import CliRunner

from services.cli import app
from services.common.config import (
    REPLAYABLE_DAYS,
    ConfigError,
    KafkaSettings,
    RetentionSettings,
    Settings,
    load_settings,
)
from services.common.delivery.runtime import DeliveryRuntime
from services.common.embedded import EmbeddedBroker
from services.common.kafka import DAY_MS, EVENTS, INBOX, QUARANTINE, dlq_topic, ensure_topics, topic_specs
from services.common.ledger import PENDING, Ledger, upgrade
from services.common.ledger.retention import KEPT, MAX_PURGE_BATCH, PURGE_LOCK, TABLES, RetentionPolicy
from services.common.ledger.schema import (
    ATTEMPTS,
    DEDUPE,
    DELIVERIES,
    ENTITIES,
    PARKED,
    SPOOL,
    STEPS,
    WAITING,
)
from services.common.ledger.schema import EVENTS as EVENT_ROWS
from services.common.retention import Purger, retention_policy
from services.ingest.normalizer import create_normalizer
from tests.common.fake_target import ACTION, FakeTarget
from tests.support import FAST_DELIVERY, client_event, eventually, serve_app

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
WINDOW_S = 600.0  # ingest.dedupe_window_s's default: the dedupe table keeps twice that
EVERYTHING = RetentionPolicy(
    events_days=30, attempts_days=90, deliveries_days=365, entities_days=365, dedupe_s=2 * WINDOW_S
)
EVENTS_ONLY = RetentionPolicy(events_days=30, attempts_days=None)
PHONE = "+79161234567"


def ago(days: float = 0, seconds: float = 0, now: datetime = NOW) -> datetime:
    return now - timedelta(days=days, seconds=seconds)


def _event(id: str, received_at: datetime) -> dict[str, Any]:
    return dict(
        id=id, source="salon", event="client-created", received_at=received_at, client_id="42", phone_hash=None,
        kafka_key="salon:42", inbox=json.dumps({"query": f"phone={PHONE}&name=Попова"}),
        normalized=json.dumps({"client": {"phone": PHONE}}), quarantine_reason=None, duplicate_of=None,
    )  # fmt: skip


def _delivery(id: int | None, key: str, status: str, updated_at: datetime) -> dict[str, Any]:
    return ({} if id is None else {"id": id}) | dict(
        idempotency_key=key, event_id=f"evt-{key}", source="salon", connection="weeek", target="weeek",
        action="contact", status=status, attempts=1, retry_base=0, created_at=updated_at, updated_at=updated_at,
    )  # fmt: skip


def _attempt(delivery_id: int, number: int, started_at: datetime) -> dict[str, Any]:
    return dict(delivery_id=delivery_id, number=number, started_at=started_at, duration_ms=12.0,
                outcome="success", error=f"the vendor said: client {PHONE} exists")  # fmt: skip


async def seed(ledger: Ledger, now: datetime = NOW) -> None:
    """Rows in every table, some past ``EVERYTHING`` at ``now`` and some not; see ``REMAIN`` and ``REMOVED``."""
    old = ago(400, now=now)
    async with ledger.engine.begin() as conn:
        await conn.execute(insert(EVENT_ROWS), [
            _event("ev-old", ago(31, now=now)), _event("ev-older", old), _event("ev-new", ago(29, now=now)),
        ])  # fmt: skip
        await conn.execute(insert(DELIVERIES), [
            _delivery(1, "old-delivered", "delivered", old),
            _delivery(2, "old-failed", "failed", old),
            _delivery(3, "old-pending", "pending", old),  # live work, however old
            _delivery(4, "old-parked", "parked", old),
            _delivery(5, "new-delivered", "delivered", ago(1, now=now)),
        ])  # fmt: skip
        await conn.execute(insert(ATTEMPTS), [
            _attempt(1, 1, old), _attempt(1, 2, old),  # past attempts_days: go by age
            _attempt(2, 1, ago(10, now=now)),  # young, but goes with its delivery
            _attempt(3, 1, old), _attempt(3, 2, ago(10, now=now)),  # the old one goes, the delivery stays
            _attempt(4, 1, ago(10, now=now)),
            _attempt(5, 1, ago(1, now=now)),
        ])  # fmt: skip
        await conn.execute(insert(STEPS), [
            dict(idempotency_key=k, step="contact", result='{"id": "W-1"}', finished_at=old)
            for k in ("old-delivered", "old-failed", "old-pending", "new-delivered")
        ])  # fmt: skip
        await conn.execute(insert(ENTITIES), [
            dict(connection="salon/weeek", kind="client", klientiks_id=i, target_id=t, content_hash=None,
                 updated_at=at)
            for i, t, at in (("1", "W-1", old), ("2", PENDING, old), ("3", "W-3", ago(1, now=now)))
        ])  # fmt: skip
        await conn.execute(insert(DEDUPE), [
            dict(fingerprint="fp-old", scope="salon/client/42", event_id="ev-old",
                 received_at=ago(seconds=2 * WINDOW_S + 1, now=now)),
            dict(fingerprint="fp-new", scope="salon/client/43", event_id="ev-new",
                 received_at=ago(seconds=60, now=now)),
        ])  # fmt: skip
        await conn.execute(insert(PARKED), [
            dict(idempotency_key="old-parked", target="weeek", lane="weeek:salon/weeek:42", partition=0,
                 due_at=old, reason="retry", connection="salon/weeek", action="contact", kafka_key="salon:42",
                 event=json.dumps({"phone": PHONE}), replay=0, parked_at=old),
        ])  # fmt: skip
        await conn.execute(insert(SPOOL), [
            dict(record_id="sp-1", kafka_key="salon:42", record=json.dumps({"phone": PHONE}), spooled_at=old),
        ])  # fmt: skip
        await conn.execute(insert(WAITING), [
            dict(event_id="wt-1", source="salon", inbox_key="salon:42", record=json.dumps({"phone": PHONE}),
                 thin=1, waiting_since=old),
        ])  # fmt: skip


def remain(ledger: Ledger) -> dict[str, list[Any]]:
    return REMAIN | {"entity_map": [("2", PENDING), ("3", "W-3")]}


REMOVED = {
    "events": 2,
    "delivery_attempts": 4,  # three by age, one with its delivery
    "deliveries": 2,
    "delivery_steps": 2,
    "entity_map": 1,
    "ingest_dedupe": 1,
}
REMAIN = {
    "events": ["ev-new"],
    "deliveries": ["new-delivered", "old-parked", "old-pending"],
    "delivery_attempts": [(3, 2), (4, 1), (5, 1)],
    "delivery_steps": ["new-delivered", "old-pending"],
    "entity_map": [("2", PENDING), ("3", "W-3")],
    "ingest_dedupe": ["fp-new"],
    "parked": ["old-parked"],
    "ingest_spool": ["sp-1"],
    "ingest_waiting": ["wt-1"],
}


async def tables(ledger: Ledger) -> dict[str, list[Any]]:
    """Every purged and kept table's rows, by what identifies them, sorted."""
    queries = {
        "events": select(EVENT_ROWS.c.id),
        "deliveries": select(DELIVERIES.c.idempotency_key),
        "delivery_attempts": select(ATTEMPTS.c.delivery_id, ATTEMPTS.c.number),
        "delivery_steps": select(STEPS.c.idempotency_key),
        "entity_map": select(ENTITIES.c.klientiks_id, ENTITIES.c.target_id),
        "ingest_dedupe": select(DEDUPE.c.fingerprint),
        "parked": select(PARKED.c.idempotency_key),
        "ingest_spool": select(SPOOL.c.record_id),
        "ingest_waiting": select(WAITING.c.event_id),
    }
    async with ledger.engine.connect() as conn:
        out: dict[str, list[Any]] = {}
        for name, q in queries.items():
            rows = (await conn.execute(q)).all()
            out[name] = sorted(r[0] if len(r) == 1 else tuple(r) for r in rows)
        return out


async def test_the_purge_removes_what_is_past_retention_from_every_table_and_nothing_else(
    ledger: Ledger,
) -> None:
    await seed(ledger)
    seen: list[tuple[str, int]] = []
    report = await ledger.purge(EVERYTHING, now=NOW, progress=lambda t, n: seen.append((t, n)))
    assert report.rows == REMOVED
    assert not report.dry_run
    assert await tables(ledger) == remain(ledger)
    assert report.cutoffs["events"] == ago(30)
    assert report.cutoffs["delivery_steps"] == report.cutoffs["deliveries"] == ago(365)
    assert report.cutoffs["ingest_dedupe"] == ago(seconds=2 * WINDOW_S)
    totals: dict[str, int] = {}
    for table, n in seen:
        totals[table] = totals.get(table, 0) + n
    assert totals == REMOVED  # progress heard of every row, once
    # Nothing is left to go: a second purge removes nothing.
    assert (await ledger.purge(EVERYTHING, now=NOW)).total == 0


async def test_a_dry_run_removes_nothing_and_counts_what_the_purge_then_removes(ledger: Ledger) -> None:
    await seed(ledger)
    before = await tables(ledger)
    dry = await ledger.purge(EVERYTHING, now=NOW, dry_run=True)
    assert dry.dry_run
    assert dry.rows == REMOVED
    assert await tables(ledger) == before
    assert (await ledger.purge(EVERYTHING, now=NOW)).rows == dry.rows


async def test_kept_for_ever_by_default_but_events_and_attempts(ledger: Ledger) -> None:
    """The defaults: idempotency keys and the entity map stay; events past 30 days, attempts past 90 go."""
    await seed(ledger)
    report = await ledger.purge(RetentionPolicy(), now=NOW)
    assert report.rows == dict.fromkeys(TABLES, 0) | {"events": 2, "delivery_attempts": 3}
    after = await tables(ledger)
    assert after["deliveries"] == [
        "new-delivered",
        "old-delivered",
        "old-failed",
        "old-parked",
        "old-pending",
    ]
    assert after["entity_map"] == [("1", "W-1"), *remain(ledger)["entity_map"]]
    assert after["delivery_steps"] == ["new-delivered", "old-delivered", "old-failed", "old-pending"]
    assert after["ingest_dedupe"] == ["fp-new", "fp-old"]  # no dedupe_s: kept
    assert {t: after[t] for t in KEPT} == {t: REMAIN[t] for t in KEPT}


async def test_a_backlog_larger_than_a_batch_goes_in_several_short_transactions(ledger: Ledger) -> None:
    async with ledger.engine.begin() as conn:
        await conn.execute(insert(EVENT_ROWS), [_event(f"ev-{i:02}", ago(40 + i)) for i in range(35)])
        await conn.execute(insert(EVENT_ROWS), [_event("ev-new", ago(1))])
    commits = 0

    def count(*_: Any) -> None:
        nonlocal commits
        commits += 1

    batches: list[int] = []
    event.listen(ledger.engine.sync_engine, "commit", count)
    try:
        report = await ledger.purge(EVENTS_ONLY, now=NOW, batch=10, progress=lambda _, n: batches.append(n))
    finally:
        event.remove(ledger.engine.sync_engine, "commit", count)
    assert report.rows["events"] == 35
    assert batches == [10, 10, 10, 5]  # oldest first, ten at a time
    assert commits == 4  # one transaction per batch
    assert (await tables(ledger))["events"] == ["ev-new"]


async def test_a_delivery_s_attempts_cascade_with_it(ledger: Ledger) -> None:
    """The foreign key's cascade is on (SQLite needs `PRAGMA foreign_keys`): no attempt outlives its delivery."""
    await seed(ledger)
    async with ledger.engine.begin() as conn:
        if ledger.dialect == "sqlite":
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar_one() == 1
        await conn.execute(DELIVERIES.delete().where(DELIVERIES.c.idempotency_key == "old-pending"))
        left = await conn.execute(
            select(func.count()).select_from(ATTEMPTS).where(ATTEMPTS.c.delivery_id == 3)
        )
        assert left.scalar_one() == 0


async def test_a_row_a_writer_holds_is_left_for_the_next_run(ledger: Ledger) -> None:
    """PostgreSQL: the purge skips a locked row rather than wait for its writer (SQLite has one writer)."""
    if ledger.dialect != "postgresql":
        pytest.skip("row locks are PostgreSQL's")
    async with ledger.engine.begin() as conn:
        await conn.execute(insert(EVENT_ROWS), [_event(f"ev-{i}", ago(40)) for i in range(3)])
    async with ledger.engine.connect() as writer:
        await writer.execute(select(EVENT_ROWS.c.id).where(EVENT_ROWS.c.id == "ev-1").with_for_update())
        # wait_for only keeps a regression from hanging the suite: a purge that waits never returns here.
        report = await asyncio.wait_for(ledger.purge(EVENTS_ONLY, now=NOW), 60)
        assert report.rows["events"] == 2
        await writer.rollback()
    assert (await ledger.purge(EVENTS_ONLY, now=NOW)).rows["events"] == 1


# ----------------------------------------------------------------------------- the purge under load


async def _backlog(ledger: Ledger, rows: int) -> None:
    """``rows`` old events, and as many old attempts of 200 old pending deliveries (those stay)."""
    old = ago(200, now=datetime.now(UTC))
    async with ledger.engine.begin() as conn:
        # Ids of the database's choosing: PostgreSQL's sequence must stay ahead of the runtime's inserts.
        pending = [_delivery(None, f"backlog-{i}", "pending", old) for i in range(200)]
        await conn.execute(insert(DELIVERIES), pending)
        ids = list((await conn.execute(select(DELIVERIES.c.id))).scalars())
        for start in range(0, rows, 5000):
            chunk = range(start, start + 5000)
            await conn.execute(insert(EVENT_ROWS), [_event(f"old-{i}", old) for i in chunk])
            await conn.execute(insert(ATTEMPTS), [_attempt(ids[i % len(ids)], i, old) for i in chunk])


def _delivered() -> float:
    labels = {"target": "fake", "action": ACTION, "outcome": "success"}
    return REGISTRY.get_sample_value("relay_deliveries_total", labels) or 0.0


async def test_a_purge_under_load_does_not_stall_delivery(ledger: Ledger, kafka: KafkaSettings) -> None:
    """A real delivery runtime delivers through the group commit while 10,000 old rows go 50 at a time.

    Events keep coming until the purge ends. Each purge batch notes how many deliveries had been recorded by
    then: deliveries must be recorded between the batches of either half of the purge, not after it.
    """
    await _backlog(ledger, 5_000)
    settings = Settings.model_validate({"kafka": kafka.model_dump(), "delivery": FAST_DELIVERY})
    target = FakeTarget()
    runtime = DeliveryRuntime(target, settings, ledger)
    await runtime.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()
    sent: list[str] = []

    async def send(event_id: str) -> None:
        e = client_event(event_id, f"C-{event_id}", None)
        await producer.send_and_wait(EVENTS, e.kafka_value(), key=e.id.encode(), headers=e.kafka_headers())
        sent.append(event_id)

    try:
        await send("warm-up")
        await eventually(
            lambda: "warm-up" in target.delivered(), timeout=30, what="the runtime's first delivery"
        )
        marks: list[float] = []
        purge = asyncio.create_task(
            ledger.purge(
                RetentionPolicy(events_days=30, attempts_days=90),
                now=datetime.now(UTC),
                batch=50,
                progress=lambda _, n: marks.append(_delivered()),
            )
        )
        while not purge.done():
            await send(f"e{len(sent)}")
            await asyncio.sleep(0.01)  # a steady flow, not a flood
        report = await purge
        await eventually(lambda: target.delivered() == set(sent), timeout=60, what="every delivery")
    finally:
        await producer.stop()
        await runtime.stop()
    assert report.rows["events"] == 5_000
    assert report.rows["delivery_attempts"] == 5_000
    assert len(marks) == 200
    half = len(marks) // 2
    assert marks[0] < marks[half] < marks[-1], "no delivery was recorded while the purge ran"
    async with ledger.engine.connect() as conn:
        statuses = (
            await conn.execute(
                select(DELIVERIES.c.status, func.count())
                .where(DELIVERIES.c.target == "fake")
                .group_by(DELIVERIES.c.status)
            )
        ).all()
        attempts = (await conn.execute(select(func.count()).select_from(ATTEMPTS))).scalar_one()
    assert dict(statuses) == {"delivered": len(sent)}
    assert attempts == len(sent)  # the runtime's; the backlog's are gone


# ----------------------------------------------------------------------------- the normalizer's purger


def _runs(outcome: str) -> float:
    return REGISTRY.get_sample_value("relay_ledger_purge_runs_total", {"outcome": outcome}) or 0.0


def _purged(table: str) -> float:
    return REGISTRY.get_sample_value("relay_ledger_purged_rows_total", {"table": table}) or 0.0


def _settings(**retention: Any) -> Settings:
    return Settings.model_validate({"retention": {"deliveries_days": 365, "entities_days": 365, **retention}})


async def test_the_purger_counts_what_it_removed(ledger: Ledger) -> None:
    await seed(ledger, now=datetime.now(UTC))
    settings = _settings()
    assert retention_policy(settings) == EVERYTHING  # dedupe: twice the default window
    before = {t: _purged(t) for t in TABLES}
    ok = _runs("ok")
    purger = Purger(ledger, settings)
    assert await purger.run_once() == "ok"
    assert {t: _purged(t) - before[t] for t in TABLES} == REMOVED
    assert _runs("ok") == ok + 1
    assert (REGISTRY.get_sample_value("relay_ledger_purge_last_success_timestamp_seconds") or 0) > 0
    assert purger.last is not None
    assert purger.last.rows == REMOVED


async def test_one_replica_purges_at_a_time(ledger: Ledger) -> None:
    if ledger.dialect != "postgresql":
        pytest.skip("the lock is PostgreSQL's: SQLite is one process's")
    await seed(ledger, now=datetime.now(UTC))
    other = Ledger(ledger.engine)  # another replica's sessions, the same database
    purger = Purger(other, _settings())
    ok, failed = _runs("ok"), _runs("failed")
    async with ledger.exclusive(PURGE_LOCK) as mine:
        assert mine
        assert await purger.run_once() == "skipped"
    assert (_runs("ok"), _runs("failed")) == (ok, failed)  # a skipped run is neither
    assert (await tables(ledger))["events"] == ["ev-new", "ev-old", "ev-older"]
    assert await purger.run_once() == "ok"
    assert (await tables(ledger))["events"] == ["ev-new"]


async def test_a_failing_purge_is_counted_and_tried_again_never_raised(tmp_path: Path) -> None:
    # A database without the ledger's tables: every run fails.
    ledger = Ledger.from_url(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    purger = Purger(ledger, _settings(interval_s=0.01))
    failed = _runs("failed")
    try:
        assert await purger.run_once() == "failed"
        assert _runs("failed") == failed + 1
        task = asyncio.create_task(purger.run())
        await eventually(lambda: _runs("failed") >= failed + 3, what="runs after a failure")
        assert not task.done()  # the loop goes on
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await ledger.close()


async def test_the_normalizer_purges_the_ledger_in_the_background(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    ledger = Ledger.from_url(url)
    try:
        await upgrade(ledger.engine)
        await seed(ledger, now=datetime.now(UTC))
        settings = Settings.model_validate({"kafka": kafka.model_dump(), "database_url": url})
        ok = _runs("ok")
        async with serve_app(create_normalizer(settings)):
            await eventually(lambda: _runs("ok") > ok, timeout=30, what="the normalizer's first purge")
        after = await tables(ledger)
    finally:
        await ledger.close()
    assert after["events"] == ["ev-new"]
    assert after["deliveries"] == [
        "new-delivered",
        "old-delivered",
        "old-failed",
        "old-parked",
        "old-pending",
    ]


# ----------------------------------------------------------------------------- `relay ledger purge`

runner = CliRunner()


@pytest.fixture
def ledger_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A migrated SQLite ledger with rows past the default retention, as `relay` is told to use it."""
    path = tmp_path / "relay.db"
    url = f"sqlite+aiosqlite:///{path}"

    async def prepare() -> None:
        ledger = Ledger.from_url(url)
        try:
            await upgrade(ledger.engine)
            await seed(ledger, now=datetime.now(UTC))
        finally:
            await ledger.close()

    asyncio.run(prepare())
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_DATABASE_URL", url)
    monkeypatch.setenv("RELAY_RETENTION__DELIVERIES_DAYS", "365")
    monkeypatch.setenv("COLUMNS", "250")
    return path


def _printed(output: str) -> dict[str, str]:
    """Table name -> the last column of its row in the printed table."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] in TABLES:
            rows[cells[0]] = cells[-1]
    return rows


def _count_rows(path: Path) -> dict[str, list[Any]]:
    async def read() -> dict[str, list[Any]]:
        ledger = Ledger.from_url(f"sqlite+aiosqlite:///{path}")
        try:
            return await tables(ledger)
        finally:
            await ledger.close()

    return asyncio.run(read())


def test_cli_purge_dry_run_then_purge(ledger_file: Path) -> None:
    before = _count_rows(ledger_file)
    expected = {t: str(n) for t, n in (REMOVED | {"entity_map": 0}).items()}  # entities: kept by default

    dry = runner.invoke(app, ["ledger", "purge", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "Would remove" in dry.output
    assert _printed(dry.output) == expected
    assert "dry run: nothing was" in dry.output
    assert _count_rows(ledger_file) == before

    done = runner.invoke(app, ["ledger", "purge"])
    assert done.exit_code == 0, done.output
    assert "Removed" in done.output
    assert _printed(done.output) == expected
    assert f"{sum(REMOVED.values()) - 1} row(s) removed" in done.output
    after = _count_rows(ledger_file)
    assert after == REMAIN | {"entity_map": [("1", "W-1"), ("2", PENDING), ("3", "W-3")]}

    again = runner.invoke(app, ["ledger", "purge"])
    assert again.exit_code == 0, again.output
    assert set(_printed(again.output).values()) == {"0"}


def test_cli_purge_names_a_missing_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'nowhere.db'}")
    result = runner.invoke(app, ["ledger", "purge"])
    assert result.exit_code == 2
    assert "RELAY_DATABASE_URL" in result.output
    assert not (tmp_path / "nowhere.db").exists()


# ----------------------------------------------------------------------------- settings and Kafka


def test_retention_settings_defaults_and_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    r = RetentionSettings()
    assert (r.events_days, r.attempts_days, r.deliveries_days, r.entities_days) == (30, 90, None, None)
    assert (r.interval_s, r.batch) == (3600, 1000)
    assert RetentionSettings(batch=MAX_PURGE_BATCH).batch == MAX_PURGE_BATCH  # what the purge takes, no more
    with pytest.raises(ValidationError):
        RetentionSettings(batch=MAX_PURGE_BATCH + 1)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv(
        "RELAY_RETENTION__EVENTS_DAYS", "null"
    )  # an environment variable cannot be YAML's null
    monkeypatch.setenv("RELAY_RETENTION__ATTEMPTS_DAYS", "14")
    settings = load_settings()
    assert (settings.retention.events_days, settings.retention.attempts_days) == (None, 14)


def test_idempotency_keys_outlive_what_kafka_can_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_RETENTION__DELIVERIES_DAYS", "7")
    with pytest.raises(ConfigError, match="deliveries_days must be at least 30"):
        load_settings()
    replayable = [s.retention_ms for s in topic_specs(KafkaSettings()) if s.name == EVENTS or "dlq" in s.name]
    assert max(replayable) <= REPLAYABLE_DAYS * DAY_MS


def test_every_topic_carries_a_retention_matched_to_the_ledger() -> None:
    specs = {s.name: s for s in topic_specs(KafkaSettings())}
    days = {name: s.retention_ms / DAY_MS for name, s in specs.items()}
    assert days[INBOX] == 7
    assert days[EVENTS] == RetentionSettings().events_days == 30
    assert days[QUARANTINE] == 30
    assert all(days[dlq_topic(t)] == 30 for t in ("maxma", "cpahouse", "weeek", "plarin"))
    assert all(s.configs["retention.ms"] == str(s.retention_ms) for s in specs.values())


async def test_the_embedded_broker_creates_the_topics_with_their_retention(broker: EmbeddedBroker) -> None:
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await ensure_topics(settings)
    await ensure_topics(settings)  # existing topics are left alone
    specs = topic_specs(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        assert {s.name for s in specs} <= set(await admin.list_topics())
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, s.name) for s in specs]
        )
    finally:
        await admin.close()
    found = {
        resource[3]: {entry[0]: entry[1] for entry in resource[4]}
        for response in responses
        for resource in response.resources
    }
    assert {name: configs.get("retention.ms") for name, configs in found.items()} == {
        s.name: str(s.retention_ms) for s in specs
    }
