"""`relay quarantine`: quarantined inbox records read, filtered, masked and replayed on a real Tansu broker."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from typer.testing import CliRunner

from services.cli import app
from services.common.config import KafkaSettings, Settings
from services.common.embedded import EmbeddedBroker
from services.common.events import CloudEvent
from services.common.kafka import DEFAULT_PARTITIONS, EVENTS, INBOX, QUARANTINE, ensure_topics
from services.common.ops import (
    QUARANTINE_REPLAY_HEADER,
    Quarantined,
    QuarantineFilter,
    distinct,
    quarantine_params,
    read_quarantine,
    replay_quarantine,
)
from services.ingest.inbox import InboxRecord
from services.ingest.normalizer import create_normalizer, route
from tests.support import read_all, serve_app

NOW = datetime.now(UTC).replace(microsecond=0)
PHONE = "79161234567"
SETTINGS = Settings.model_validate({"sources": [{"name": "salon", "token": "salon-token-0123456789abcdef"}]})


@dataclass(frozen=True)
class Q:
    """A record of the quarantine topic, as the normalizer writes it."""

    value: bytes
    key: bytes
    headers: list[tuple[str, bytes]]

    @property
    def reason(self) -> str:
        return dict(self.headers)["reason"].decode()


def inbox(event_id: str, received: datetime, *, source: str = "salon", event: str = "client-created",
          query: str = "", **fields: Any) -> bytes:  # fmt: skip
    fields.setdefault("method", "GET")
    return InboxRecord(
        id=event_id, source=source, event=event, received_at=received, query=query, **fields
    ).to_bytes()


def routed(value: bytes, key: bytes) -> Q:
    """What the normalizer's `route` sends to quarantine for this inbox record."""
    out = route(value, key, SETTINGS)
    assert out.topic == QUARANTINE
    return Q(out.value, out.key or b"", out.headers)


NOID = routed(
    inbox("q-noid", NOW - timedelta(days=3), query=f"client_phone={PHONE}&client_name=Иванова+Анна"), b"salon"
)
BODY = routed(
    inbox("q-body", NOW - timedelta(hours=2), event="appointment-created", method="POST",
          content_type="application/json", body='{"client_id": "102", "client_phone": "' + PHONE),
    b"salon:102",
)  # fmt: skip
GONE = routed(
    inbox("q-gone", NOW - timedelta(minutes=10), source="closed",
          query="client_id=103&client_email=anna.ivanova%40mail.ru"),
    b"closed:103",
)  # fmt: skip
# A later reason, written by hand as the normalizer will: a vendor message with personal data in it.
ENRICH = Q(
    inbox("q-enrich", NOW - timedelta(minutes=5), query=f"client_id=102&client_phone={PHONE}"),
    b"salon:102",
    [("reason", b"enrichment_failed"),
     ("detail", f"Klientiks API: client 102 (+{PHONE}, anna.ivanova@mail.ru) not found".encode())],
)  # fmt: skip
# Not an inbox record at all (no received_at): it is listed by the time it was quarantined.
BAD = routed(b'{"id": "q-bad", "source": "salon", "query": "client_phone=79991112233"}', b"salon:104")
# q-body again: replayed once before and quarantined again.
TOPIC = [NOID, BODY, GONE, ENRICH, BAD, BODY]


async def publish(bootstrap: str, records: list[Q] = TOPIC) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        # Sent together, so Tansu stores multi-record batches (its offsets are odd after those).
        sent = [await producer.send(QUARANTINE, q.value, key=q.key, headers=q.headers) for q in records]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def ids(records: list[Quarantined]) -> list[str]:
    return [q.event_id for q in records]


def _rec(q: Q, offset: int = 0, value: bytes | None = None) -> Any:
    return SimpleNamespace(
        topic=QUARANTINE, partition=0, offset=offset, key=q.key, value=q.value if value is None else value,
        headers=q.headers, timestamp=int(NOW.timestamp() * 1000),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- pure parts


def test_the_normalizers_records_are_what_the_tests_expect() -> None:
    assert [q.reason for q in TOPIC] == [
        "no_id", "bad_body", "unknown_source", "enrichment_failed", "bad_record", "bad_body",
    ]  # fmt: skip


def test_a_quarantined_record_is_parsed_from_the_inbox_record_and_headers() -> None:
    q = Quarantined.from_record(_rec(BODY, offset=7))
    assert (q.event_id, q.source, q.event, q.reason) == ("q-body", "salon", "appointment-created", "bad_body")
    assert q.received_at == NOW - timedelta(hours=2)
    assert "malformed" in q.detail
    assert (q.method, q.content_type, q.key, q.value, q.offset) == (
        "POST",
        "application/json",
        b"salon:102",
        BODY.value,
        7,
    )


def test_an_unreadable_record_is_still_listed() -> None:
    bad = Quarantined.from_record(_rec(BAD))
    assert (bad.event_id, bad.source, bad.event, bad.reason) == ("q-bad", "salon", "", "bad_record")
    assert bad.received_at == NOW  # the record's own time
    junk = Quarantined.from_record(_rec(BAD, value=b"\x00 not a record"))
    assert (junk.event_id, junk.source, junk.query, junk.value) == ("", "", "", b"\x00 not a record")
    cut = Quarantined.from_record(
        SimpleNamespace(**{**vars(_rec(BAD)), "headers": [("reason", b"bad_record"), ("detail", b"\xd0")]})
    )
    assert cut.detail == "\ufffd"


def test_filter_matches_each_field() -> None:
    qs = [Quarantined.from_record(_rec(q, offset=i)) for i, q in enumerate(TOPIC)]

    def only(**f: Any) -> list[str]:
        return ids([q for q in qs if QuarantineFilter(**f).matches(q)])

    assert only() == ids(qs)
    assert only(reasons=("NO_ID",)) == ["q-noid"]
    assert only(reasons=("no_id", "unknown_source")) == ["q-noid", "q-gone"]
    assert only(reasons=("bad",)) == []  # codes match exactly
    assert only(sources=("closed",)) == ["q-gone"]
    assert only(events=("appointment-created",)) == ["q-body", "q-body"]
    # since is inclusive, until exclusive; both on received_at.
    assert only(since=NOW - timedelta(hours=2)) == ["q-body", "q-gone", "q-enrich", "q-bad", "q-body"]
    assert only(until=NOW - timedelta(hours=2)) == ["q-noid"]
    assert only(since=NOW - timedelta(hours=1), until=NOW) == ["q-gone", "q-enrich"]
    assert only(event_id="q-enrich") == ["q-enrich"]
    assert only(sources=("salon",), reasons=("bad_body",)) == ["q-body", "q-body"]


def test_distinct_keeps_the_first_of_each_id() -> None:
    qs = [Quarantined.from_record(_rec(q, offset=i)) for i, q in enumerate(TOPIC)]
    kept = distinct(qs)
    assert ids(kept) == ["q-noid", "q-body", "q-gone", "q-enrich", "q-bad"]
    assert kept[1].offset == 1
    nameless = [Quarantined.from_record(_rec(BAD, offset=i, value=b"junk")) for i in range(2)]
    assert len(distinct(nameless)) == 1


def test_params_are_masked_whatever_the_body() -> None:
    assert quarantine_params(Quarantined.from_record(_rec(NOID))) == [
        ("client_phone", "7*******67"),
        ("client_name", "И*** А***"),
    ]
    assert quarantine_params(Quarantined.from_record(_rec(GONE))) == [
        ("client_id", "103"),
        ("client_email", "a***@mail.ru"),
    ]
    # A malformed JSON body is shown as text, masked by content.
    (body,) = quarantine_params(Quarantined.from_record(_rec(BODY)))
    assert body[0] == "(body)"
    assert PHONE not in body[1]
    assert "7*******67" in body[1]

    def params(**fields: Any) -> list[tuple[str, str]]:
        return quarantine_params(Quarantined.from_record(_rec(BODY, value=inbox("x", NOW, **fields))))

    assert params(query="token=abc&x=1", method="POST", content_type="application/json",
                  body='{"client_phone": "+79161234567", "n": 2}') == [
        ("token", "[secret]"), ("x", "1"), ("client_phone", "+7*******67"), ("n", "2"),
    ]  # fmt: skip
    assert params(body=f"client_phone={PHONE}") == [("client_phone", "7*******67")]
    assert params(body_b64="AP8=") == [("(body)", "<not UTF-8>")]


# ------------------------------------------------------------------------------------------- on Kafka


async def test_read_quarantine_of_a_missing_topic_is_empty(broker: EmbeddedBroker) -> None:
    assert await read_quarantine(broker.bootstrap_servers, timeout=10) == []


async def test_read_quarantine_reads_to_the_end_and_filters(kafka: KafkaSettings) -> None:
    bs = kafka.bootstrap_servers
    assert await read_quarantine(bs, timeout=10) == []
    await publish(bs)
    everything = await read_quarantine(bs, timeout=10)
    assert ids(everything) == ["q-noid", "q-body", "q-gone", "q-enrich", "q-bad", "q-body"]
    assert [q.value for q in everything] == [q.value for q in TOPIC]
    assert [q.key for q in everything] == [q.key for q in TOPIC]

    async def only(**f: Any) -> list[str]:
        return ids(await read_quarantine(bs, QuarantineFilter(**f), timeout=10))

    assert await only(reasons=("unknown_source",)) == ["q-gone"]
    assert await only(sources=("salon",), since=NOW - timedelta(hours=1)) == ["q-enrich", "q-bad"]
    assert await only(until=NOW - timedelta(hours=1)) == ["q-noid", "q-body", "q-body"]
    assert await only(events=("appointment-created",), event_id="q-body") == ["q-body", "q-body"]
    assert await only(event_id="q-nothing") == []


async def _replayed(bs: str, expect: int) -> list[Any]:
    # One more than expected: the read waits its whole timeout, so a surplus record would show.
    return await read_all(bs, INBOX, expect=expect + 1, timeout=1.5)


async def test_replay_puts_exactly_the_chosen_records_back_on_the_inbox(kafka: KafkaSettings) -> None:
    bs = kafka.bootstrap_servers
    await publish(bs)
    chosen = await read_quarantine(
        bs, QuarantineFilter(sources=("salon",), since=NOW - timedelta(days=1)), timeout=10
    )
    assert ids(chosen) == ["q-body", "q-enrich", "q-bad", "q-body"]
    progress: list[int] = []
    assert await replay_quarantine(bs, chosen, on_progress=progress.append) == 3
    assert progress[-1] == 3

    records = await _replayed(bs, expect=3)
    assert len(records) == 3  # q-body once, though it was chosen twice
    by_value = {q.value: q for q in (BODY, ENRICH, BAD)}
    partitioner = DefaultPartitioner()
    partitions = list(range(DEFAULT_PARTITIONS[INBOX]))
    for rec in records:
        original = by_value[rec.value]  # the value unchanged
        assert rec.key == original.key
        assert list(rec.headers) == [QUARANTINE_REPLAY_HEADER]
        # Where the ingest API's producer put it in the first place.
        assert rec.partition == partitioner(rec.key, partitions, partitions)
    same_key = sorted((r for r in records if r.key == b"salon:102"), key=lambda r: r.offset)
    assert [InboxRecord.from_bytes(r.value).id for r in same_key] == ["q-body", "q-enrich"]


async def test_a_replayed_record_is_normalized_once_the_config_is_fixed(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    bs = kafka.bootstrap_servers
    await publish(bs, [NOID, GONE])
    # The fix: the source that was missing is configured now.
    settings = Settings.model_validate({
        "kafka": kafka.model_dump(), "database_url": f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
        "sources": [{"name": n, "token": f"{n}-token-0123456789abcdef"} for n in ("salon", "closed")],
    })  # fmt: skip
    gone = await read_quarantine(bs, QuarantineFilter(reasons=("unknown_source",)), timeout=10)
    assert await replay_quarantine(bs, gone) == 1
    async with serve_app(create_normalizer(settings, migrate=True)):
        (rec,) = await read_all(bs, EVENTS, expect=1, timeout=20)
    event = CloudEvent.from_kafka(list(rec.headers), rec.value)
    assert (event.id, event.source_name, rec.key) == ("q-gone", "closed", b"closed:103")


async def test_replay_of_nothing_publishes_nothing(kafka: KafkaSettings) -> None:
    bs = kafka.bootstrap_servers
    await publish(bs)
    none = await read_quarantine(bs, QuarantineFilter(reasons=("no_such_reason",)), timeout=10)
    assert none == []
    assert await replay_quarantine(bs, none) == 0
    assert await read_all(bs, INBOX, expect=1, timeout=1) == []


# ------------------------------------------------------------------------------------------- the CLI

runner = CliRunner()


@pytest.fixture
def quarantine_env(broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> str:
    """Quarantined records on a fresh broker, and a `relay` environment with only the bootstrap servers."""
    bs = broker.bootstrap_servers

    async def prepare() -> None:
        await ensure_topics(KafkaSettings(bootstrap_servers=bs, enable_idempotence=False))
        await publish(bs)

    asyncio.run(prepare())
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", bs)
    monkeypatch.setenv("COLUMNS", "250")
    return bs


def _inbox(bs: str, expect: int) -> list[Any]:
    return asyncio.run(_replayed(bs, expect))


PERSONAL = (PHONE, "79991112233", "Иванова", "Анна", "anna.ivanova")


def test_cli_quarantine_list_shows_masked_records(quarantine_env: str) -> None:
    result = runner.invoke(app, ["quarantine", "list", "--params"])
    assert result.exit_code == 0, result.output
    out = result.output
    for secret in PERSONAL:
        assert secret not in out
    for event_id in ("q-noid", "q-body", "q-gone", "q-enrich", "q-bad"):
        assert event_id in out
    assert "(+7*******67, a***@mail.ru) not found" in out
    assert "client_phone=7*******67" in out
    assert "client_name=И*** А***" in out
    assert "client_email=a***@mail.ru" in out
    assert "6 quarantined record(s) match (bad_body 2, bad_record 1, enrichment_failed 1, no_id 1, " in out
    # Newest first.
    assert out.index("q-enrich") < out.index("q-gone") < out.index("q-noid")

    result = runner.invoke(app, ["quarantine", "list"])
    assert result.exit_code == 0, result.output
    assert "client_phone" not in result.output
    for secret in PERSONAL:
        assert secret not in result.output


def test_cli_quarantine_list_filters(quarantine_env: str) -> None:
    def listed(*args: str) -> str:
        result = runner.invoke(app, ["quarantine", "list", *args])
        assert result.exit_code == 0, result.output
        return result.output

    out = listed("--reason", "no_id", "--reason", "unknown_source")
    assert ("q-noid" in out, "q-gone" in out, "q-body" in out) == (True, True, False)
    out = listed("--source", "closed")
    assert ("q-gone" in out, "q-noid" in out) == (True, False)
    out = listed("--event", "appointment-created")
    assert "2 quarantined record(s) match (bad_body 2)" in out
    out = listed("--since", "1d", "--until", (NOW - timedelta(minutes=7)).isoformat())
    assert ("q-body" in out, "q-gone" in out, "q-noid" in out, "q-enrich" in out) == (
        True,
        True,
        False,
        False,
    )
    out = listed("--event-id", "q-enrich")
    assert "1 quarantined record(s) match (enrichment_failed 1)" in out
    out = listed("--since", "1d", "--limit", "1")
    assert "5 quarantined record(s) match" in out
    assert "showing the newest 1" in out
    assert "no quarantined records match" in listed("--reason", "no_such_reason")

    result = runner.invoke(app, ["quarantine", "list", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "neither a duration" in result.output


def test_cli_quarantine_replay_yes_publishes_the_matching_ones(quarantine_env: str) -> None:
    result = runner.invoke(app, ["quarantine", "replay", "--source", "salon", "--since", "1d", "--yes"])
    assert result.exit_code == 0, result.output
    assert "3 quarantined record(s) match (bad_body 1, bad_record 1, enrichment_failed 1); " in result.output
    assert "1 repeated id(s) counted once" in result.output
    assert f"replayed 3 record(s) to {INBOX}" in result.output
    records = _inbox(quarantine_env, expect=3)
    assert sorted(r.value for r in records) == sorted([BODY.value, ENRICH.value, BAD.value])
    assert all(list(r.headers) == [QUARANTINE_REPLAY_HEADER] for r in records)


def test_cli_quarantine_replay_dry_run_no_match_and_a_refusal_publish_nothing(quarantine_env: str) -> None:
    result = runner.invoke(app, ["quarantine", "replay", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert f"dry run: 5 would be replayed to {INBOX}; nothing was published" in result.output
    assert "q-noid" in result.output
    for secret in PERSONAL:
        assert secret not in result.output
    result = runner.invoke(app, ["quarantine", "replay", "--reason", "no_such_reason", "--yes"])
    assert result.exit_code == 0, result.output
    assert "no quarantined records match; nothing to replay" in result.output
    result = runner.invoke(app, ["quarantine", "replay", "--event-id", "q-gone"], input="n\n")
    assert result.exit_code == 1
    assert f"Replay 1 record(s) to {INBOX}?" in result.output
    assert _inbox(quarantine_env, expect=0) == []


def test_cli_quarantine_without_a_broker_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.embedded import free_port

    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    result = runner.invoke(app, ["quarantine", "list", "--timeout", "2"])
    assert result.exit_code == 1
    assert f"cannot read {QUARANTINE}" in result.output
