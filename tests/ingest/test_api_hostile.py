"""Issue 8, part 1: the ingest API refuses a lone surrogate with a 400, never a 500, and publishes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.common.config import KafkaSettings, Settings
from services.common.embedded import EmbeddedBroker
from services.common.kafka import INBOX
from services.ingest.api import create_api
from tests.support import read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"


@pytest.fixture
async def api(kafka: KafkaSettings, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings.model_validate(
        {"kafka": kafka.model_dump(), "database_url": f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
         "sources": [{"name": "salon", "token": TOKEN}]}
    )  # fmt: skip
    async with serve_app(create_api(settings, migrate=True)) as url, httpx.AsyncClient(base_url=url) as http:
        yield http


@pytest.mark.parametrize(
    "body",
    [
        b'{"client_id":"1","client_phone":"79169000001","client_name":"Ann\\ud800a"}',  # the case
        b'{"client_id":"\\ud800","client_phone":"79169000001"}',
        b'{"client_id":"1","\\udfff":"x"}',
        b'{"client_id":"1","services":["\\udbff"]}',
        b'{"client_id":"1","client_name":{"nested":"\\ud800"}}',
    ],
)
async def test_a_lone_surrogate_anywhere_in_a_json_body_is_a_400(
    api: httpx.AsyncClient, broker: EmbeddedBroker, body: bytes
) -> None:
    r = await api.post(f"/hooks/klientiks/{TOKEN}/client-created", content=body,
                       headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    assert "lone surrogate" in r.json()["detail"]
    ok = await api.get(f"/hooks/klientiks/{TOKEN}/client-created", params={"client_id": "2"})
    assert ok.status_code == 202
    # Only the valid webhook reached the inbox.
    (rec,) = await read_all(broker.bootstrap_servers, INBOX, expect=1, timeout=10)
    assert rec.key == b"salon:2"


async def test_bytes_that_are_not_utf8_in_a_query_are_accepted_and_kept_as_sent(
    api: httpx.AsyncClient, broker: EmbeddedBroker
) -> None:
    r = await api.get(f"/hooks/klientiks/{TOKEN}/client-created?client_id=1&client_name=%D0%98%D0%B2%D0")
    assert r.status_code == 202
    (rec,) = await read_all(broker.bootstrap_servers, INBOX, expect=1, timeout=10)
    assert b"client_name=%D0%98%D0%B2%D0" in rec.value  # raw data is never lost; the normalizer lists it
