"""Repeated webhooks inside the window become one event; the window's memory survives a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.exc import DBAPIError

from services.common.config import KafkaSettings, Settings
from services.common.kafka import EVENTS, INBOX
from services.common.ledger import Ledger, Seen
from services.ingest.api import create_api
from services.ingest.dedupe import fingerprint, scope
from services.ingest.inbox import InboxRecord
from services.ingest.normalizer import create_normalizer
from services.ingest.parsing import Params, request_params, routing_key
from tests.support import read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
WINDOW = 600.0


def test_fingerprint_ignores_parameter_order_and_method_but_not_values_source_or_event() -> None:
    a = fingerprint("salon", "client-created", [("client_id", "1"), ("client_phone", "79161234567")])
    assert a == fingerprint("salon", "client-created", [("client_phone", "79161234567 "), ("Client_ID", "1")])
    assert a != fingerprint("salon", "client-created", [("client_id", "1"), ("client_phone", "79161234568")])
    assert a != fingerprint("other", "client-created", [("client_id", "1"), ("client_phone", "79161234567")])
    assert a != fingerprint("salon", "visit-paid", [("client_id", "1"), ("client_phone", "79161234567")])


def test_only_appointment_changes_supersede_each_other() -> None:
    assert scope("salon", "appointment-changed", "77") == ("salon:appointment:77", True)
    assert scope("salon", "visit-paid", "77") == ("salon:visit-paid", False)


@given(
    st.dictionaries(
        st.sampled_from(["client_id", "appointment_id", "status", "x", "utm_source"]), st.text(max_size=5)
    )
    .map(lambda d: list(d.items()))
    .flatmap(lambda pairs: st.tuples(st.just(pairs), st.permutations(pairs)))
)
def test_identical_webhooks_share_an_inbox_key_so_they_meet_on_one_partition(
    both: tuple[list[tuple[str, str]], list[tuple[str, str]]],
) -> None:
    pairs, reordered = both
    assert fingerprint("s", "e", pairs) == fingerprint("s", "e", reordered)
    assert routing_key("s", Params.of(pairs)) == routing_key("s", Params.of(reordered))


def _seen(fp: str, event_id: str, at: datetime, scope: str = "s", supersedes: bool = False) -> Seen:
    return Seen(fp, scope, event_id, at, supersedes)


async def test_a_repeat_inside_the_window_is_reported_with_the_first_id(ledger: Ledger) -> None:
    assert await ledger.claim_fingerprints([_seen("A", "e1", T0)], window_s=WINDOW) == {}
    repeats = await ledger.claim_fingerprints(
        [_seen("A", "e2", T0 + timedelta(seconds=30)), _seen("B", "e3", T0 + timedelta(seconds=31))],
        window_s=WINDOW,
    )
    assert repeats == {"e2": "e1"}


async def test_the_same_id_again_is_a_redelivery_not_a_repeat(ledger: Ledger) -> None:
    await ledger.claim_fingerprints([_seen("A", "e1", T0)], window_s=WINDOW)
    assert await ledger.claim_fingerprints([_seen("A", "e1", T0)], window_s=WINDOW) == {}


async def test_outside_the_window_it_is_a_new_event_and_starts_a_new_window(ledger: Ledger) -> None:
    await ledger.claim_fingerprints([_seen("A", "e1", T0)], window_s=WINDOW)
    late = T0 + timedelta(seconds=WINDOW + 1)
    assert await ledger.claim_fingerprints([_seen("A", "e2", late)], window_s=WINDOW) == {}
    assert await ledger.claim_fingerprints(
        [_seen("A", "e3", late + timedelta(seconds=5))], window_s=WINDOW
    ) == {"e3": "e2"}


async def test_repeats_within_one_batch_are_found(ledger: Ledger) -> None:
    batch = [_seen("A", "e1", T0), _seen("A", "e2", T0), _seen("A", "e3", T0 + timedelta(seconds=1))]
    assert await ledger.claim_fingerprints(batch, window_s=WINDOW) == {"e2": "e1", "e3": "e1"}


async def test_an_appointment_changed_back_is_a_change_not_a_repeat(ledger: Ledger) -> None:
    def change(fp: str, eid: str, s: int) -> Seen:
        return _seen(fp, eid, T0 + timedelta(seconds=s), scope="salon:appointment:7", supersedes=True)

    assert await ledger.claim_fingerprints([change("A", "e1", 0), change("A", "e2", 1)], window_s=WINDOW) == {
        "e2": "e1"
    }
    assert await ledger.claim_fingerprints([change("B", "e3", 2)], window_s=WINDOW) == {}
    # confirmed -> cancelled -> confirmed: the third is the appointment's new state.
    assert await ledger.claim_fingerprints([change("A", "e4", 3)], window_s=WINDOW) == {}
    assert await ledger.claim_fingerprints([change("A", "e5", 4)], window_s=WINDOW) == {"e5": "e4"}


async def test_old_fingerprints_are_forgotten(ledger: Ledger) -> None:
    await ledger.claim_fingerprints([_seen("A", "e1", T0)], window_s=WINDOW)
    await ledger.claim_fingerprints([_seen("B", "e2", T0 + timedelta(hours=1))], window_s=WINDOW)
    async with ledger.engine.connect() as conn:
        from sqlalchemy import text

        left = [r[0] for r in await conn.execute(text("SELECT fingerprint FROM ingest_dedupe"))]
    assert left == ["B"]


def _settings(kafka: KafkaSettings, db_url: str) -> Settings:
    return Settings.model_validate(
        {"kafka": kafka.model_dump(), "database_url": db_url, "sources": [{"name": "salon", "token": TOKEN}]}
    )


def _record(event_id: str, query: str, at: datetime, method: str = "GET") -> InboxRecord:
    return InboxRecord(
        id=event_id, source="salon", event="client-created", received_at=at, method=method, query=query
    )


async def test_the_normalizer_drops_repeats_and_remembers_them_across_a_restart(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    settings = _settings(kafka, db_url)
    query = "client_id=42&client_phone=79161234567"
    now = datetime.now(UTC)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()

    async def send(*records: InboxRecord) -> None:
        for r in records:
            key = routing_key("salon", Params.of(request_params(r.query, None, b""))).encode()
            await producer.send_and_wait(INBOX, r.to_bytes(), key=key)

    try:
        await send(
            _record("e1", query, now),
            _record("e2", "client_phone=79161234567&client_id=42", now + timedelta(seconds=1), "POST"),
            _record("e3", query + "&client_name=Анна", now + timedelta(seconds=2)),
            _record(
                "e1", query, now
            ),  # the same record again: a redelivery, passed on (downstream is idempotent)
        )
        async with serve_app(create_normalizer(settings, migrate=True)):
            events = await read_all(kafka.bootstrap_servers, EVENTS, expect=3, timeout=20)
        assert [dict(r.headers)["ce_id"] for r in events] == [b"e1", b"e3", b"e1"]

        # A new process, the same ledger: the repeat of e1 four minutes later is still a repeat.
        await send(_record("e4", query, now + timedelta(minutes=4)))
        await send(_record("e5", query, now + timedelta(minutes=11)))  # past e1's window: a new event
        async with serve_app(create_normalizer(settings)):
            events = await read_all(kafka.bootstrap_servers, EVENTS, expect=4, timeout=20)
        assert [dict(r.headers)["ce_id"] for r in events] == [b"e1", b"e3", b"e1", b"e5"]
    finally:
        await producer.stop()

    ledger = Ledger.from_url(db_url)
    try:
        e2, e4 = await ledger.event("e2"), await ledger.event("e4")
        assert e2 is not None
        assert e2.duplicate_of == "e1"
        assert e4 is not None
        assert e4.duplicate_of == "e1"
        e5 = await ledger.event("e5")
        assert e5 is not None
        assert e5.duplicate_of is None
    finally:
        await ledger.close()


async def test_identical_webhooks_through_the_api_land_on_one_partition(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    settings = _settings(kafka, f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    async with serve_app(create_api(settings, migrate=True)) as url, httpx.AsyncClient(base_url=url) as http:
        for i in range(20):
            await http.get(
                f"/hooks/klientiks/{TOKEN}/appointment-changed?appointment_id={i % 5}&status=confirmed"
            )
        await http.post(
            f"/hooks/klientiks/{TOKEN}/appointment-changed",
            data={"status": "confirmed", "appointment_id": "3"},
        )
    recs = await read_all(kafka.bootstrap_servers, INBOX, expect=21)
    by_key: dict[bytes | None, set[int]] = {}
    for r in recs:
        by_key.setdefault(r.key, set()).add(r.partition)
    assert len(by_key) == 5
    assert all(len(parts) == 1 for parts in by_key.values())


def _history(event_id: str, inbox: str = "{}") -> dict[str, object]:
    return dict(
        id=event_id, source="salon", event="client-created", received_at=T0, client_id="42", phone=None,
        kafka_key="salon:42", inbox=inbox, normalized=None, quarantine_reason=None,
    )  # fmt: skip


async def test_a_batch_is_claimed_and_kept_in_one_transaction_with_its_repeats_marked(ledger: Ledger) -> None:
    commits: list[int] = []
    event.listen(ledger.write_engine, "commit", lambda _conn: commits.append(1))
    batch = [_seen("A", "e1", T0), _seen("A", "e2", T0 + timedelta(seconds=1)), _seen("B", "e3", T0)]
    repeats = await ledger.intake(batch, [_history(s.event_id) for s in batch], window_s=WINDOW)
    assert repeats == {"e2": "e1"}
    assert len(commits) == 1
    assert [(await ledger.event(i)).duplicate_of for i in ("e1", "e2", "e3")] == [None, "e1", None]  # type: ignore[union-attr]
    # Without a window nothing is claimed or marked; the history is still kept.
    assert await ledger.intake([_seen("A", "e4", T0)], [_history("e4")], window_s=0) == {}
    assert (await ledger.event("e4")) is not None
    assert await ledger.claim_fingerprints([_seen("A", "e5", T0)], window_s=WINDOW) == {"e5": "e1"}


async def test_a_history_the_database_refuses_takes_the_batch_claim_with_it(ledger: Ledger) -> None:
    if ledger.dialect != "postgresql":
        pytest.skip("SQLite stores a NUL; PostgreSQL refuses it, as it would a row of a real batch")
    with pytest.raises(DBAPIError):
        await ledger.intake([_seen("A", "e1", T0)], [_history("e1", inbox="\x00")], window_s=WINDOW)
    # Nothing of the batch stayed: the claim is not there to make its retry a repeat of itself.
    assert await ledger.event("e1") is None
    assert await ledger.claim_fingerprints([_seen("A", "e2", T0)], window_s=WINDOW) == {}
