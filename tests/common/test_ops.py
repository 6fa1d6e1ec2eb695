"""Operator tooling: dead letters read and replayed on a real Tansu broker, `relay dlq` and `relay events`."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from typer.testing import CliRunner

from services.cli import app
from services.common.config import KafkaSettings
from services.common.delivery.runtime import REPLAY_ACTION, REPLAY_CONNECTION, REPLAY_TARGET
from services.common.dlq import PREFIX, dead_letter_headers
from services.common.embedded import EmbeddedBroker
from services.common.events import Client, CloudEvent, EventData, EventName, kafka_key, source_uri
from services.common.kafka import EVENTS, dlq_topic, ensure_topics
from services.common.ledger import Ledger, idempotency_key, upgrade
from services.common.ops import (
    DeadLetter,
    DlqFilter,
    mask_data,
    mask_pairs,
    mask_text,
    parse_when,
    read_dlq,
    replay,
    replay_headers,
)
from services.common.outcome import Outcome
from services.ingest.inbox import InboxRecord
from tests.support import PHONE_KEY, read_all

NOW = datetime.now(UTC).replace(microsecond=0)
PHONE = "+79161234567"


def event(event_id: str, client_id: str, phone: str | None = PHONE, source: str = "salon") -> CloudEvent:
    t = NOW - timedelta(hours=3)
    return CloudEvent(
        id=event_id, source=source_uri(source), type=EventName.CLIENT_CREATED.ce_type, time=t,
        relayreceivedat=t, subject=f"client/{client_id}",
        data=EventData(client=Client(id=client_id, full_name="Иванова Анна", phone=phone,
                                     email="anna.ivanova@mail.ru")),
    )  # fmt: skip


@dataclass(frozen=True)
class Letter:
    event: CloudEvent
    target: str
    connection: str
    action: str
    outcome: Outcome
    last: datetime

    @property
    def key(self) -> bytes:
        client = self.event.data.client
        return kafka_key(self.event.source_name, client.id if client else None, None).encode()

    def headers(self) -> list[tuple[str, bytes]]:
        """As the delivery runtime writes them: the event's headers, then the relay-dlq-* ones."""
        dlq = dead_letter_headers(
            self.outcome, target=self.target, connection=self.connection, action=self.action,
            idempotency_key=idempotency_key(self.target, self.connection, self.action, self.event.id),
            attempts=8, first_attempt_at=self.last - timedelta(hours=30), last_attempt_at=self.last,
        )  # fmt: skip
        return [*self.event.kafka_headers(), *((k, v.encode()) for k, v in dlq.items())]


LETTERS = [
    Letter(event("evt-old", "101"), "maxma", "maxma", "new-client",
           Outcome.permanent("Maxma: client +79161234567 is blocked", http_status=400, vendor_code="11"),
           NOW - timedelta(days=3)),
    Letter(event("evt-503", "102"), "maxma", "maxma-spb", "new-client",
           Outcome.retryable("HTTP 503 Service Unavailable", http_status=503), NOW - timedelta(hours=2)),
    Letter(event("evt-timeout", "103"), "maxma", "maxma", "new-client",
           Outcome.retryable("timeout after 10 s"), NOW - timedelta(minutes=10)),
    Letter(event("evt-weeek", "101", source="center"), "weeek", "weeek", "new-deal",
           Outcome.permanent("Weeek: Board Not Found", http_status=404, vendor_code="board_not_found"),
           NOW - timedelta(minutes=5)),
]  # fmt: skip


async def publish_letters(bootstrap: str, letters: list[Letter] = LETTERS) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        # Sent together, so Tansu stores multi-record batches (its offsets are odd after those).
        sent = [
            await producer.send(dlq_topic(x.target), x.event.kafka_value(), key=x.key, headers=x.headers())
            for x in letters
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def ids(dead_letters: list[DeadLetter]) -> list[str]:
    return [d.event_id for d in dead_letters]


# ------------------------------------------------------------------------------------------- pure parts


def test_parse_when_takes_ages_and_iso_times() -> None:
    now = datetime(2024, 3, 14, 12, 0, tzinfo=UTC)
    assert parse_when("30m", now) == now - timedelta(minutes=30)
    assert parse_when("1h", now) == now - timedelta(hours=1)
    assert parse_when("2d", now) == now - timedelta(days=2)
    assert parse_when("2024-03-14T09:00:00+03:00") == datetime(2024, 3, 14, 6, 0, tzinfo=UTC)
    assert parse_when("2024-03-14T09:00:00Z") == datetime(2024, 3, 14, 9, 0, tzinfo=UTC)
    assert parse_when("2024-03-14 09:00") == datetime(2024, 3, 14, 9, 0, tzinfo=UTC)  # no offset: UTC
    with pytest.raises(ValueError, match="neither a duration"):
        parse_when("yesterday")


def _record(letter: Letter, offset: int = 0, headers: list[tuple[str, bytes]] | None = None) -> Any:
    return SimpleNamespace(
        topic=dlq_topic(letter.target), partition=0, offset=offset, key=letter.key,
        value=letter.event.kafka_value(), headers=letter.headers() if headers is None else headers,
        timestamp=int(NOW.timestamp() * 1000),
    )  # fmt: skip


def test_dead_letter_is_parsed_from_the_runtime_headers() -> None:
    dl = DeadLetter.from_record(_record(LETTERS[0], offset=7))
    assert (dl.target, dl.connection, dl.conn_id, dl.action) == (
        "maxma",
        "maxma",
        "salon/maxma",
        "new-client",
    )
    assert (dl.event_id, dl.source, dl.class_) == ("evt-old", "salon", "permanent")
    assert (dl.http_status, dl.vendor_code, dl.attempts) == (400, "11", 8)
    assert dl.last_attempt_at == NOW - timedelta(days=3)
    assert dl.first_attempt_at == dl.last_attempt_at - timedelta(hours=30)
    assert dl.idempotency_key == "maxma:maxma:new-client:evt-old"
    assert (dl.key, dl.offset, dl.timestamp) == (b"salon:101", 7, NOW)


def test_a_dead_letter_without_its_headers_is_still_listed() -> None:
    dl = DeadLetter.from_record(_record(LETTERS[1], headers=[]))
    assert (dl.target, dl.event_id, dl.attempts, dl.http_status) == ("maxma", "", 0, None)
    assert dl.last_attempt_at == dl.first_attempt_at == NOW  # the record's own time


def test_filter_matches_each_field() -> None:
    dls = [DeadLetter.from_record(_record(x)) for x in LETTERS]
    assert ids([d for d in dls if DlqFilter().matches(d)]) == ids(dls)
    assert ids([d for d in dls if DlqFilter(targets=("weeek",)).matches(d)]) == ["evt-weeek"]
    # since is inclusive, until exclusive.
    since = DlqFilter(since=NOW - timedelta(hours=2))
    assert ids([d for d in dls if since.matches(d)]) == ["evt-503", "evt-timeout", "evt-weeek"]
    until = DlqFilter(until=NOW - timedelta(hours=2))
    assert ids([d for d in dls if until.matches(d)]) == ["evt-old"]
    assert ids([d for d in dls if DlqFilter(reason="NOT FOUND").matches(d)]) == ["evt-weeek"]
    assert ids([d for d in dls if DlqFilter(event_id="evt-503").matches(d)]) == ["evt-503"]


def test_replay_headers_keep_the_event_and_aim_at_one_delivery() -> None:
    letter = LETTERS[1]
    stale = [(REPLAY_TARGET, b"weeek"), (REPLAY_CONNECTION, b"x/y"), (REPLAY_ACTION, b"z")]
    dl = DeadLetter.from_record(_record(letter, headers=[*letter.headers(), *stale]))
    headers = replay_headers(dl)
    assert [h for h in headers if not h[0].startswith("relay-")] == letter.event.kafka_headers()
    assert not [k for k, _ in headers if k.startswith(PREFIX)]
    assert [h for h in headers if h[0].startswith("relay-replay-")] == [
        (REPLAY_TARGET, b"maxma"),
        (REPLAY_CONNECTION, b"salon/maxma-spb"),
        (REPLAY_ACTION, b"new-client"),
    ]


def test_masking_helpers_hide_personal_data() -> None:
    assert mask_text("client +79161234567 (anna.ivanova@mail.ru) exists") == (
        "client +7*******67 (a***@mail.ru) exists"
    )
    assert mask_pairs([("client_phone", "79161234567"), ("client_name", "Иванова Анна"), ("x", "1")]) == [
        ("client_phone", "7*******67"),
        ("client_name", "И*** А***"),
        ("x", "1"),
    ]
    data = mask_data(json.loads(LETTERS[0].event.model_dump_json()))
    assert data["data"]["client"] == {
        "id": "101", "full_name": "И*** А***", "first_name": None, "last_name": None, "patronymic": None,
        "phone": "+7*******67", "email": "a***@mail.ru", "deleted": None,
    }  # fmt: skip


# ------------------------------------------------------------------------------------------- on Kafka


async def test_read_dlq_reads_every_topic_to_its_end_and_filters(kafka: KafkaSettings) -> None:
    bs = kafka.bootstrap_servers
    assert await read_dlq(bs, ["maxma", "weeek"], timeout=10) == []
    await publish_letters(bs)
    everything = await read_dlq(bs, ["maxma", "weeek", "plarin"], timeout=10)
    assert ids(everything) == ["evt-old", "evt-503", "evt-timeout", "evt-weeek"]
    assert everything[1].conn_id == "salon/maxma-spb"
    assert everything[3].conn_id == "center/weeek"
    assert everything[3].key == b"center:101"

    async def only(**f: Any) -> list[str]:
        return ids(await read_dlq(bs, f.pop("targets", ["maxma", "weeek"]), DlqFilter(**f), timeout=10))

    assert await only(targets=["weeek"]) == ["evt-weeek"]
    assert await only(targets=["maxma"], since=NOW - timedelta(hours=1)) == ["evt-timeout"]
    assert await only(until=NOW - timedelta(hours=1)) == ["evt-old", "evt-503"]
    assert await only(event_id="evt-503") == ["evt-503"]
    assert await only(reason="service UNAVAILABLE") == ["evt-503"]
    assert await only(targets=["nosuchtarget"]) == []


async def test_replay_publishes_exactly_the_chosen_events_to_their_delivery(kafka: KafkaSettings) -> None:
    bs = kafka.bootstrap_servers
    await publish_letters(bs)
    chosen = await read_dlq(bs, ["maxma", "weeek"], DlqFilter(since=NOW - timedelta(hours=3)), timeout=10)
    assert ids(chosen) == ["evt-503", "evt-timeout", "evt-weeek"]
    progress: list[int] = []
    assert await replay(bs, chosen, on_progress=progress.append) == 3
    assert progress[-1] == 3
    records = await read_all(bs, EVENTS, expect=4, timeout=1)
    assert len(records) == 3
    by_id = {x.event.id: x for x in LETTERS}
    for rec in records:
        headers = list(rec.headers)
        ev = CloudEvent.from_kafka(headers, rec.value)
        letter = by_id[ev.id]
        assert ev == letter.event
        assert rec.key == letter.key
        assert [h for h in headers if h[0].startswith("ce_") or h[0] == "content-type"] == (
            letter.event.kafka_headers()
        )
        assert not [k for k, _ in headers if k.startswith(PREFIX)]
        assert dict(headers)[REPLAY_TARGET] == letter.target.encode()
        assert dict(headers)[REPLAY_CONNECTION] == f"{ev.source_name}/{letter.connection}".encode()
        assert dict(headers)[REPLAY_ACTION] == letter.action.encode()
    assert sorted(ev_id for ev_id in by_id if ev_id != "evt-old") == sorted(
        CloudEvent.from_kafka(list(r.headers), r.value).id for r in records
    )


# ------------------------------------------------------------------------------------------- the CLI

runner = CliRunner()


@pytest.fixture
def dlq_env(broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> str:
    """Dead letters on a fresh broker, and a `relay` environment with only the bootstrap servers."""
    bs = broker.bootstrap_servers

    async def prepare() -> None:
        await ensure_topics(KafkaSettings(bootstrap_servers=bs, enable_idempotence=False))
        await publish_letters(bs)

    asyncio.run(prepare())
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", bs)
    monkeypatch.setenv("COLUMNS", "250")
    return bs


def _events_topic(bs: str, expect: int, timeout: float = 3.0) -> list[Any]:
    return asyncio.run(read_all(bs, EVENTS, expect=expect, timeout=timeout))


def test_cli_dlq_list_shows_filtered_dead_letters_with_masked_reasons(dlq_env: str) -> None:
    result = runner.invoke(app, ["dlq", "list"])
    assert result.exit_code == 0, result.output
    for x in LETTERS:
        assert x.event.id in result.output
    assert "center/weeek" in result.output
    assert "board_not_found" in result.output
    assert "79161234567" not in result.output
    assert "client +7*******67 is blocked" in result.output
    assert "4 dead letter(s) match (maxma 3, weeek 1)" in result.output

    result = runner.invoke(app, ["dlq", "list", "--target", "maxma", "--since", "1d", "--limit", "1"])
    assert result.exit_code == 0, result.output
    assert "evt-timeout" in result.output
    assert "evt-503" not in result.output
    assert "evt-old" not in result.output
    assert "2 dead letter(s) match (maxma 2), showing the newest 1" in result.output

    result = runner.invoke(app, ["dlq", "list", "--reason", "TIMEOUT", "--until", NOW.isoformat()])
    assert result.exit_code == 0, result.output
    assert "evt-timeout" in result.output
    assert "evt-weeek" not in result.output


def test_cli_dlq_rejects_bad_filters(dlq_env: str) -> None:
    result = runner.invoke(app, ["dlq", "list", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "neither a duration" in result.output
    result = runner.invoke(app, ["dlq", "list", "--target", "amocrm"])
    assert result.exit_code == 2
    assert "unknown target amocrm" in result.output


def test_cli_dlq_replay_yes_publishes_the_matching_ones(dlq_env: str) -> None:
    result = runner.invoke(app, ["dlq", "replay", "--target", "maxma", "--since", "1d", "--yes"])
    assert result.exit_code == 0, result.output
    assert "replayed 2 dead letter(s) to klientiks.events.v1 (maxma 2)" in result.output
    records = _events_topic(dlq_env, expect=3, timeout=1.0)
    assert sorted(CloudEvent.from_kafka(list(r.headers), r.value).id for r in records) == [
        "evt-503",
        "evt-timeout",
    ]
    assert all(dict(r.headers)[REPLAY_TARGET] == b"maxma" for r in records)


def test_cli_dlq_replay_dry_run_and_a_refusal_publish_nothing(dlq_env: str) -> None:
    result = runner.invoke(app, ["dlq", "replay", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run: 4 would be replayed" in result.output
    assert "evt-weeek" in result.output
    result = runner.invoke(app, ["dlq", "replay", "--event-id", "evt-503"], input="n\n")
    assert result.exit_code == 1
    assert "1 dead letter(s) match (maxma 1)" in result.output
    assert "Replay 1 dead letter(s) to klientiks.events.v1?" in result.output
    assert _events_topic(dlq_env, expect=1, timeout=1.0) == []


def test_cli_dlq_without_a_broker_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.common.embedded import free_port

    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    result = runner.invoke(app, ["dlq", "list", "--timeout", "2"])
    assert result.exit_code == 1
    assert "cannot read the DLQ topics" in result.output


# events show / find, on SQLite and PostgreSQL


SHOWN = event("evt-shown", "1842")
OTHER = event("evt-other", "1843", phone="+79995554433")


async def _fill_ledger(url: str) -> None:
    ledger = Ledger.from_url(url, phone_key=SecretStr(PHONE_KEY))
    try:
        await upgrade(ledger.engine)
        for ev, query in (
            (SHOWN, "client_id=1842&client_phone=8+(916)+123-45-67&client_name=Иванова+Анна"
                    "&client_email=anna.ivanova%40mail.ru"),
            (OTHER, "client_id=1843&client_phone=79995554433"),
        ):  # fmt: skip
            inbox = InboxRecord(
                id=ev.id, source="salon", event="client-created", received_at=ev.relayreceivedat,
                method="GET", query=query,
            )  # fmt: skip
            client = ev.data.client
            assert client is not None
            await ledger.add_event(
                id=ev.id, source="salon", event="client-created", received_at=ev.relayreceivedat,
                client_id=client.id, phone=client.phone, kafka_key=f"salon:{client.id}",
                inbox=inbox.to_bytes().decode(), normalized=ev.model_dump_json(), quarantine_reason=None,
            )  # fmt: skip
        key = idempotency_key("maxma", "maxma", "new-client", SHOWN.id)
        await ledger.begin(key, event_id=SHOWN.id, source="salon", connection="maxma", target="maxma",
                           action="new-client")  # fmt: skip
        t0 = NOW - timedelta(minutes=5)
        await ledger.record(key, Outcome.retryable("HTTP 503", http_status=503, vendor_code="E42"),
                            started_at=t0, duration_s=0.25)  # fmt: skip
        await ledger.record(key, Outcome.success(http_status=200, target_ref="2222000000001"),
                            started_at=t0 + timedelta(seconds=5), duration_s=0.012)  # fmt: skip
        key2 = idempotency_key("weeek", "weeek", "new-deal", SHOWN.id)
        await ledger.begin(key2, event_id=SHOWN.id, source="salon", connection="weeek", target="weeek",
                           action="new-deal")  # fmt: skip
        await ledger.record(key2, Outcome.permanent("contact anna.ivanova@mail.ru +79161234567 is taken"),
                            started_at=t0, duration_s=0.1, final=True)  # fmt: skip
    finally:
        await ledger.close()


@pytest.fixture
def ledger_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    asyncio.run(_fill_ledger(db_url))
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_DATABASE_URL", db_url)
    monkeypatch.setenv("RELAY_PHONE_HASH_KEY", PHONE_KEY)
    monkeypatch.setenv("COLUMNS", "250")
    return db_url


def test_cli_events_show_masks_personal_data_and_lists_every_attempt(ledger_env: str) -> None:
    result = runner.invoke(app, ["events", "show", SHOWN.id])
    assert result.exit_code == 0, result.output
    out = result.output
    for secret in ("9161234567", "916) 123-45-67", "Иванова", "Анна", "anna.ivanova"):
        assert secret not in out
    assert "+7*******67" in out
    assert "8*******67" in out
    assert "a***@mail.ru" in out
    assert "И*** А***" in out
    assert "client_phone" in out
    assert "GET" in out
    assert '"type": "ru.klientiks.client.created"' in out
    # Both deliveries, every attempt.
    assert "maxma salon/maxma new-client: delivered" in out
    assert "weeek salon/weeek new-deal: failed" in out
    assert "retryable" in out
    assert "503" in out
    assert "E42" in out
    assert "250.0" in out
    assert "success" in out
    assert "200" in out
    assert "2222000000001" in out
    assert "permanent" in out
    assert "contact a***@mail.ru +7*******67 is taken" in out


def test_cli_events_show_of_an_unknown_id_exits_1(ledger_env: str) -> None:
    result = runner.invoke(app, ["events", "show", "no-such-event"])
    assert result.exit_code == 1
    assert "no event 'no-such-event' in the ledger" in result.output


def test_cli_events_find_by_phone_in_any_spelling_and_by_client_id(ledger_env: str) -> None:
    result = runner.invoke(app, ["events", "find", "--phone", "8 (916) 123-45-67"])
    assert result.exit_code == 0, result.output
    assert SHOWN.id in result.output
    assert OTHER.id not in result.output
    assert "maxma/new-client delivered" in result.output
    assert "weeek/new-deal failed" in result.output
    result = runner.invoke(app, ["events", "find", "--client-id", "1843", "--source", "salon"])
    assert result.exit_code == 0, result.output
    assert OTHER.id in result.output
    assert SHOWN.id not in result.output
    result = runner.invoke(app, ["events", "find", "--phone", "+7 999 000-00-00", "--source", "elsewhere"])
    assert result.exit_code == 0
    assert "no events found" in result.output
    result = runner.invoke(app, ["events", "find", "--phone", "12"])
    assert result.exit_code == 2
    assert "not a valid phone number" in result.output
    result = runner.invoke(app, ["events", "find"])
    assert result.exit_code == 2
    assert "give --phone or --client-id" in result.output


def test_cli_events_find_by_phone_without_the_key_says_what_to_set(
    ledger_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_PHONE_HASH_KEY")
    result = runner.invoke(app, ["events", "find", "--phone", "8 (916) 123-45-67"])
    assert result.exit_code == 2
    assert "phone search needs the phone index key" in result.output
    assert "phone_hash_key" in result.output
    # Another key finds nothing: the index is an HMAC, not a digest anyone can recompute.
    monkeypatch.setenv("RELAY_PHONE_HASH_KEY", "another-phone-index-key-0123456789")
    result = runner.invoke(app, ["events", "find", "--phone", "8 (916) 123-45-67"])
    assert result.exit_code == 0, result.output
    assert "no events found" in result.output


def test_cli_events_without_a_ledger_does_not_create_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'none.db'}")
    result = runner.invoke(app, ["events", "show", "x"])
    assert result.exit_code == 2
    assert "the SQLite file does not exist" in result.output
    assert not (tmp_path / "none.db").exists()


def test_dlq_list_shows_the_vendors_hint_and_an_opened_circuit() -> None:
    from types import SimpleNamespace

    from rich.console import Console

    from services.cli.dlq import _table
    from services.common.dlq import dead_letter_headers
    from services.common.ops import DeadLetter
    from services.common.outcome import Outcome

    outcome = Outcome.permanent("Maxma 5: Магазин не найден", vendor_code="5", hint="check shop_code",
                                opens_circuit=True)  # fmt: skip
    headers = dead_letter_headers(outcome, target="maxma", connection="maxma", action="set-order",
                                  idempotency_key="k", attempts=1, first_attempt_at=NOW, last_attempt_at=NOW)  # fmt: skip
    rec = SimpleNamespace(
        headers=[(k, v.encode()) for k, v in headers.items()], timestamp=int(NOW.timestamp() * 1000),
        topic="relay.maxma.dlq", key=b"salon:1", value=b"{}", partition=0, offset=0,
    )  # fmt: skip
    dl = DeadLetter.from_record(rec)
    assert (dl.hint, dl.opened_circuit) == ("check shop_code", True)
    console = Console(width=400, record=True)
    console.print(_table([dl]))
    shown = console.export_text()
    assert "(hint: check shop_code)" in shown
    assert "circuit opened" in shown


# events forget, end to end on a SQLite file and the embedded broker

PARKED_KEY = idempotency_key("plarin", "plarin", "conversion", SHOWN.id)


@pytest.fixture
def forget_env(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The events of `ledger_env` and a parked delivery of SHOWN in a SQLite file; no broker yet."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"

    async def prepare() -> None:
        await _fill_ledger(url)
        ledger = Ledger.from_url(url)
        try:
            await ledger.begin(PARKED_KEY, event_id=SHOWN.id, source="salon", connection="plarin",
                               target="plarin", action="conversion")  # fmt: skip
            await ledger.park(PARKED_KEY, target="plarin", lane="plarin:salon/plarin:salon:1842", partition=0,
                              due_at=NOW + timedelta(hours=1), reason="circuit", connection="salon/plarin",
                              action="conversion", kafka_key="salon:1842", event=SHOWN.model_dump_json())  # fmt: skip
        finally:
            await ledger.close()

    asyncio.run(prepare())
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("RELAY_DATABASE_URL", url)
    monkeypatch.setenv("RELAY_PHONE_HASH_KEY", PHONE_KEY)
    monkeypatch.setenv("COLUMNS", "250")
    return url


@pytest.fixture
def forget_broker(forget_env: str, broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> str:
    """`forget_env` with a dead letter of SHOWN's client and one of OTHER's on the broker."""
    bs = broker.bootstrap_servers
    refused = Outcome.permanent("Maxma: client +79161234567 is blocked", http_status=400)
    letters = [Letter(ev, "maxma", "maxma", "new-client", refused, NOW) for ev in (SHOWN, OTHER)]

    async def prepare() -> None:
        await ensure_topics(KafkaSettings(bootstrap_servers=bs, enable_idempotence=False))
        await publish_letters(bs, letters)

    asyncio.run(prepare())
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", bs)
    return forget_env


def _ledger_rows(url: str) -> dict[str, list[Any]]:
    from sqlalchemy import text

    async def read() -> dict[str, list[Any]]:
        ledger = Ledger.from_url(url)
        try:
            async with ledger.engine.connect() as conn:
                return {
                    t: [tuple(r) for r in await conn.execute(text(f"SELECT * FROM {t} ORDER BY 1"))]
                    for t in ("events", "deliveries", "delivery_attempts", "parked")
                }
        finally:
            await ledger.close()

    return asyncio.run(read())


def test_cli_events_forget_dry_run_then_yes_erases_the_client(forget_broker: str) -> None:
    before = _ledger_rows(forget_broker)
    result = runner.invoke(app, ["events", "forget", "--source", "salon", "--client-id", "1842", "--dry-run"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "The ledger's rows of client 1842 of source salon" in out
    assert "Would mask" in out
    assert "1 event(s) of client id(s) 1842" in out
    assert "1 parked delivery would be settled as failed (erased on request): it will not happen" in out
    assert PARKED_KEY in out
    assert "dry run: nothing was changed" in out
    # The Kafka records of the client, and only them.
    assert "Kafka records that hold the client" in out
    assert "relay.maxma.dlq" in out
    assert SHOWN.id in out
    assert OTHER.id not in out
    assert "dead letter maxma salon/maxma new-client" in out
    assert "Do not replay them" in out
    assert "klientiks.inbox.v1 (retention 7 d) and klientiks.events.v1 (30 d)" in out
    for secret in ("9161234567", "Иванова", "anna.ivanova"):
        assert secret not in out
    assert _ledger_rows(forget_broker) == before

    result = runner.invoke(app, ["events", "forget", "--source", "salon", "--client-id", "1842"], input="n\n")
    assert result.exit_code == 1
    assert "Erase the personal data of client 1842 of source salon?" in result.output
    assert _ledger_rows(forget_broker) == before

    result = runner.invoke(app, ["events", "forget", "--source", "salon", "--client-id", "1842", "--yes"])
    assert result.exit_code == 0, result.output
    # The event; the weeek delivery's error and its attempt's, the maxma attempt's; the parked delivery.
    assert "erased: 6 row(s) masked or deleted" in result.output
    assert "1 parked delivery was settled as failed" in result.output
    assert "relay.maxma.dlq" in result.output
    after = _ledger_rows(forget_broker)
    assert after["parked"] == []
    assert [r for r in after["events"] if r[0] == OTHER.id] == [
        r for r in before["events"] if r[0] == OTHER.id
    ]
    assert "client_phone" not in str([r for r in after["events"] if r[0] == SHOWN.id])
    assert "anna.ivanova" not in str(after["deliveries"]) + str(after["delivery_attempts"])
    assert sum(1 for r in after["deliveries"] if "erased on request" in r) == 2

    shown = runner.invoke(app, ["events", "show", SHOWN.id])
    assert shown.exit_code == 0, shown.output
    assert "personal data erased on request" in shown.output
    assert "erased on request (`relay events forget`)" in shown.output
    assert "client_phone" not in shown.output
    assert "maxma salon/maxma new-client: delivered" in shown.output
    assert "plarin salon/plarin conversion: failed" in shown.output
    assert "2222000000001" in shown.output  # the target's id stays

    again = runner.invoke(app, ["events", "forget", "--source", "salon", "--client-id", "1842", "--yes"])
    assert again.exit_code == 0, again.output
    assert "nothing left to erase" in again.output
    assert _ledger_rows(forget_broker) == after


def test_cli_events_forget_by_phone_masks_it_and_needs_the_key(
    forget_broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = runner.invoke(app, ["events", "forget", "--source", "salon", "--phone", "8 (916) 123-45-67",
                                 "--dry-run"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "phone +7*******67 of source salon" in result.output
    assert "1 event(s) of client id(s) 1842" in result.output
    assert SHOWN.id in result.output
    assert "9161234567" not in result.output
    result = runner.invoke(app, ["events", "forget", "--source", "salon", "--client-id", "999", "--yes"])
    assert result.exit_code == 0, result.output
    assert "nothing found in the ledger for client 999 of source salon" in result.output
    assert "no dead letters or quarantined records hold the client" in result.output
    result = runner.invoke(app, ["events", "forget", "--source", "salon", "--phone", "12"])
    assert result.exit_code == 2
    assert "not a valid phone number of region RU" in result.output
    result = runner.invoke(app, ["events", "forget", "--source", "salon"])
    assert result.exit_code == 2
    assert "give --client-id or --phone" in result.output
    monkeypatch.delenv("RELAY_PHONE_HASH_KEY")
    result = runner.invoke(app, ["events", "forget", "--source", "salon", "--phone", "79161234567", "--yes"])
    assert result.exit_code == 2
    assert "phone search needs the phone index key" in result.output


def test_cli_events_forget_without_a_broker_erases_the_ledger_and_exits_3(
    forget_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.common.embedded import free_port

    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    result = runner.invoke(
        app, ["events", "forget", "--source", "salon", "--client-id", "1842", "--yes", "--timeout", "2"]
    )
    assert result.exit_code == 3, result.output
    assert "erased: 6 row(s) masked or deleted" in result.output
    assert "warning: cannot read the DLQ and quarantine topics" in result.output
    assert "the ledger is erased" in result.output
    assert _ledger_rows(forget_env)["parked"] == []
