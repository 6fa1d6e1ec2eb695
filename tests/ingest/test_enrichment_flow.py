"""Thin webhooks completed from the Klientiks API: the real normalizer, Tansu, the sandbox over HTTP."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from services.common.config import KafkaSettings, Settings
from services.common.events import CloudEvent, header
from services.common.kafka import EVENTS, INBOX, QUARANTINE
from services.common.ledger import Ledger
from services.common.ops import QuarantineFilter, read_quarantine, replay_quarantine
from services.ingest.inbox import InboxRecord
from services.ingest.normalizer import create_normalizer
from services.sandbox.klientiks import KlientiksSandbox, SandboxAccount, create_klientiks_sandbox
from tests.support import PHONE_KEY, read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"
PLAIN = "plain-token-0123456789abcdef"
# The Klientiks rate limiter is per account and per process: every test gets accounts of its own.
_accounts = itertools.count(int(time.time()) % 100000 * 100 + 50)


@dataclass
class Stack:
    sandbox: KlientiksSandbox
    control: httpx.AsyncClient
    settings: Settings
    account: SandboxAccount

    def thin(self, n: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
        appt = list(self.sandbox.appointments.values())[n]
        return appt, self.sandbox.clients[appt["client_id"]]

    async def requests(self) -> list[dict[str, Any]]:
        r = await self.control.get("/_sandbox/requests", params={"account": self.account.account_id})
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture
async def stack(kafka: KafkaSettings, tmp_path: Path) -> AsyncIterator[Stack]:
    account = SandboxAccount(str(next(_accounts)), "113421", "kl-access-token-7f3a9c1e5b2d")
    app = create_klientiks_sandbox([account], seed=7)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as control:
        settings = Settings.model_validate(
            {
                "kafka": kafka.model_dump(),
                "database_url": f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
                "phone_hash_key": PHONE_KEY,
                "sources": [
                    {
                        "name": "salon",
                        "token": TOKEN,
                        "klientiks": {
                            "account_id": account.account_id,
                            "user_id": account.user_id,
                            "access_token": account.access_token,
                            "base_url": f"{url}/clientix/Restapi",
                            "rate_limit_per_s": 4,
                        },
                    },
                    {"name": "plain", "token": PLAIN},
                ],
            }
        )
        yield Stack(app.state.sandbox, control, settings, account)


async def _send(bootstrap: str, *records: InboxRecord) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for r in records:
            await producer.send_and_wait(INBOX, r.to_bytes(), key=f"{r.source}:appointment:x".encode())
    finally:
        await producer.stop()


def _seed004(
    event_id: str, appointment_id: int, status: str = "confirmed", source: str = "salon"
) -> InboxRecord:
    # Seed 004's thin template: ?appointment_id={{#appointment}}{{id}}{{/appointment}}&status=...
    return InboxRecord(
        id=event_id, source=source, event="appointment-changed", received_at=datetime.now(UTC), method="GET",
        query=f"appointment_id={appointment_id}&status={status}",
    )  # fmt: skip


async def test_a_thin_webhook_is_completed_and_keyed_by_its_client(
    stack: Stack, kafka: KafkaSettings
) -> None:
    appt, client = stack.thin()
    await _send(kafka.bootstrap_servers, _seed004("e-thin", appt["id"], status="cancelled"))
    async with serve_app(create_normalizer(stack.settings, migrate=True)):
        (rec,) = await read_all(kafka.bootstrap_servers, EVENTS, expect=1, timeout=20)
    event = CloudEvent.from_kafka(rec.headers, rec.value)
    assert rec.key == f"salon:{client['id']}".encode()
    data = event.data
    assert data.client is not None
    assert data.appointment is not None
    assert data.client.id == str(client["id"])
    assert data.client.phone == "+" + client["phone"]
    assert data.client.first_name == client["first_name"]
    assert data.appointment.status == "cancelled"  # the webhook's new status wins over the API's
    assert data.appointment.start is not None
    assert data.appointment.start.utcoffset() is not None
    assert data.appointment.services
    assert "client_phone" not in data.missing
    calls = await stack.requests()
    assert [c["action"] for c in calls] == ["getAppointment"]  # the client came inside the appointment
    ledger = Ledger.from_url(stack.settings.database_url, phone_key=stack.settings.phone_hash_key)
    try:
        kept = await ledger.event("e-thin")
        assert kept is not None
        assert kept.kafka_key == f"salon:{client['id']}"
        assert [e.id for e in await ledger.find_events(phone="+" + client["phone"])] == ["e-thin"]
    finally:
        await ledger.close()


async def test_5xx_is_retried_and_the_account_rate_limit_holds(stack: Stack, kafka: KafkaSettings) -> None:
    await stack.control.post("/_sandbox/faults", json={"mode": "http_status", "status": 503, "times": 2})
    records = [_seed004(f"e-{n}", stack.thin(n)[0]["id"]) for n in range(6)]
    await _send(kafka.bootstrap_servers, *records)
    async with serve_app(create_normalizer(stack.settings, migrate=True)):
        events = await read_all(kafka.bootstrap_servers, EVENTS, expect=6, timeout=40)
    assert sorted(header(list(r.headers), "ce_id") or "" for r in events) == sorted(r.id for r in records)
    assert all(CloudEvent.from_kafka(r.headers, r.value).data.client is not None for r in events)
    calls = await stack.requests()
    assert [c["status"] for c in calls].count(503) == 2
    times = sorted(c["time"] for c in calls)
    assert len(times) == 8
    # 4 per second for the account, whatever the batch asks for at once (a little scheduling slack).
    assert all(b - a >= 0.25 - 0.03 for a, b in itertools.pairwise(times))


async def test_a_sandbox_rate_limit_answer_is_honoured(stack: Stack, kafka: KafkaSettings) -> None:
    await stack.control.post(
        "/_sandbox/faults", json={"mode": "http_status", "status": 429, "retry_after": 1, "times": 1}
    )
    await _send(kafka.bootstrap_servers, _seed004("e-429", stack.thin()[0]["id"]))
    async with serve_app(create_normalizer(stack.settings, migrate=True)):
        (rec,) = await read_all(kafka.bootstrap_servers, EVENTS, expect=1, timeout=20)
    assert CloudEvent.from_kafka(rec.headers, rec.value).data.client is not None
    first, second = sorted(c["time"] for c in await stack.requests())
    assert second - first >= 0.97


async def test_klientiks_down_quarantines_the_record_and_a_replay_completes_it(
    stack: Stack, kafka: KafkaSettings
) -> None:
    await stack.control.post(
        "/_sandbox/faults", json={"mode": "http_status", "status": 500, "probability": 1.0}
    )
    appt, client = stack.thin()
    await _send(kafka.bootstrap_servers, _seed004("e-down", appt["id"]))
    async with serve_app(create_normalizer(stack.settings, migrate=True)):
        (q,) = await read_all(kafka.bootstrap_servers, QUARANTINE, expect=1, timeout=30)
        assert header(list(q.headers), "reason") == "enrichment_failed"
        detail = header(list(q.headers), "detail") or ""
        assert stack.account.access_token not in detail
        assert InboxRecord.from_bytes(q.value).id == "e-down"  # the raw record, byte for byte

        await stack.control.delete("/_sandbox/faults")
        found = await read_quarantine(
            kafka.bootstrap_servers, QuarantineFilter(reasons=("enrichment_failed",))
        )
        assert await replay_quarantine(kafka.bootstrap_servers, found) == 1
        (rec,) = await read_all(kafka.bootstrap_servers, EVENTS, expect=1, timeout=30)
    event = CloudEvent.from_kafka(rec.headers, rec.value)
    assert event.id == "e-down"
    assert event.data.client is not None
    assert event.data.client.id == str(client["id"])
    ledger = Ledger.from_url(stack.settings.database_url)
    try:
        kept = await ledger.event("e-down")
        assert kept is not None
        assert kept.quarantine_reason is None  # the history shows the replay's outcome
        assert kept.normalized is not None
    finally:
        await ledger.close()


async def test_refused_credentials_are_a_permanent_quarantine_reason(
    stack: Stack, kafka: KafkaSettings
) -> None:
    source = stack.settings.sources[0]
    assert source.klientiks is not None
    wrong = source.klientiks.model_copy(update={"access_token": SecretStr("wrong-token-0123456789")})
    settings = stack.settings.model_copy(
        update={"sources": [source.model_copy(update={"klientiks": wrong}), stack.settings.sources[1]]}
    )
    await _send(kafka.bootstrap_servers, _seed004("e-auth", stack.thin()[0]["id"]))
    async with serve_app(create_normalizer(settings, migrate=True)):
        (q,) = await read_all(kafka.bootstrap_servers, QUARANTINE, expect=1, timeout=20)
    assert header(list(q.headers), "reason") == "enrichment_unauthorized"
    assert len(await stack.requests()) == 1  # a refusal is not retried


async def test_a_source_without_credentials_sends_the_thin_event_as_it_came(
    stack: Stack, kafka: KafkaSettings
) -> None:
    await _send(kafka.bootstrap_servers, _seed004("e-plain", 5833264, source="plain"))
    async with serve_app(create_normalizer(stack.settings, migrate=True)):
        (rec,) = await read_all(kafka.bootstrap_servers, EVENTS, expect=1, timeout=20)
    event = CloudEvent.from_kafka(rec.headers, rec.value)
    assert event.data.client is None
    assert event.data.appointment is not None
    assert event.data.appointment.status == "confirmed"
    assert rec.key == b"plain:appointment:5833264"
    assert await stack.requests() == []
