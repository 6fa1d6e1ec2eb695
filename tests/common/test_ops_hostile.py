"""Operator commands on hostile data: escape sequences, bidi marks and lone surrogates from webhooks, and
absurd option values. Nothing raw reaches the terminal, and a bad option is one line and exit code 2."""

from __future__ import annotations

import asyncio
import json
import re
import unicodedata
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, ClassVar
from urllib.parse import quote

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from services.cli import app
from services.common import ops
from services.common.config import KafkaSettings
from services.common.display import safe_json, safe_text
from services.common.dlq import PREFIX, dead_letter_headers
from services.common.embedded import EmbeddedBroker, free_port
from services.common.events import source_uri
from services.common.kafka import QUARANTINE, dlq_topic, ensure_topics
from services.common.ledger import Ledger, idempotency_key, upgrade
from services.common.ops import DeadLetter, Quarantined, parse_when, read_dlq, read_quarantine
from services.common.outcome import Outcome
from services.ingest.inbox import InboxRecord

NOW = datetime.now(UTC).replace(microsecond=0)
# Clears the screen, turns the text red, sets the window title: what the issue saw printed raw.
CLIENT = "\x1b[2J\x1b[31m1842\x1b]0;title\x07"
# Raw characters that must never reach the terminal; \x9b is the one-byte CSI of 8-bit terminals.
RAW = ("\x1b", "\x07", "\x9b", "\x7f", "\r", "\u202e", "\u2066", "\u200b", "\ufeff", "\ud800")

runner = CliRunner()


def _no_raw(out: str) -> None:
    for ch in RAW:
        assert ch not in out, f"raw {ch!r} in the output"


@pytest.fixture(autouse=True)
def _plain_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rich writes no styles of its own to a pipe unless told to: an ESC in the output is the data's.
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "250")


# ------------------------------------------------------------------------------------------- safe_text

_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def _unescape(shown: str) -> str:
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(int(m.group(1)[1:], 16)), shown)


# Every category, surrogates included, with the dangerous ones made likely.
_ANY_TEXT = st.text(
    alphabet=st.one_of(
        st.characters(exclude_categories=()),
        st.sampled_from([*RAW, "\\", "\n", "\t", "\x00", "\x85", "\u2028", "\u2029", "\U000f0000", "x", "Я"]),
    )
)


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (CLIENT, "\\x1b[2J\\x1b[31m1842\\x1b]0;title\\x07"),
        ("\u202egnp.exe\u2066", "\\u202egnp.exe\\u2066"),
        ("a\u200bb\u200c\u200d\u2060\ufeff", "a\\u200bb\\u200c\\u200d\\u2060\\ufeff"),
        ("\ud800key", "\\ud800key"),
        ("line\r\nnext\ttab\x00\x7f\x85\x9b", "line\\x0d\\x0anext\\x09tab\\x00\\x7f\\x85\\x9b"),
        (
            "\u2028\u2029\u00ad\ue000\U000f0000\U0010ffff",
            "\\u2028\\u2029\\xad\\ue000\\U000f0000\\U0010ffff",
        ),
        ("\U000e0001\u0378", "\\U000e0001\\u0378"),  # a tag character (Cf) and an unassigned one
        # The backslash too: typed-in "\x1b" stays four visible characters, unlike an escaped ESC.
        ("\\x1b", "\\\\x1b"),
        ("Иванова Анна, +7 (916) 123-45-67 «ok» 😀", "Иванова Анна, +7 (916) 123-45-67 «ok» 😀"),
    ],
)
def test_safe_text_escapes_what_does_not_print(raw: str, shown: str) -> None:
    assert safe_text(raw) == shown


@given(_ANY_TEXT)
def test_safe_text_always_prints_and_keeps_everything(text: str) -> None:
    shown = safe_text(text)
    assert shown.isprintable()
    assert all(unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for ch in shown)
    assert _unescape(shown) == text  # so distinct texts are shown distinctly
    if text.isprintable() and "\\" not in text:
        assert shown == text


@given(_ANY_TEXT, _ANY_TEXT)
def test_safe_text_of_distinct_texts_differs(a: str, b: str) -> None:
    assert (safe_text(a) == safe_text(b)) == (a == b)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)


@given(_JSON)
def test_safe_json_prints_and_parses_back(data: Any) -> None:
    shown = safe_json(data)
    assert all(line.isprintable() for line in shown.split("\n"))
    # What any JSON encoder's output parses back to (adjacent lone surrogates come back as one character).
    assert json.loads(shown) == json.loads(json.dumps(data))


def test_safe_json_uses_json_escapes_and_keeps_readable_text() -> None:
    shown = safe_json({"\ud800key": CLIENT, "name": "Анна\u202e", "pua": "\U000f0000"})
    assert '"\\ud800key": "\\u001b[2J\\u001b[31m1842\\u001b]0;title\\u0007"' in shown
    assert '"name": "Анна\\u202e"' in shown
    assert '"pua": "\\udb80\\udc00"' in shown


# ------------------------------------------------------------------------------------------- times


def test_a_time_that_cannot_be_shown_in_utc_falls_back_to_the_kafka_timestamp() -> None:
    # Both parse, but neither has a UTC date: showing one raised OverflowError.
    ms = int(NOW.timestamp() * 1000)
    value = json.dumps({"id": "q-old", "received_at": "0001-01-01T00:00:00+01:00"}).encode()
    rec = SimpleNamespace(
        topic=QUARANTINE, partition=0, offset=0, key=None, value=value, headers=[], timestamp=ms
    )
    assert Quarantined.from_record(rec).received_at == NOW
    headers = [(f"{PREFIX}last-attempt-at", b"9999-12-31T23:59:59-01:00")]
    rec = SimpleNamespace(topic=dlq_topic("maxma"), partition=0, offset=0, key=None, value=b"", headers=headers,
                          timestamp=ms)  # fmt: skip
    dl = DeadLetter.from_record(rec)
    assert dl.last_attempt_at == dl.first_attempt_at == NOW
    # An offset that does convert is kept as the same instant.
    rec.headers = [(f"{PREFIX}last-attempt-at", b"2024-03-14T09:00:00+03:00")]
    assert DeadLetter.from_record(rec).last_attempt_at == datetime(2024, 3, 14, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize("text", ["99999999999d", "999999999d", "3000000w", "9" * 400 + "s", "1" * 30 + "m"])
def test_parse_when_of_an_absurd_age_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="too long ago"):
        parse_when(text)


# ------------------------------------------------------------------------------------------- bad options

# Where a command that let a bad value through would fail, later and differently.
_NOWHERE = {
    "RELAY_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
    "RELAY_DATABASE_URL": "sqlite+aiosqlite:////nonexistent/relay.db",
}

BAD_OPTIONS = [
    (["dlq", "list", "--since", "99999999999d"], "too long ago"),
    (["dlq", "list", "--until", "9" * 400 + "d"], "too long ago"),
    (["dlq", "replay", "--since", "99999999999w", "--dry-run"], "too long ago"),
    (["quarantine", "list", "--since", "99999999999d"], "too long ago"),
    (["quarantine", "replay", "--until", "99999999999d", "--dry-run"], "too long ago"),
    (["dlq", "list", "--limit", "9223372036854775808"], "not in the range 1<=x<=1000000"),
    (["dlq", "list", "--limit", "0"], "not in the range"),
    (["dlq", "list", "--limit", "-1"], "not in the range"),
    (["dlq", "list", "--limit", "1000001"], "not in the range"),
    (["quarantine", "list", "--limit", "9223372036854775808"], "not in the range"),
    (["events", "find", "--client-id", "1", "--limit", "9223372036854775808"], "not in the range"),
    (["events", "find", "--client-id", "1", "--limit", "-5"], "not in the range"),
    (["dlq", "list", "--timeout", "nan"], "not a number of seconds above 0"),
    (["dlq", "list", "--timeout", "inf"], "not a number of seconds above 0"),
    (["dlq", "list", "--timeout", "-inf"], "not a number of seconds above 0"),
    (["dlq", "list", "--timeout", "0"], "not a number of seconds above 0"),
    (["dlq", "list", "--timeout", "-1"], "not a number of seconds above 0"),
    (["dlq", "list", "--timeout", "1e300"], "not a number of seconds above 0"),
    (["dlq", "list", "--timeout", "soon"], "is not a valid float"),
    (["dlq", "replay", "--timeout", "nan", "--dry-run"], "not a number of seconds above 0"),
    (["quarantine", "list", "--timeout", "0"], "not a number of seconds above 0"),
    (["quarantine", "replay", "--timeout", "inf", "--dry-run"], "not a number of seconds above 0"),
    # Bytes that are not UTF-8 on the command line reach Python as lone surrogates.
    (["events", "find", "--client-id", "\udcff"], "\\udcff is not UTF-8 text"),
    (["events", "find", "--client-id", "1", "--source", "\udcff"], "not UTF-8 text"),
    (["events", "find", "--phone", "\udcff79161234567"], "not UTF-8 text"),
    (["events", "show", "evt-\udcff"], "evt-\\udcff is not UTF-8 text"),
    (["dlq", "list", "--event-id", "\udcff"], "not UTF-8 text"),
    (["dlq", "list", "--reason", "\udcff"], "not UTF-8 text"),
    (["quarantine", "list", "--source", "salon", "--source", "\udcff"], "not UTF-8 text"),
    (["quarantine", "replay", "--reason", "\udcff", "--dry-run"], "not UTF-8 text"),
    (["quarantine", "list", "--event", "\udcff"], "not UTF-8 text"),
    (["dlq", "list", "--target", "\x1b[2J"], "unknown target \\x1b[2J; use one of"),
    (["events", "find", "--phone", "\x1b[2J", "--region", "\x1b]0;t\x07"], "region \\x1b]0;T\\x07"),
]


@pytest.mark.parametrize(("args", "message"), BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_a_bad_option_is_one_clear_line_and_exit_code_2(args: list[str], message: str) -> None:
    result = runner.invoke(app, args, env=_NOWHERE)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert any(message in line for line in result.output.splitlines()), result.output
    _no_raw(result.output)


# ------------------------------------------------------------------------------------------- events


async def _fill_ledger(url: str) -> None:
    ledger = Ledger.from_url(url)
    try:
        await upgrade(ledger.engine)
        t = NOW - timedelta(hours=1)
        query = "&".join(
            f"{k}={quote(v)}"
            for k, v in (
                ("client_id", CLIENT),
                ("client_name", "\x1bXYZ \u202eАнна"),  # masked to its first letters: ESC and U+202E
                ("comment", "\u202egnp.exe\u2066 \x9b2J"),
                ("client_phone", "8 (916) 123-45-67"),
            )
        )
        inbox = InboxRecord(id="evt-hostile", source="salon", event="client-created", received_at=t,
                            method="GET\x1b[5m", query=query, content_type="text/plain\x1b[8m")  # fmt: skip
        normalized = {
            "id": "evt-hostile",
            "type": "ru.klientiks.client.created",
            "data": {"client": {"id": CLIENT, "full_name": "\x1bXYZ Анна", "comment": "\u202etxt.exe"}},
            "\ud800key": "zero\u200bwidth\ufeff",
        }
        await ledger.add_event(
            id="evt-hostile", source="salon\x1b[1m", event="client-created\u202e", received_at=t,
            client_id=CLIENT, phone=None, kafka_key=f"salon:{CLIENT}", inbox=inbox.to_bytes().decode(),
            # ensure_ascii: the ledger holds the surrogate as the JSON escape "\ud800", as a webhook can.
            normalized=json.dumps(normalized, ensure_ascii=True), quarantine_reason=None,
        )  # fmt: skip
        await ledger.add_event(
            id="evt-quarantined", source="salon", event="client-created", received_at=t, client_id=CLIENT,
            phone=None, kafka_key=None, inbox="not an inbox record \x1b]0;title\x07",
            normalized=None, quarantine_reason="bad_body\x1b[2J\u202e",
        )  # fmt: skip
        key = idempotency_key("maxma", "maxma", "new-client", "evt-hostile")
        await ledger.begin(key, event_id="evt-hostile", source="salon", connection="maxma\x1b[8m",
                           target="maxma", action="new-client")  # fmt: skip
        await ledger.record(
            key, Outcome.permanent("vendor said \x1b]0;pwned\x07 \u202eevil [/] :warning:", http_status=400,
                                   vendor_code="E\x1b[1m"),
            started_at=t, duration_s=0.1, final=True,
        )  # fmt: skip
    finally:
        await ledger.close()


@pytest.fixture
def hostile_ledger(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    asyncio.run(_fill_ledger(db_url))
    monkeypatch.setenv("RELAY_DATABASE_URL", db_url)
    return db_url


def test_cli_events_show_escapes_everything_from_the_webhook(hostile_ledger: str) -> None:
    result = runner.invoke(app, ["events", "show", "evt-hostile"])
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.output
    _no_raw(out)
    assert "9161234567" not in out
    # The header.
    assert "salon\\x1b[1m" in out
    assert "client-created\\u202e" in out
    assert "salon:\\x1b[2J\\x1b[31m1842\\x1b]0;title\\x07" in out
    # What arrived: masked first, then escaped, so a masked name shows its first character escaped.
    assert "GET\\x1b[5m at" in out
    assert "content type text/plain\\x1b[8m" in out
    assert "\\x1b[2J\\x1b[31m1842\\x1b]0;title\\x07" in out
    assert "\\x1b*** \\u202e***" in out
    assert "\\u202egnp.exe\\u2066 \\x9b2J" in out
    # How it was normalized: JSON escapes, the surrogate key included, and still masked.
    assert '"id": "\\u001b[2J\\u001b[31m1842\\u001b]0;title\\u0007"' in out
    assert '"full_name": "\\u001b*** А***"' in out
    assert '"comment": "\\u202etxt.exe"' in out
    assert '"\\ud800key": "zero\\u200bwidth\\ufeff"' in out
    # Deliveries: the title, the vendor code and the error; "[/]" and ":warning:" are text, not markup.
    assert "maxma salon/maxma\\x1b[8m new-client: failed" in out
    assert "E\\x1b[1m" in out
    assert "vendor said \\x1b]0;pwned\\x07 \\u202eevil [/] :warning:" in out


def test_cli_events_show_of_a_quarantined_event_escapes_its_reason_and_record(hostile_ledger: str) -> None:
    result = runner.invoke(app, ["events", "show", "evt-quarantined"])
    assert result.exit_code == 0, (result.output, result.exception)
    _no_raw(result.output)
    assert "quarantined: bad_body\\x1b[2J\\u202e" in result.output
    assert "an unreadable inbox record: not an inbox record \\x1b]0;title\\x07" in result.output


def test_cli_events_show_of_an_unknown_hostile_id_escapes_it(hostile_ledger: str) -> None:
    result = runner.invoke(app, ["events", "show", "\x1b[2Jnope\u202e"])
    assert result.exit_code == 1
    _no_raw(result.output)
    assert "no event '\\x1b[2Jnope\\u202e' in the ledger" in result.output


def test_cli_events_find_escapes_client_ids(hostile_ledger: str) -> None:
    # The operator can search for the hostile id itself.
    result = runner.invoke(app, ["events", "find", "--client-id", CLIENT])
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.output
    _no_raw(out)
    assert "evt-hostile" in out
    assert "evt-quarantined" in out
    assert out.count("\\x1b[2J\\x1b[31m1842\\x1b]0;title\\x07") == 2
    assert "salon\\x1b[1m" in out
    assert "client-created\\u202e" in out
    assert "maxma/new-client failed" in out
    assert "2 event(s)" in out


# ------------------------------------------------------------------------------------------- DLQ, quarantine


def _hostile_dead_letter() -> tuple[list[tuple[str, bytes]], bytes]:
    last = NOW - timedelta(minutes=5)
    dlq = dead_letter_headers(
        Outcome.permanent("vendor: \x1b[31mred\x1b[0m \u2066 [/] client +79161234567", http_status=400,
                          vendor_code="E\x1b[1m\x9b"),
        target="maxma", connection="maxma\x1b]0;x\x07", action="new-client\u202e",
        idempotency_key="maxma:maxma:new-client:evt-\x1b[2J", attempts=3,
        first_attempt_at=last - timedelta(hours=1), last_attempt_at=last,
    )  # fmt: skip
    headers = [
        ("ce_id", b"evt-\x1b[2J"),
        ("ce_source", source_uri("salon").encode() + b"\x1b[5m"),
        *((k, v.encode()) for k, v in dlq.items()),
    ]
    return headers, b"{}"


def _hostile_quarantined() -> tuple[list[tuple[str, bytes]], bytes]:
    query = "client_name=%1BXYZ&note=%E2%80%AEabc%0Anext&client_phone=79161234567"
    value = InboxRecord(id="q-\x1b]0;t\x07", source="salon\x1b[2J", event="client-created\u202e",
                        received_at=NOW - timedelta(minutes=3), method="GET", query=query).to_bytes()  # fmt: skip
    headers = [("reason", b"[/]bad\x1b[2J\xe2\x80\xae"), ("detail", b"detail \x1b]0;t\x07 \xc2\x9b2J")]
    return headers, value


async def _publish(bootstrap: str, topic: str, headers: list[tuple[str, bytes]], value: bytes) -> None:
    await ensure_topics(KafkaSettings(bootstrap_servers=bootstrap, enable_idempotence=False))
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"salon:1", headers=headers)
    finally:
        await producer.stop()


@pytest.fixture
def hostile_topics(broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch) -> str:
    bs = broker.bootstrap_servers
    asyncio.run(_publish(bs, dlq_topic("maxma"), *_hostile_dead_letter()))
    asyncio.run(_publish(bs, QUARANTINE, *_hostile_quarantined()))
    monkeypatch.setenv("RELAY_KAFKA__BOOTSTRAP_SERVERS", bs)
    return bs


def test_cli_dlq_escapes_dead_letters(hostile_topics: str) -> None:
    for args in (["dlq", "list"], ["dlq", "replay", "--dry-run"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (result.output, result.exception)
        out = result.output
        _no_raw(out)
        assert "79161234567" not in out
        assert "evt-\\x1b[2J" in out
        assert "salon\\x1b[5m/maxma\\x1b]0;x\\x07" in out
        assert "new-client\\u202e" in out
        assert "E\\x1b[1m\\x9b" in out
        assert "vendor: \\x1b[31mred\\x1b[0m \\u2066 [/] client +7*******67" in out
        assert "1 dead letter(s) match (maxma 1)" in out


def test_cli_quarantine_escapes_records_params_and_reasons(hostile_topics: str) -> None:
    result = runner.invoke(app, ["quarantine", "list", "--params"])
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.output
    _no_raw(out)
    assert "79161234567" not in out
    assert "q-\\x1b]0;t\\x07" in out
    assert "salon\\x1b[2J" in out
    assert "client-created\\u202e" in out
    assert "detail \\x1b]0;t\\x07 \\x9b2J" in out
    assert "client_name=\\x1b***" in out
    assert "note=\\u202eabc\\x0anext" in out
    assert "client_phone=7*******67" in out
    # The reason is in the summary line too, where "[/]" once stopped the command as bad markup.
    assert "1 quarantined record(s) match ([/]bad\\x1b[2J\\u202e 1)" in out

    result = runner.invoke(app, ["quarantine", "replay", "--dry-run"])
    assert result.exit_code == 0, (result.output, result.exception)
    _no_raw(result.output)
    assert "[/]bad\\x1b[2J\\u202e" in result.output


# ------------------------------------------------------------------------------------------- timeouts


class _Recorded(AIOKafkaConsumer):
    made: ClassVar[list[_Recorded]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped = False
        _Recorded.made.append(self)

    async def stop(self) -> None:
        self.stopped = True
        await super().stop()


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[_Recorded]:
    _Recorded.made = []
    monkeypatch.setattr(ops, "AIOKafkaConsumer", _Recorded)
    return _Recorded.made


async def test_a_read_that_times_out_stops_its_consumer(
    broker: EmbeddedBroker, recorded: list[_Recorded]
) -> None:
    with pytest.raises(TimeoutError):
        await read_dlq(broker.bootstrap_servers, ["maxma"], timeout=1e-6)
    with pytest.raises(TimeoutError):
        await read_quarantine(broker.bootstrap_servers, timeout=1e-6)
    assert len(recorded) == 2
    assert all(c.stopped for c in recorded)


async def test_a_read_from_no_broker_stops_its_consumer(recorded: list[_Recorded]) -> None:
    with pytest.raises((KafkaError, TimeoutError, OSError)):
        await read_dlq(f"127.0.0.1:{free_port()}", ["maxma"], timeout=2)
    assert len(recorded) == 1
    assert recorded[0].stopped


@pytest.mark.parametrize("timeout", [0.0, -1.0, float("nan"), float("inf")])
async def test_a_read_refuses_a_timeout_that_cannot_work(timeout: float, recorded: list[_Recorded]) -> None:
    with pytest.raises(ValueError, match="above 0"):
        await read_quarantine("127.0.0.1:1", timeout=timeout)
    assert recorded == []


@pytest.mark.parametrize("command", ["dlq", "quarantine"])
def test_cli_read_timeout_names_the_error_and_stops_the_consumer(
    command: str, broker: EmbeddedBroker, recorded: list[_Recorded]
) -> None:
    result = runner.invoke(
        app, [command, "list", "--timeout", "1e-6"],
        env={"RELAY_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers},
    )  # fmt: skip
    assert result.exit_code == 1, (result.output, result.exception)
    assert f"from {broker.bootstrap_servers}: TimeoutError; fix:" in result.output
    assert recorded
    assert all(c.stopped for c in recorded)
