"""A seed-style webhook sent to the running ingest API reaches the sandbox Maxma exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from services.common.embedded import EmbeddedBroker
from services.common.ledger import DeliveryStatus, Ledger, idempotency_key
from services.sandbox.maxma import MaxmaSandbox
from tests.support import (
    SOURCE_TOKEN,
    Roles,
    committed,
    eventually,
    maxma_target,
    role_env,
)

# The "Добавление клиента" template of the seeds, rendered by Klientiks for a real-looking client.
SEED_QUERY = {
    "client_id": "6439301",
    "client_phone": "79161234567",
    "client_name": "Иванова Анна Сергеевна",
    "client_first_name": "Анна",
    "client_patron_name": "Сергеевна",
    "client_second_name": "Иванова",
    "client_deleted": "false",
    "client_email": "anna.ivanova@mail.ru",
}


@dataclass
class Stack:
    roles: Roles
    sandbox: MaxmaSandbox
    ledger: Ledger
    bootstrap: str


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    async with maxma_target(tmp_path) as target:
        roles = Roles(role_env(target.config, broker.bootstrap_servers, target.db_url), tmp_path)
        try:
            roles.start("api", "ingest", "api")
            roles.start("normalizer", "ingest", "normalizer")
            roles.start("maxma", "maxma")
            await roles.ready("api", "normalizer", "maxma")
            yield Stack(roles, target.sandbox, target.ledger, broker.bootstrap_servers)
        finally:
            roles.stop_all()


async def _consumer_caught_up(bootstrap: str, group: str, topic: str, expected_total: int) -> bool:
    return sum((await committed(bootstrap, group, topic)).values()) >= expected_total


async def test_webhook_reaches_sandbox_maxma_exactly_once(stack: Stack) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(
            f"{stack.roles.url('api')}/hooks/klientiks/{SOURCE_TOKEN}/client-created", params=SEED_QUERY
        )
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]

    await eventually(lambda: len(stack.sandbox.clients) == 1, timeout=30, what="the client in Maxma")
    (client,) = stack.sandbox.clients.values()
    assert client.phone_number == "+79161234567"
    assert client.external_id == "6439301"
    assert client.full_name == "Иванова Анна Сергеевна"
    assert client.email == "anna.ivanova@mail.ru"

    # Both consumers commit what they did; then nothing else may reach Maxma.
    await eventually(
        lambda: _consumer_caught_up(stack.bootstrap, "relay-maxma", "klientiks.events.v1", 1),
        what="the maxma offsets committed",
    )
    await asyncio.sleep(1.0)
    sent = [q for q in stack.sandbox.requests if q.path == "/new-client"]
    assert len(sent) == 1
    assert sent[0].headers["idempotency-key"] == idempotency_key("maxma", "maxma", "new-client", event_id)

    delivery = await stack.ledger.get(idempotency_key("maxma", "maxma", "new-client", event_id))
    assert delivery is not None
    assert delivery.status is DeliveryStatus.DELIVERED
    assert delivery.attempts == 1

    # A restarted maxma service resumes after the committed offset: no second request.
    stack.roles.stop("maxma")
    stack.roles.start("maxma", "maxma")
    await stack.roles.ready("maxma")
    await asyncio.sleep(3.0)  # a Tansu group join takes session_timeout/2 (1.5 s here); time to (not) re-read
    assert len([q for q in stack.sandbox.requests if q.path == "/new-client"]) == 1
    assert len(stack.sandbox.clients) == 1


async def test_unknown_token_answers_like_an_unknown_path(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.roles.url("api")) as http:
        bad_token = await http.get(
            "/hooks/klientiks/not-the-token-at-all-123/client-created", params=SEED_QUERY
        )
        bad_event = await http.get(f"/hooks/klientiks/{SOURCE_TOKEN}/client-deleted", params=SEED_QUERY)
        no_route = await http.get("/no/such/path", params=SEED_QUERY)
    for r in (bad_token, bad_event):
        assert r.status_code == no_route.status_code == 404
        assert r.content == no_route.content
        assert {k: v for k, v in r.headers.items() if k != "date"} == {
            k: v for k, v in no_route.headers.items() if k != "date"
        }
    await asyncio.sleep(0.5)
    assert stack.sandbox.requests == []
