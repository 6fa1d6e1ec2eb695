"""Kafka away at the door: webhooks go to the SQL spool, still 202, and reach the inbox in order later."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from services.common.config import KafkaSettings, Settings
from services.common.embedded import EmbeddedBroker
from services.common.kafka import INBOX
from services.common.ledger import Ledger, migrate
from services.ingest.api import create_api
from services.ingest.inbox import InboxRecord
from tests.support import eventually, read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"
OTHER = "other-token-0123456789abcdef"


def _settings(kafka: KafkaSettings, database_url: str, **ingest: object) -> Settings:
    return Settings.model_validate(
        {
            "kafka": kafka.model_dump() | {"request_timeout_ms": 1000},
            "database_url": database_url,
            "ingest": {"publish_timeout_s": 1.0} | ingest,
            "sources": [{"name": "salon", "token": TOKEN}, {"name": "other", "token": OTHER}],
        }
    )


def _hook(client_id: int, event: str = "client-created", token: str = TOKEN) -> str:
    return f"/hooks/klientiks/{token}/{event}?client_id={client_id}&client_phone=7916123{client_id:04d}"


async def _inbox_until(bootstrap: str, ids: list[str]) -> list[InboxRecord]:
    """The inbox up to the point every one of ``ids`` is there (a timed-out send may add copies)."""
    wanted = set(ids)
    recs = await read_all(
        bootstrap, INBOX, expect=0, timeout=45,  # the spool backs off up to 5 s between tries
        done=lambda rs: wanted <= {InboxRecord.from_bytes(r.value).id for r in rs},
    )  # fmt: skip
    return [InboxRecord.from_bytes(r.value) for r in recs]


async def test_a_stopped_broker_means_spooled_202s_published_in_order_when_it_is_back(
    kafka: KafkaSettings, broker: EmbeddedBroker, db_url: str
) -> None:
    await migrate(db_url)
    async with (
        serve_app(create_api(_settings(kafka, db_url))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        spooled_before = _sample(
            "relay_webhooks_received_total", source="salon", event="client-created", outcome="spooled"
        )
        first = await http.get(_hook(1))
        assert first.status_code == 202
        broker.stop()
        ids = []
        for i in range(2, 12):  # one client's webhooks, sequential: their order is defined
            r = await http.get(_hook(7) + f"&n={i}")
            assert r.status_code == 202, r.text
            ids.append(r.json()["event_id"])
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert "kafka unreachable" in ready.text
        assert "spool ok" in ready.text
        assert _sample("relay_ingest_spool_depth") == 10
        assert (
            _sample(
                "relay_webhooks_received_total", source="salon", event="client-created", outcome="spooled"
            )
            == spooled_before + 10
        )

        restarted = EmbeddedBroker(port=broker.port).start()  # empty: Tansu keeps nothing
        try:
            recs = await _inbox_until(restarted.bootstrap_servers, ids)
            assert list(dict.fromkeys(r.id for r in recs)) == ids
            await eventually(lambda: _empty(db_url), what="an empty spool")
            # The direct path is back: the next webhook is published, not spooled.
            after = await http.get(_hook(7) + "&n=after")
            assert after.status_code == 202
            recs = await _inbox_until(restarted.bootstrap_servers, [*ids, after.json()["event_id"]])
            assert list(dict.fromkeys(r.id for r in recs))[-1] == after.json()["event_id"]
            assert _sample("relay_ingest_spool_depth") == 0
        finally:
            restarted.stop()


def _sample(name: str, **labels: str) -> float:
    # The API runs in this process: its metrics are this registry's.
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _empty(db_url: str) -> bool:
    return await _depth(db_url) == 0


async def _depth(db_url: str) -> int:
    ledger = Ledger.from_url(db_url)
    try:
        return await ledger.spool_depth()
    finally:
        await ledger.close()


async def test_the_spool_outlives_the_process_and_drains_on_the_next_start(
    kafka: KafkaSettings, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    url_db = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    await migrate(url_db)
    broker.stop()
    async with (
        serve_app(create_api(_settings(kafka, url_db))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        ids = [(await http.get(_hook(i))).json()["event_id"] for i in range(5)]
    assert await _depth(url_db) == 5
    restarted = EmbeddedBroker(port=broker.port).start()
    try:
        async with serve_app(create_api(_settings(kafka, url_db))):
            recs = await _inbox_until(restarted.bootstrap_servers, ids)
            assert sorted({r.id for r in recs}) == sorted(ids)  # five clients: no order between them
            await eventually(lambda: _empty(url_db), what="an empty spool")
    finally:
        restarted.stop()


async def test_503_only_when_kafka_and_the_spool_are_both_down(
    kafka: KafkaSettings, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    unreachable = f"sqlite+aiosqlite:///{tmp_path / 'missing-dir' / 'relay.db'}"
    async with (
        serve_app(create_api(_settings(kafka, unreachable))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        ok = await http.get(_hook(1))
        assert ok.status_code == 202  # Kafka alone is enough
        assert (await http.get("/readyz")).status_code == 200
        broker.stop()
        r = await http.get(_hook(2))
        assert r.status_code == 503
        assert "event_id" not in r.text
        assert (await http.get("/readyz")).status_code == 503


async def test_a_hung_broker_is_given_the_publish_timeout_then_the_spool_takes_over(
    kafka: KafkaSettings, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    url_db = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    await migrate(url_db)
    async with (
        serve_app(create_api(_settings(kafka, url_db))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        assert (await http.get(_hook(7) + "&n=1")).status_code == 202
        broker.pause()
        try:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            slow = await http.get(_hook(7) + "&n=2")
            first_wait = loop.time() - t0
            t0 = loop.time()
            fast = await http.get(_hook(7) + "&n=3")
            second_wait = loop.time() - t0
        finally:
            broker.resume()
        assert slow.status_code == fast.status_code == 202
        # The first waits out the publish timeout (1 s here, at most 5 s by configuration); later ones
        # go straight to the spool while it holds anything.
        assert 0.9 < first_wait < 3
        assert second_wait < 0.9
        recs = await _inbox_until(
            broker.bootstrap_servers, [slow.json()["event_id"], fast.json()["event_id"]]
        )
        # One client: its webhooks' order is defined (first copies; a timed-out send may land twice).
        first_seen = list(dict.fromkeys(r.id for r in recs))
        assert first_seen[-2:] == [slow.json()["event_id"], fast.json()["event_id"]], first_seen


async def test_rate_limit_is_per_token_and_says_when_to_come_back(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    url_db = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    settings = _settings(kafka, url_db, rate_limit_per_s=0.5, rate_limit_burst=3)
    async with serve_app(create_api(settings, migrate=True)) as url, httpx.AsyncClient(base_url=url) as http:
        limited_before = _sample(
            "relay_webhooks_received_total", source="salon", event="client-created", outcome="rate_limited"
        )
        codes = [(await http.get(_hook(i))).status_code for i in range(4)]
        assert codes == [202, 202, 202, 429]
        limited = await http.get(_hook(9))
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "2"
        assert "rate limit" in limited.json()["detail"]
        # Another source's token has its own bucket.
        assert (await http.get(_hook(1, token=OTHER))).status_code == 202
        assert (
            _sample(
                "relay_webhooks_received_total",
                source="salon",
                event="client-created",
                outcome="rate_limited",
            )
            == limited_before + 2
        )
    recs = await read_all(kafka.bootstrap_servers, INBOX, expect=5, timeout=3)
    assert len(recs) == 4  # nothing published from a refused request


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_rate_limit_must_be_positive(rate: float) -> None:
    with pytest.raises(ValueError, match="rate_limit_per_s"):
        Settings.model_validate({"ingest": {"rate_limit_per_s": rate}})
