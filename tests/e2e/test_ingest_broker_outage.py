"""The broker goes away under load: every 202 reaches the inbox, each client's webhooks in order."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import httpx
import pytest

from services.common.config import KafkaSettings, Settings
from services.common.embedded import EmbeddedBroker
from services.common.kafka import INBOX
from services.common.ledger import migrate
from services.ingest.api import create_api
from services.ingest.inbox import InboxRecord
from tests.support import read_all, serve_app

TOKEN = "salon-token-0123456789abcdef"
WORKERS = 12
CLIENTS_PER_WORKER = 3
RATE_PER_WORKER = 8.0  # about 100 webhooks/s in all


class Load:
    """Workers that each own a few clients and send their webhooks one after another."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.sent: dict[str, list[str]] = {}  # client id -> accepted event ids, in order
        self.since = 0.0  # only requests started after this count (see the dead-broker test)
        self.refused: list[int] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(w)) for w in range(WORKERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def accepted(self) -> int:
        return sum(len(v) for v in self.sent.values())

    async def _worker(self, w: int) -> None:
        clients = [f"{w}{c:02d}" for c in range(CLIENTS_PER_WORKER)]
        for n in itertools.count():
            if self._stop.is_set():
                return
            client = clients[n % len(clients)]
            url = f"/hooks/klientiks/{TOKEN}/appointment-created?client_id={client}&appointment_id={n}&client_phone=79161234567"
            started = asyncio.get_running_loop().time()
            r = await self.http.get(url)
            if started < self.since:
                continue
            if r.status_code == 202:
                self.sent.setdefault(client, []).append(r.json()["event_id"])
            else:
                self.refused.append(r.status_code)
            await asyncio.sleep(1 / RATE_PER_WORKER)


def _settings(kafka: KafkaSettings, db: str) -> Settings:
    return Settings.model_validate(
        {
            "kafka": kafka.model_dump() | {"request_timeout_ms": 1000},
            "database_url": db,
            "ingest": {"publish_timeout_s": 2.0},
            "sources": [{"name": "salon", "token": TOKEN}],
        }
    )


async def _inbox_until(bootstrap: str, load: Load) -> list[InboxRecord]:
    """The inbox until every accepted id is in it (a timed-out send may add copies, so counting won't do)."""
    wanted = {i for ids in load.sent.values() for i in ids}
    records = await read_all(
        bootstrap, INBOX, expect=0, timeout=30,
        done=lambda rs: len(rs) >= len(wanted) and wanted <= {InboxRecord.from_bytes(r.value).id for r in rs},
    )  # fmt: skip
    return [InboxRecord.from_bytes(r.value) for r in records]


def _check(load: Load, records: list[InboxRecord]) -> None:
    assert load.refused == []
    arrived = list(dict.fromkeys(r.id for r in records))  # a timed-out send may land twice
    assert set(arrived) >= {i for ids in load.sent.values() for i in ids}, "a 202 never reached the inbox"
    position = {event_id: n for n, event_id in enumerate(arrived)}
    for client, ids in load.sent.items():
        assert sorted(ids, key=position.__getitem__) == ids, f"client {client} out of order"


@pytest.mark.timeout(120)
async def test_a_hung_broker_under_load_loses_nothing(
    kafka: KafkaSettings, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    await migrate(db)
    async with (
        serve_app(create_api(_settings(kafka, db))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        load = Load(http)
        load.start()
        await asyncio.sleep(3)
        broker.pause()
        await asyncio.sleep(6)
        during = load.accepted()
        broker.resume()
        await asyncio.sleep(5)
        await load.stop()
    total = load.accepted()
    assert total > 800
    assert during > 150  # the outage was under load (a quarter of the asked rate, even on a slow VM)
    records = await _inbox_until(broker.bootstrap_servers, load)
    _check(load, records)


@pytest.mark.timeout(120)
async def test_a_dead_broker_under_load_loses_nothing_and_a_new_one_gets_everything(
    kafka: KafkaSettings, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    db = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    await migrate(db)
    async with (
        serve_app(create_api(_settings(kafka, db))) as url,
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        load = Load(http)
        load.start()
        await asyncio.sleep(2)
        broker.stop()
        # Tansu keeps nothing: what it took before dying is gone with it, so count what was sent after.
        load.since = asyncio.get_running_loop().time()
        load.sent.clear()
        await asyncio.sleep(6)
        during = load.accepted()
        restarted = EmbeddedBroker(port=broker.port).start()
        try:
            await asyncio.sleep(6)  # the spool drains while webhooks keep coming
            await load.stop()
            records = await _inbox_until(restarted.bootstrap_servers, load)
        finally:
            restarted.stop()
    assert during > 150  # as above
    _check(load, records)
