"""The ingest API on real HTTP and a real broker: what it publishes, what it refuses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.common.config import KafkaSettings, Settings
from services.common.embedded import EmbeddedBroker
from services.common.kafka import INBOX
from services.ingest.api import create_api
from services.ingest.inbox import InboxRecord
from tests.support import read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"


def _settings(kafka: KafkaSettings, database_url: str, **ingest: object) -> Settings:
    return Settings.model_validate(
        {
            "kafka": kafka.model_dump(),
            "database_url": database_url,
            "ingest": ingest,
            "sources": [{"name": "salon", "token": TOKEN}],
        }
    )


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"


@pytest.fixture
async def api(kafka: KafkaSettings, sqlite_url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_api(_settings(kafka, sqlite_url), migrate=True)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url) as http:
        yield http


async def test_get_with_seed_query_is_published_raw_with_the_client_key(
    api: httpx.AsyncClient, broker: EmbeddedBroker
) -> None:
    query = (
        "client_id=6439301&client_phone=79161234567&client_name=%D0%98%D0%B2%D0%B0%D0%BD%D0%BE%D0%B2%D0%B0"
    )
    r = await api.get(f"/hooks/klientiks/{TOKEN}/client-created?{query}")
    assert r.status_code == 202
    event_id = r.json()["event_id"]
    (rec,) = await read_all(broker.bootstrap_servers, INBOX, expect=1)
    assert rec.key == b"salon:6439301"
    record = InboxRecord.from_bytes(rec.value)
    assert (record.id, record.source, record.event, record.method, record.query) == (
        event_id,
        "salon",
        "client-created",
        "GET",
        query,
    )
    assert record.received_at.tzinfo is not None


async def test_post_form_and_json_bodies_are_kept_as_received(
    api: httpx.AsyncClient, broker: EmbeddedBroker
) -> None:
    form = await api.post(
        f"/hooks/klientiks/{TOKEN}/appointment-created?appointment_id=77",
        data={"client_id": "5", "services": "Стрижка, Укладка"},
    )
    body = {"appointment_id": "78", "status": "confirmed"}
    js = await api.post(f"/hooks/klientiks/{TOKEN}/appointment-changed", json=body)
    assert form.status_code == js.status_code == 202
    recs = await read_all(broker.bootstrap_servers, INBOX, expect=2)
    by_key = {r.key: InboxRecord.from_bytes(r.value) for r in recs}
    assert (
        by_key[b"salon:5"].body
        == "client_id=5&services=%D0%A1%D1%82%D1%80%D0%B8%D0%B6%D0%BA%D0%B0%2C+%D0%A3%D0%BA%D0%BB%D0%B0%D0%B4%D0%BA%D0%B0"
    )
    assert by_key[b"salon:5"].query == "appointment_id=77"
    assert json.loads(by_key[b"salon:appointment:78"].body) == body
    assert by_key[b"salon:appointment:78"].content_type == "application/json"


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400),
        # JSON must be UTF-8; a form's values that are not are listed invalid by the normalizer instead.
        ({"content": b'{"client_id": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400),
        ({"content": b"x" * (64 * 1024 + 1), "headers": {"content-type": "text/plain"}}, 413),
    ],
)
async def test_bad_bodies_get_a_clear_error_and_nothing_is_published(
    api: httpx.AsyncClient, broker: EmbeddedBroker, kwargs: dict[str, object], status: int
) -> None:
    r = await api.post(f"/hooks/klientiks/{TOKEN}/client-created?client_id=1", **kwargs)  # type: ignore[arg-type]
    assert r.status_code == status
    assert r.json()["detail"]
    ok = await api.get(f"/hooks/klientiks/{TOKEN}/client-created?client_id=2")
    assert ok.status_code == 202
    recs = await read_all(broker.bootstrap_servers, INBOX, expect=2, timeout=3)
    assert [r.key for r in recs] == [b"salon:2"]


async def test_long_query_is_414(api: httpx.AsyncClient) -> None:
    r = await api.get(f"/hooks/klientiks/{TOKEN}/client-created?client_id=1&x={'a' * 8200}")
    assert r.status_code == 414


async def test_health_and_metrics(api: httpx.AsyncClient) -> None:
    assert (await api.get("/healthz")).text == "ok"
    await api.get(f"/hooks/klientiks/{TOKEN}/client-created?client_id=3")
    metrics = (await api.get("/metrics/")).text
    assert (
        'relay_webhooks_received_total{event="client-created",outcome="accepted",source="salon"}' in metrics
    )
    assert TOKEN not in metrics
