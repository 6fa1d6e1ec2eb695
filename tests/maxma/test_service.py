"""The maxma service on a real broker and a sandbox Maxma with faults: retries, DLQ, duplicates."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from services.common.config import KafkaSettings, load_settings
from services.common.events import CloudEvent, header
from services.common.kafka import dlq_topic
from services.common.ledger import DeliveryStatus, Ledger, idempotency_key
from services.maxma.app import create_app
from services.sandbox.maxma import MaxmaSandbox
from tests.support import (
    FAST_DELIVERY,
    MAXMA_KEY,
    SOURCE_TOKEN,
    client_event,
    eventually,
    maxma_target,
    publish_events,
    read_all,
    serve_app,
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SOURCE_TOKEN", SOURCE_TOKEN)
    monkeypatch.setenv("RELAY_TEST_MAXMA_KEY", MAXMA_KEY)


@pytest.fixture
async def service(
    kafka: KafkaSettings, tmp_path: Path, env: None
) -> AsyncIterator[tuple[MaxmaSandbox, Ledger]]:
    async with maxma_target(tmp_path) as target:
        settings = load_settings(
            target.config, kafka=kafka.model_dump(), database_url=target.db_url, delivery=FAST_DELIVERY
        )
        async with serve_app(create_app(settings)):
            yield target.sandbox, target.ledger


async def test_retries_then_delivers_once(service: tuple[MaxmaSandbox, Ledger], kafka: KafkaSettings) -> None:
    sandbox, ledger = service
    sandbox.add_fault({"mode": "http_status", "status": 503, "times": 1})
    sandbox.add_fault({"mode": "error_code", "code": 49, "times": 1})
    await publish_events(kafka.bootstrap_servers, client_event("e1", "100", "+79161112233"))
    key = idempotency_key("maxma", "maxma", "new-client", "e1")

    async def delivered() -> bool:
        d = await ledger.get(key)
        return d is not None and d.status is DeliveryStatus.DELIVERED

    await eventually(delivered, timeout=30, what="delivery after two retryable failures")
    assert [(r.status, r.error_code) for r in sandbox.requests] == [(503, None), (200, 49), (200, None)]
    assert len(sandbox.clients) == 1
    assert [a.outcome for a in await ledger.attempts(key)] == ["retryable", "retryable", "success"]


async def test_card_conflict_is_permanent_and_dead_lettered_with_headers(
    service: tuple[MaxmaSandbox, Ledger], kafka: KafkaSettings
) -> None:
    sandbox, ledger = service
    sandbox.add_fault({"mode": "error_code", "code": 25, "times": 1})
    await publish_events(
        kafka.bootstrap_servers,
        client_event("e25", "200", "+79162223344"),
        client_event("e-nophone", "201", None),
    )
    dead = await read_all(kafka.bootstrap_servers, dlq_topic("maxma"), expect=2, timeout=30)
    # The two events sit on different partitions: their order in the DLQ is not fixed.
    by_id = {header(list(r.headers), "ce_id"): r for r in dead}
    first, second = by_id["e25"], by_id["e-nophone"]
    h = dict((k, v.decode()) for k, v in first.headers)
    assert h["relay-dlq-class"] == "permanent"
    assert h["relay-dlq-vendor-code"] == "25"
    assert h["relay-dlq-http-status"] == "200"
    assert h["relay-dlq-attempts"] == "1"
    assert h["relay-dlq-reason"].startswith("Maxma 25")
    assert h["relay-dlq-idempotency-key"] == idempotency_key("maxma", "maxma", "new-client", "e25")
    assert datetime.fromisoformat(h["relay-dlq-first-attempt-at"]) <= datetime.fromisoformat(
        h["relay-dlq-last-attempt-at"]
    )
    assert CloudEvent.from_kafka(first.headers, first.value).id == "e25"
    # A client without a phone is never sent: Maxma cannot create one.
    assert header(list(second.headers), "ce_id") == "e-nophone"
    assert "phone" in (header(list(second.headers), "relay-dlq-reason") or "")
    assert [r.path for r in sandbox.requests] == ["/new-client"]
    assert sandbox.clients == {}

    # The dead letter is written before the ledger settles the delivery (a crash repeats it, never loses it).
    async def settled_as_failed() -> bool:
        d = await ledger.get(idempotency_key("maxma", "maxma", "new-client", "e25"))
        return d is not None and d.status is DeliveryStatus.FAILED

    await eventually(settled_as_failed, what="the delivery settled as failed")


async def test_exhausted_retries_go_to_the_dlq(
    service: tuple[MaxmaSandbox, Ledger], kafka: KafkaSettings
) -> None:
    sandbox, _ = service
    sandbox.add_fault({"mode": "http_status", "status": 502, "times": 3})
    await publish_events(kafka.bootstrap_servers, client_event("e502", "300", "+79163334455"))
    (dead,) = await read_all(kafka.bootstrap_servers, dlq_topic("maxma"), expect=1, timeout=30)
    h = dict((k, v.decode()) for k, v in dead.headers)
    assert (h["relay-dlq-class"], h["relay-dlq-http-status"], h["relay-dlq-attempts"]) == (
        "retryable",
        "502",
        "3",
    )
    assert len(sandbox.requests) == 3
    assert sandbox.clients == {}
