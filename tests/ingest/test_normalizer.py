"""The normalizer on a real broker: inbox records become CloudEvents; bad ones go to quarantine."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer

from services.common.config import KafkaSettings, Settings
from services.common.events import CloudEvent, header
from services.common.kafka import EVENTS, INBOX, QUARANTINE
from services.common.ledger import Ledger
from services.ingest.inbox import InboxRecord
from services.ingest.normalizer import create_normalizer
from tests.support import PHONE_KEY, read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"


def _record(event_id: str, query: str, source: str = "salon", event: str = "client-created") -> InboxRecord:
    return InboxRecord(
        id=event_id, source=source, event=event, received_at=datetime.now(UTC), method="GET", query=query
    )


async def test_records_become_events_and_bad_ones_are_quarantined(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    settings = Settings.model_validate(
        {
            "kafka": kafka.model_dump(),
            "database_url": db_url,
            "phone_hash_key": PHONE_KEY,
            "sources": [{"name": "salon", "token": TOKEN}],
        }
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, acks="all")
    await producer.start()
    try:
        good = _record("e-good", "client_id=42&client_phone=8%20(916)%20123-45-67&client_name={{name}}")
        await producer.send_and_wait(INBOX, good.to_bytes(), key=b"salon:42")
        await producer.send_and_wait(
            INBOX, _record("e-noid", "client_phone=79161234567").to_bytes(), key=b"salon"
        )
        await producer.send_and_wait(INBOX, _record("e-gone", "client_id=1", source="closed").to_bytes())
        await producer.send_and_wait(INBOX, b"\x00 not a record")
    finally:
        await producer.stop()

    async with serve_app(create_normalizer(settings, migrate=True)):
        events = await read_all(kafka.bootstrap_servers, EVENTS, expect=1, timeout=20)
        quarantined = await read_all(kafka.bootstrap_servers, QUARANTINE, expect=3, timeout=20)

    (rec,) = events
    assert rec.key == b"salon:42"
    event = CloudEvent.from_kafka(rec.headers, rec.value)
    assert (event.id, event.type, event.source) == (
        "e-good",
        "ru.klientiks.client.created",
        "/klientiks/salon",
    )
    assert event.data.client is not None
    assert event.data.client.phone == "+79161234567"
    assert event.data.client.full_name is None  # "{{name}}" was a leftover placeholder, not a name
    assert event.data.missing == ["client_name"]
    reasons = sorted(header(list(r.headers), "reason") or "" for r in quarantined)
    assert reasons == ["bad_record", "no_id", "unknown_source"]
    # Quarantine keeps the raw record byte for byte, so it can be replayed after a fix.
    assert b"\x00 not a record" in [r.value for r in quarantined]

    # The history keeps what arrived and what it became, findable by id, client id and phone.
    ledger = Ledger.from_url(db_url, phone_key=settings.phone_hash_key)
    try:
        kept = await ledger.event("e-good")
        assert kept is not None
        assert kept.kafka_key == "salon:42"
        assert InboxRecord.from_bytes(kept.inbox.encode()) == good
        assert kept.normalized is not None
        assert CloudEvent.model_validate_json(kept.normalized) == event
        assert [e.id for e in await ledger.find_events(phone="+79161234567")] == ["e-good"]
        assert [e.id for e in await ledger.find_events(client_id="42")] == ["e-good"]
        noid = await ledger.event("e-noid")
        assert noid is not None
        assert noid.quarantine_reason == "no_id"
        assert noid.normalized is None
    finally:
        await ledger.close()
