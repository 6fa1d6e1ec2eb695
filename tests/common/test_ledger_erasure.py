"""Erasure of one client's personal data (`relay events forget`), on SQLite and PostgreSQL and on a real broker.

The ledger is filled as the services fill it: the normalizer's `route` makes each webhook's history, the
ledger's own calls record deliveries, attempts, steps, parked deliveries, the entity map, the dedupe window,
the spool and the records waiting for the Klientiks API. Another client of the same source, and the same
client id of another source, have rows in every table: they must come out byte-for-byte unchanged.
"""

from __future__ import annotations

import asyncio
import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from sqlalchemy import select

from services.cli.events import client_records
from services.common.config import KafkaSettings, Settings
from services.common.dlq import dead_letter_headers
from services.common.events import CloudEvent, EventData, EventName, source_uri
from services.common.kafka import QUARANTINE, dlq_topic, ensure_topics
from services.common.ledger import Ledger, PhoneSearchUnavailable, Waiting, idempotency_key
from services.common.ledger.erasure import ERASED, ClientMatch, ErasureReport, forgotten_at
from services.common.ledger.schema import (
    ATTEMPTS,
    DEDUPE,
    DELIVERIES,
    ENTITIES,
    EVENTS,
    PARKED,
    SPOOL,
    STEPS,
    WAITING,
)
from services.common.outcome import Outcome
from services.ingest.inbox import InboxRecord
from services.ingest.normalizer import route
from tests.support import PHONE_KEY

NOW = datetime.now(UTC).replace(microsecond=0)
SETTINGS = Settings.model_validate(
    {
        "sources": [
            {"name": "salon", "token": "salon-token-0123456789abcdef"},
            {"name": "center", "token": "center-token-0123456789abcdef"},
        ]
    }
)
E164 = "+79161234567"
NAME = "client_name=Иванова+Анна&client_email=anna.ivanova%40mail.ru"
CLIENT = f"client_id=1842&client_phone=8+(916)+123-45-67&{NAME}"
OTHER = "client_id=1843&client_phone=79995554433&client_name=Петров+Пётр"


def webhook(event_id: str, query: str = "", *, source: str = "salon", event: str = "client-created",
            minutes_ago: int = 30, **fields: Any) -> bytes:  # fmt: skip
    fields.setdefault("method", "GET")
    return InboxRecord(
        id=event_id, source=source, event=event, received_at=NOW - timedelta(minutes=minutes_ago), query=query,
        **fields,
    ).to_bytes()  # fmt: skip


def bad_body(event_id: str, query: str) -> bytes:
    """Quarantined (bad_body): its events row has no client id and no phone index, only the raw record."""
    return webhook(event_id, query, event="appointment-created", method="POST",
                   content_type="application/json", body='{"appointment_id": "77')  # fmt: skip


# Webhooks through the normalizer: histories (events rows) and dedupe claims, as its `intake` keeps them.
HISTORY = {
    "c-created": webhook("c-created", CLIENT, minutes_ago=40),
    "c-repeat": webhook("c-repeat", CLIENT, minutes_ago=39),  # the same request again: a duplicate
    "c-paid": webhook(
        "c-paid",
        "appointment_id=5001&client_id=1842&client_phone=79161234567&appointment_total_cost=2500",
        event="visit-paid",
    ),
    "c-bad": bad_body("c-bad", "client_id=1842&client_phone=%2B7+916+123+45+67"),
    "c-thin": webhook("c-thin", "appointment_id=5002&client_id=1842", event="visit-paid"),
    # No phone: a forget by phone finds it by the client id the phone's events name.
    "c-nophone": webhook("c-nophone", "appointment_id=5003&client_id=1842", event="appointment-created"),
    "o-created": webhook("o-created", OTHER),
    "o-bad": bad_body("o-bad", "client_id=1843&client_phone=79995554433"),
    "x-created": webhook("x-created", CLIENT, source="center"),  # the same id and phone, another account
}
CLIENT_EVENTS = {"c-created", "c-repeat", "c-paid", "c-bad", "c-thin", "c-nophone"}
SPOOLED = {
    "c-spool": webhook(
        "c-spool",
        event="client-created",
        method="POST",
        content_type="application/x-www-form-urlencoded",
        body=f"client_id=1842&client_phone=%2B79161234567&{NAME}",
    ),
    "o-spool": webhook("o-spool", OTHER),
    "x-spool": webhook("x-spool", CLIENT, source="center"),
}
KEYS = {
    "c-new": idempotency_key("maxma", "maxma", "new-client", "c-created"),
    "c-deal": idempotency_key("weeek", "weeek", "new-deal", "c-paid"),
    "c-order": idempotency_key("maxma", "maxma", "set-order", "c-paid"),
    "c-lead": idempotency_key("cpahouse", "cpahouse", "lead", "c-created"),  # pending: in flight
    "o-new": idempotency_key("maxma", "maxma", "new-client", "o-created"),
    "o-order": idempotency_key("maxma", "maxma", "set-order", "o-created"),
    "x-new": idempotency_key("maxma", "maxma", "new-client", "x-created"),
}
CLIENT_KEYS = {KEYS["c-new"], KEYS["c-deal"], KEYS["c-order"], KEYS["c-lead"]}


def keyed(ledger: Ledger) -> Ledger:
    """The same database, opened with the phone index key (the normalizer's and `relay events find`'s)."""
    return Ledger(ledger.engine, phone_key=SecretStr(PHONE_KEY))


async def attempt(ledger: Ledger, key: str, outcome: Outcome, *, final: bool = False) -> None:
    await ledger.record(key, outcome, started_at=NOW - timedelta(minutes=5), duration_s=0.2, final=final)


def inbox_key(name: str) -> str:
    """The inbox record's Kafka key, as the ingest API makes it: the source and the client id."""
    return {"c": "salon:1842", "o": "salon:1843", "x": "center:1842"}[name[0]]


async def fill(ledger: Ledger) -> None:
    outs = {name: route(raw, inbox_key(name).encode(), SETTINGS) for name, raw in HISTORY.items()}
    assert {i for i, o in outs.items() if o.reason} == {"c-bad", "o-bad"}
    repeats = await ledger.intake(
        [o.seen for o in outs.values() if o.seen], [o.history for o in outs.values() if o.history],
        window_s=3600,
    )  # fmt: skip
    assert repeats == {"c-repeat": "c-created"}
    for name, raw in SPOOLED.items():
        await ledger.spool(record_id=name, kafka_key=inbox_key(name), record=raw.decode())
    await ledger.hold([
        Waiting(0, "c-thin", "salon", "salon:1842", HISTORY["c-thin"].decode(), True),
        Waiting(0, "o-thin", "salon", "salon:1843", webhook("o-thin", OTHER).decode(), True),
    ])  # fmt: skip

    for name, key in KEYS.items():
        target, connection, action, event_id = key.split(":")
        source = "center" if name[0] == "x" else "salon"
        await ledger.begin(key, event_id=event_id, source=source, connection=connection, target=target,
                           action=action)  # fmt: skip
    await attempt(ledger, KEYS["c-new"], Outcome.retryable("HTTP 503", http_status=503))
    await attempt(ledger, KEYS["c-new"], Outcome.permanent("Maxma: client Иванова Анна +79161234567 is blocked",
                                                           http_status=400, vendor_code="11"), final=True)  # fmt: skip
    await attempt(ledger, KEYS["c-deal"], Outcome.success(http_status=200, target_ref="deal-77"))
    await ledger.finish_step(KEYS["c-deal"], "contact", "contact-9")
    await ledger.finish_step(KEYS["c-deal"], "deal", "deal-77")
    await attempt(ledger, KEYS["c-order"], Outcome.retryable("HTTP 502 for Иванова Анна", http_status=502))
    await attempt(
        ledger, KEYS["o-new"], Outcome.permanent("Maxma: client +79995554433 is blocked"), final=True
    )
    await attempt(ledger, KEYS["o-order"], Outcome.retryable("HTTP 502 for Петров Пётр", http_status=502))
    await attempt(
        ledger, KEYS["x-new"], Outcome.permanent("Maxma: client +79161234567 is blocked"), final=True
    )
    await ledger.finish_step(KEYS["o-new"], "contact", "contact-10")
    for name in ("c-order", "o-order"):
        event = outs["c-paid" if name == "c-order" else "o-created"].event
        assert event is not None
        await ledger.park(KEYS[name], target="maxma", lane=f"maxma:salon/maxma:{name}", partition=0,
                          due_at=NOW + timedelta(minutes=5), reason="retry", connection="salon/maxma",
                          action="set-order", kafka_key=inbox_key(name), event=event.model_dump_json())  # fmt: skip

    for connection, kind, klientiks_id, target_id, content_hash in (
        ("salon/maxma", "client", "1842", "2222000000001", "hash-of-anna"),
        ("salon/weeek", "client", "1842", "contact-9", "hash-of-anna-for-weeek"),
        ("salon/weeek", "visit", "5001", "deal-77", None),
        ("salon/weeek", "visit-title", "5001", "Стрижка — Иванова Анна", None),
        ("salon/weeek", "visit-status", "5001", "status-1", None),
        ("salon/cpahouse", "lead", "offer-7:1842", "lead-1", None),
        # Not the client's: the other client's rows, a visit whose id equals the client's id, another source.
        ("salon/maxma", "client", "1843", "2222000000002", "hash-of-petr"),
        ("salon/maxma", "order", "1842", "order-1", "confirmed"),
        ("salon/weeek", "visit-title", "6001", "Стрижка — Петров Пётр", None),
        ("salon/cpahouse", "lead", "offer-7:1843", "lead-2", None),
        ("center/maxma", "client", "1842", "2222000000003", "hash-of-anna-at-center"),
    ):
        await ledger.remember_entity(connection, kind, klientiks_id, target_id, content_hash)


_TABLES = {
    "events": (EVENTS, ("id",)),
    "deliveries": (DELIVERIES, ("idempotency_key",)),
    "delivery_attempts": (ATTEMPTS, ("delivery_id", "number")),
    "delivery_steps": (STEPS, ("idempotency_key", "step")),
    "parked": (PARKED, ("idempotency_key",)),
    "entity_map": (ENTITIES, ("connection", "kind", "klientiks_id")),
    "ingest_dedupe": (DEDUPE, ("fingerprint",)),
    "ingest_spool": (SPOOL, ("record_id",)),
    "ingest_waiting": (WAITING, ("event_id",)),
}
Snapshot = dict[str, dict[Any, dict[str, Any]]]


async def snapshot(ledger: Ledger) -> Snapshot:
    """Every row of every table, by its key."""
    out: Snapshot = {}
    async with ledger.engine.connect() as conn:
        for name, (table, key) in _TABLES.items():
            rows = [r._asdict() for r in await conn.execute(select(table))]
            out[name] = {tuple(r[k] for k in key): r for r in rows}
    return out


def erased(before: Snapshot, after: Snapshot) -> Snapshot:
    """``before`` as the erasure of client 1842 of salon should leave it (the time it ran taken from ``after``)."""
    want = copy.deepcopy(before)
    for (event_id,), row in want["events"].items():
        if event_id in CLIENT_EVENTS:
            row.update(inbox=after["events"][(event_id,)]["inbox"], normalized=None, phone_hash=None)
    ids = {}
    for (key,), row in want["deliveries"].items():
        ids[row["id"]] = key
        if key in CLIENT_KEYS:
            row["error"] = row["error"] and ERASED
        if key == KEYS["c-order"]:
            row.update(status="failed", error=ERASED, next_attempt_at=None,
                       updated_at=after["deliveries"][(key,)]["updated_at"])  # fmt: skip
    for (delivery_id, _), row in want["delivery_attempts"].items():
        if ids[delivery_id] in CLIENT_KEYS:
            row["error"] = row["error"] and ERASED
    del want["parked"][(KEYS["c-order"],)]
    for key in (("salon/maxma", "client", "1842"), ("salon/weeek", "client", "1842")):
        want["entity_map"][key]["content_hash"] = None
    del want["entity_map"][("salon/weeek", "visit-title", "5001")]
    want["ingest_dedupe"] = {
        k: r for k, r in want["ingest_dedupe"].items() if r["event_id"] not in CLIENT_EVENTS
    }
    del want["ingest_spool"][("c-spool",)]
    del want["ingest_waiting"][("c-thin",)]
    return want


EXPECTED_TABLES = {  # (rows of the client, masked, deleted)
    "events": (6, 6, 0),
    "deliveries": (4, 2, 0),  # the maxma new-client's error; the parked set-order settled as failed
    "delivery_attempts": (4, 3, 0),
    "delivery_steps": (2, 0, 0),
    "parked": (1, 0, 1),
    "entity_map": (6, 2, 1),
    "ingest_dedupe": (4, 0, 4),  # c-created (c-repeat's first), c-paid, c-thin, c-nophone
    "ingest_spool": (1, 0, 1),
    "ingest_waiting": (1, 0, 1),
}


def counts(report: ErasureReport) -> dict[str, tuple[int, int, int]]:
    return {t.table: (t.matched, t.masked, t.deleted) for t in report.tables}


async def test_forget_by_client_id_erases_the_client_in_every_table_and_nothing_else(ledger: Ledger) -> None:
    ledger = keyed(ledger)
    await fill(ledger)
    before = await snapshot(ledger)
    assert before["events"][("c-bad",)]["client_id"] is None  # quarantined: found by its raw record only
    assert before["events"][("c-created",)]["phone_hash"] is not None

    plan = await ledger.forget_client(source="salon", client_id="1842", dry_run=True)
    assert await snapshot(ledger) == before
    assert plan.dry_run
    assert counts(plan) == EXPECTED_TABLES

    report = await ledger.forget_client(source="salon", client_id="1842")
    after = await snapshot(ledger)
    assert after == erased(before, after)
    assert counts(report) == EXPECTED_TABLES
    assert report.changes == 21
    assert report.client_ids == ("1842",)
    assert set(report.event_ids) == CLIENT_EVENTS | {"c-spool"}
    assert report.settled == (KEYS["c-order"],)
    assert report.in_flight == (KEYS["c-lead"],)
    assert report.newest_received == before["events"][("c-thin",)]["received_at"]
    for event_id in CLIENT_EVENTS:
        at = forgotten_at(after["events"][(event_id,)]["inbox"])
        assert at is not None
        assert abs(at - datetime.now(UTC)) < timedelta(minutes=1)
    # What arrived and how it was normalized are gone; the event, its key and its deliveries are still known.
    kept = str([after["events"][(i,)] for i in CLIENT_EVENTS])
    for personal in ("Иванова", "anna", "916", "Анна"):
        assert personal not in kept
    record = await ledger.event("c-repeat")
    assert record is not None
    assert (record.client_id, record.kafka_key, record.duplicate_of) == ("1842", "salon:1842", "c-created")
    delivered = await ledger.get(KEYS["c-deal"])
    assert delivered is not None
    assert (delivered.status.value, delivered.target_ref) == ("delivered", "deal-77")

    again = await ledger.forget_client(source="salon", client_id="1842")
    assert again.found
    assert again.changes == 0
    # Still found by client id, nothing left to mask; the quarantined one never had a client id in its row,
    # and its raw record is gone now.
    assert counts(again)["events"] == (5, 0, 0)
    assert await snapshot(ledger) == after


async def test_forget_by_phone_finds_what_the_client_id_finds(ledger: Ledger) -> None:
    ledger = keyed(ledger)
    await fill(ledger)
    before = await snapshot(ledger)
    by_id = await ledger.forget_client(source="salon", client_id="1842", dry_run=True)
    by_phone = await ledger.forget_client(source="salon", phone="8 (916) 123-45-67", dry_run=True)
    both = await ledger.forget_client(source="salon", client_id="1842", phone=E164, dry_run=True)
    assert by_phone == by_id == both
    assert await snapshot(ledger) == before

    report = await ledger.forget_client(source="salon", phone="+7 916 123-45-67")
    after = await snapshot(ledger)
    assert after == erased(before, after)
    assert counts(report) == EXPECTED_TABLES
    # The phone index is gone with the rest: the phone finds nothing more; the id finds only masked rows.
    assert not (await ledger.forget_client(source="salon", phone=E164)).found
    assert (await ledger.forget_client(source="salon", client_id="1842", phone=E164)).changes == 0
    assert await snapshot(ledger) == after


async def test_an_unknown_client_is_nothing_found(ledger: Ledger) -> None:
    await fill(keyed(ledger))
    before = await snapshot(ledger)
    report = await ledger.forget_client(source="salon", client_id="999")
    assert not report.found
    assert report.changes == 0
    assert report.event_ids == ()
    assert not (await ledger.forget_client(source="closed", client_id="1842")).found
    assert await snapshot(ledger) == before


async def test_a_phone_needs_the_index_key_and_a_valid_number(ledger: Ledger) -> None:
    with pytest.raises(PhoneSearchUnavailable):
        await ledger.forget_client(source="salon", phone=E164)
    with pytest.raises(ValueError, match="not a valid phone number of region RU"):
        await keyed(ledger).forget_client(source="salon", phone="12-34")
    with pytest.raises(ValueError, match="give the client's id or phone"):
        await ledger.forget_client(source="salon")


def test_client_match_reads_raw_records_as_the_normalizer_does() -> None:
    match = ClientMatch("salon", frozenset({"1842"}), E164, "RU")
    assert match.inbox_client(HISTORY["c-created"]) == ("1842", E164)
    assert match.inbox_client(HISTORY["c-bad"]) == ("1842", E164)  # the body is unreadable: the query stays
    assert match.inbox_client(SPOOLED["c-spool"]) == ("1842", E164)  # a form body
    assert match.inbox_client(HISTORY["x-created"]) is None  # another source
    assert match.inbox_client(b'{"forgotten": true}') is None
    assert match.inbox_client(webhook("e", "client_id=1842", body_b64="abc")) == ("1842", None)  # bad base64
    assert match.holds_inbox(webhook("e", "Client-ID=1842"))  # the key spelled as Klientiks may
    assert match.holds_inbox(webhook("e", "client_phone=8-916-123-45-67"))
    assert not match.holds_inbox(webhook("e", "client_id=18420&client_phone=79161234568"))
    assert match.holds_event_data(b'{"client": {"id": "1842"}}')
    assert match.holds_event_data(b'{"client": {"phone": "+79161234567"}}')
    for value in (b'{"client": {"id": "1843"}}', b'{"client": 1842}', b"[]", b"not json"):
        assert not match.holds_event_data(value)


# ------------------------------------------------------------------------------------------- on Kafka


def _event(event_id: str, source: str, data: EventData) -> CloudEvent:
    return CloudEvent(id=event_id, source=source_uri(source), type=EventName.CLIENT_CREATED.ce_type, time=NOW,
                      relayreceivedat=NOW, data=data)  # fmt: skip


async def publish(bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for name, target in (("c-created", "maxma"), ("o-created", "maxma"), ("x-created", "weeek")):
            out = route(HISTORY[name], b"k", SETTINGS)
            assert out.event is not None
            await _dead_letter(producer, out.event, target)
        # An event that names no client, found by its id (the ledger's), and one found by nothing.
        for event_id in ("c-appt", "o-appt"):
            await _dead_letter(producer, _event(event_id, "salon", EventData()), "plarin")
        for name in ("c-bad", "o-bad"):
            out = route(HISTORY[name], b"salon:18", SETTINGS)
            assert out.topic == QUARANTINE
            await producer.send_and_wait(QUARANTINE, out.value, key=out.key, headers=out.headers)
    finally:
        await producer.stop()


async def _dead_letter(producer: AIOKafkaProducer, event: CloudEvent, target: str) -> None:
    key = idempotency_key(target, target, "new", event.id)
    dlq = dead_letter_headers(Outcome.permanent("refused"), target=target, connection=target, action="new",
                              idempotency_key=key, attempts=1, first_attempt_at=NOW, last_attempt_at=NOW)  # fmt: skip
    headers = [*event.kafka_headers(), *((k, v.encode()) for k, v in dlq.items())]
    await producer.send_and_wait(dlq_topic(target), event.kafka_value(), key=b"k", headers=headers)


async def test_kafka_records_of_the_client_are_listed_and_no_others(kafka: KafkaSettings) -> None:
    bs = kafka.bootstrap_servers
    await ensure_topics(kafka)
    await publish(bs)
    by_id = ClientMatch("salon", frozenset({"1842"}), None, "RU")
    held = await client_records(bs, by_id, ["c-appt"], timeout=10)
    assert sorted((r.topic, r.event_id) for r in held) == [
        ("klientiks.quarantine.v1", "c-bad"),
        ("relay.maxma.dlq", "c-created"),
        ("relay.plarin.dlq", "c-appt"),
    ]
    for r in held:
        assert r.offset >= 0
        assert abs(r.timestamp - datetime.now(UTC)) < timedelta(minutes=5)
        assert r.retention_ends == r.timestamp + timedelta(days=30)
    assert {r.what for r in held} == {
        "quarantined: bad_body", "dead letter maxma salon/maxma new", "dead letter plarin salon/plarin new",
    }  # fmt: skip
    by_phone = await client_records(bs, ClientMatch("salon", frozenset(), E164, "RU"), [], timeout=10)
    assert sorted(r.event_id for r in by_phone) == ["c-bad", "c-created"]
    nobody = await client_records(bs, ClientMatch("salon", frozenset({"999"}), None, "RU"), [], timeout=10)
    assert nobody == []


def test_kafka_listing_of_a_topic_that_does_not_exist_yet_is_empty(broker: Any) -> None:
    match = ClientMatch("salon", frozenset({"1842"}))
    assert asyncio.run(client_records(broker.bootstrap_servers, match, ["c-created"], timeout=10)) == []
