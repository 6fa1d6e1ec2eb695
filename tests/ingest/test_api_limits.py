"""The ingest API against slow and greedy clients: real uvicorn with the ingest limits, raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import structlog
from prometheus_client import REGISTRY
from pydantic import ValidationError

from services.common.config import IngestSettings, KafkaSettings, Settings
from services.common.embedded import EmbeddedBroker
from services.common.kafka import INBOX
from services.common.logging import configure_logging
from services.ingest.api import create_api
from services.ingest.inbox import InboxRecord
from services.ingest.server import uvicorn_options
from tests.support import eventually, read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"
HOOK = f"/hooks/klientiks/{TOKEN}/client-created"
# Every webhook of a test has this client id: one Kafka key, one partition, read in order.
QUERY = "client_id=42"
HEADER_TIMEOUT, BODY_TIMEOUT, KEEPALIVE, MAX_CONNECTIONS = 0.5, 0.5, 0.3, 20
FAST: dict[str, object] = {
    "header_timeout_s": HEADER_TIMEOUT,
    "body_timeout_s": BODY_TIMEOUT,
    "keepalive_timeout_s": KEEPALIVE,
    "max_connections": MAX_CONNECTIONS,
}


def _settings(kafka: KafkaSettings, database_url: str, **ingest: object) -> Settings:
    return Settings.model_validate(
        {
            "kafka": kafka.model_dump(),
            "database_url": database_url,
            "ingest": ingest,
            "sources": [{"name": "salon", "token": TOKEN}],
        }
    )


@contextlib.asynccontextmanager
async def _serve(kafka: KafkaSettings, tmp_path: Path, **ingest: object) -> AsyncIterator[int]:
    """The ingest API served as ``relay ingest api`` serves it; yields its port."""
    settings = _settings(kafka, f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}", **ingest)
    app = create_api(settings, migrate=True)
    async with serve_app(app, **uvicorn_options(settings.ingest)) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.fixture
async def port(kafka: KafkaSettings, tmp_path: Path) -> AsyncIterator[int]:
    async with _serve(kafka, tmp_path, **FAST) as p:
        yield p


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Our structlog lines and uvicorn's through the stdlib root logger, as in production."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    configure_logging("INFO", "json")
    caplog.set_level(logging.INFO)
    yield caplog
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers and handler is not caplog.handler:
            root.removeHandler(handler)
    root.setLevel(level)


def _request(method: str = "GET", query: str = QUERY, headers: str = "", body: bytes = b"") -> bytes:
    return f"{method} {HOOK}?{query} HTTP/1.1\r\nHost: relay\r\n{headers}\r\n".encode() + body


async def _read_to_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    data = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, leaving the connection open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, headers = _parse_head(head)
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return status, headers, body


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def _statuses(raw: bytes) -> list[int]:
    # A status line follows the previous body directly: no line break in between.
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


async def _published_before_marker(port: int, bootstrap: str) -> list[InboxRecord]:
    """What the inbox got for this test's key, up to a marker webhook sent now (same key, so in order)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(query=f"{QUERY}&marker=1"))
    status, _, _ = await _read_response(reader)
    writer.close()
    assert status == 202
    recs = await read_all(
        bootstrap, INBOX, expect=0,
        done=lambda rs: any("marker=1" in InboxRecord.from_bytes(r.value).query for r in rs),
    )  # fmt: skip
    records = [InboxRecord.from_bytes(r.value) for r in recs]
    return [r for r in records if "marker=1" not in r.query]


def _sample(name: str, **labels: str) -> float:
    # The API runs in this process: its metrics are this registry's.
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _refused(reason: str) -> float:
    return _sample("relay_ingest_connections_refused_total", reason=reason)


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_oversized_headers_are_431_and_nothing_is_published(port: int, broker: EmbeddedBroker) -> None:
    before = _refused("header_too_large")
    # One 8 MB header, streamed: refused long before it ends.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(headers="X-Big: ")[:-2])

    async def stream() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(128):
                writer.write(b"a" * 65536)
                await writer.drain()
            writer.write(b"\r\n\r\n")
            await writer.drain()

    sender = asyncio.create_task(stream())
    raw = await _read_to_eof(reader, 10)
    await sender
    writer.close()
    assert _statuses(raw) == [431]
    assert b"retry-after" not in raw.lower()

    # Many headers that together are over 16 KiB, in one write.
    many = "".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(200))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(headers=many))
    raw = await _read_to_eof(reader, 10)
    writer.close()
    assert _statuses(raw) == [431]
    assert _refused("header_too_large") - before == 2

    # Headers under the limit still work.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request(headers="".join(f"X-H{i}: {'v' * 100}\r\n" for i in range(100))))
    status, _, _ = await _read_response(reader)
    writer.close()
    assert status == 202
    assert len(await _published_before_marker(port, broker.bootstrap_servers)) == 1


async def test_slow_headers_and_silent_connections_are_408_and_closed(port: int) -> None:
    before = _refused("header_timeout")
    # Trickled headers: each byte well within any per-read timeout, the whole far past header_timeout_s.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in _request():
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    raw = await _read_to_eof(reader, HEADER_TIMEOUT + 2)
    assert time.monotonic() - started < HEADER_TIMEOUT + 2
    sender.cancel()
    writer.close()
    assert _statuses(raw) == [408]

    # A connection that never sends a byte.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    raw = await _read_to_eof(reader, HEADER_TIMEOUT + 2)
    writer.close()
    assert _statuses(raw) == [408]
    assert _refused("header_timeout") - before == 2


async def test_a_slow_body_is_408_and_nothing_is_published(port: int, broker: EmbeddedBroker) -> None:
    before = _sample(
        "relay_webhooks_received_total", source="salon", event="client-created", outcome="timeout"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        _request("POST", headers="Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n")
        + b"client_phone=7916"
    )
    raw = await _read_to_eof(reader, BODY_TIMEOUT + 2)
    writer.close()
    assert _statuses(raw) == [408]
    assert (
        _sample("relay_webhooks_received_total", source="salon", event="client-created", outcome="timeout")
        - before
        == 1
    )
    assert await _published_before_marker(port, broker.bootstrap_servers) == []


async def test_a_body_left_unread_after_an_early_answer_is_bounded(port: int) -> None:
    # 413 on the declared length, answered at once; the client then trickles the body.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request("POST", headers=f"Content-Length: {1024 * 1024}\r\n"))
    status, _, _ = await _read_response(reader)
    assert status == 413

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                writer.write(b"x" * 100)
                await writer.drain()
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(trickle())
    assert await _read_to_eof(reader, BODY_TIMEOUT + 2) == b""
    sender.cancel()
    writer.close()


async def test_idle_kept_alive_connections_are_closed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):  # kept alive between requests
        writer.write(_request())
        status, headers, _ = await _read_response(reader)
        assert status == 202
        assert headers.get("connection") != "close"
    # Then idle: closed without an answer (a 408 here would race a request the client is sending).
    assert await _read_to_eof(reader, KEEPALIVE + 2) == b""
    writer.close()


async def test_connections_past_the_cap_get_503_and_are_closed_at_once(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    # Held connections must outlive the test's reads: a longer header timeout than FAST's.
    async with _serve(kafka, tmp_path, **(FAST | {"header_timeout_s": 20})) as port:
        before = _refused("too_many_connections")
        baseline = _open_files()
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
        # Every accepted connection is open on both ends, in this process.
        await eventually(lambda: _open_files() >= baseline + 2 * len(held), timeout=5, what="accepts")

        async def excess(send_first: bool) -> tuple[int, dict[str, str], bytes]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if send_first:
                with contextlib.suppress(ConnectionError):
                    writer.write(_request())
            raw = await _read_to_eof(reader, 5)
            writer.close()
            head, _, body = raw.partition(b"\r\n\r\n")
            status, headers = _parse_head(head + b"\r\n")
            return status, headers, body

        answers = [await excess(send_first=i % 2 == 1) for i in range(200)]
        assert {status for status, _, _ in answers} == {503}
        assert all(int(headers["retry-after"]) >= 1 for _, headers, _ in answers)
        assert _refused("too_many_connections") - before == 200
        # The refused ones hold no file: only the held connections' two ends are open.
        await eventually(
            lambda: _open_files() <= baseline + 2 * len(held) + 5, timeout=5, what="refused sockets closed"
        )

        # A held connection still works; once connections close, new ones are accepted again.
        reader, writer = held[0]
        writer.write(_request())
        status, _, _ = await _read_response(reader)
        assert status == 202
        for _, w in held:
            w.close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_request())
        status, _, _ = await _read_response(reader)
        writer.close()
        assert status == 202


async def test_a_disconnect_mid_body_is_one_info_line_and_a_count(
    port: int, broker: EmbeddedBroker, logs: pytest.LogCaptureFixture
) -> None:
    before = _sample("relay_ingest_disconnects_total", stage="body")
    headers_before = _sample("relay_ingest_disconnects_total", stage="headers")
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request("POST", headers="Content-Length: 100\r\n") + b"client_phone=7916")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await eventually(
        lambda: _sample("relay_ingest_disconnects_total", stage="body") - before == 1,
        timeout=5,
        what="the disconnect counted",
    )
    # Half a header block, then gone.
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request()[:20])
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await eventually(
        lambda: _sample("relay_ingest_disconnects_total", stage="headers") - headers_before == 1,
        timeout=5,
        what="the disconnect counted",
    )
    assert await _published_before_marker(port, broker.bootstrap_servers) == []
    assert [r for r in logs.records if r.levelno >= logging.WARNING] == []
    assert "client disconnected before the end of the body" in logs.text
    assert "Traceback" not in logs.text


async def test_a_post_without_a_length_is_411_and_nothing_is_published(
    port: int, broker: EmbeddedBroker
) -> None:
    # The body without a length reads as a second, broken request: one answer, 411, then closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        _request("POST", headers="Content-Type: application/x-www-form-urlencoded\r\n") + b"client_id=7"
    )
    raw = await _read_to_eof(reader, 5)
    writer.close()
    assert _statuses(raw) == [411]

    # A POST with Content-Length: 0 and a GET without a body are fine, on one kept-alive connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request("POST", headers="Content-Length: 0\r\n"))
    assert (await _read_response(reader))[0] == 202
    writer.write(_request("GET"))
    assert (await _read_response(reader))[0] == 202
    # Chunked is a length too.
    writer.write(_request("POST", headers="Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n")
    assert (await _read_response(reader))[0] == 202
    writer.close()
    assert len(await _published_before_marker(port, broker.bootstrap_servers)) == 3


async def test_garbage_after_a_webhook_never_replaces_its_202(port: int, broker: EmbeddedBroker) -> None:
    # One write: a webhook, then bytes that are not HTTP. The webhook is answered 202 first, then 400.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_request() + b"\x00\x01 not http\r\n\r\n")
    raw = await _read_to_eof(reader, 5)
    writer.close()
    assert _statuses(raw) == [202, 400]
    assert len(await _published_before_marker(port, broker.bootstrap_servers)) == 1


def test_the_limits_have_safe_defaults_and_refuse_unsafe_values(monkeypatch: pytest.MonkeyPatch) -> None:
    d = IngestSettings()
    assert (d.max_header_bytes, d.header_timeout_s, d.body_timeout_s, d.keepalive_timeout_s) == (
        16384,
        10,
        10,
        5,
    )
    assert d.max_connections == 1000
    for bad in ({"max_header_bytes": 100}, {"header_timeout_s": 0}, {"body_timeout_s": -1},
                {"keepalive_timeout_s": 0}, {"max_connections": 0}):  # fmt: skip
        with pytest.raises(ValidationError):
            IngestSettings.model_validate(bad)
    monkeypatch.setenv("RELAY_INGEST__MAX_CONNECTIONS", "50")
    options = uvicorn_options(Settings().ingest)
    assert options["http"].limits.max_connections == 50
    assert options["timeout_keep_alive"] == 5
