"""The delivery runtime's promises, on a real broker, a real ledger and the sandbox Maxma with faults."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.config import KafkaSettings, load_settings
from services.common.kafka import EVENTS
from services.common.metrics import CIRCUITS_OPEN
from services.common.ops import DlqFilter, read_dlq, replay
from services.maxma.app import create_app
from tests.support import (
    FAST_DELIVERY,
    MAXMA_KEY,
    SOURCE_TOKEN,
    Target,
    client_event,
    committed,
    event_id_of,
    eventually,
    maxma_target,
    paid_visit,
    publish_events,
    serve_app,
)


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_SOURCE_TOKEN", SOURCE_TOKEN)
    monkeypatch.setenv("RELAY_TEST_MAXMA_KEY", MAXMA_KEY)


@contextlib.asynccontextmanager
async def running(
    kafka: KafkaSettings, tmp_path: Path, delivery: dict[str, Any] | None = None, **connection: object
) -> AsyncIterator[Target]:
    async with maxma_target(tmp_path, **connection) as target:
        settings = load_settings(
            target.config,
            kafka=kafka.model_dump(),
            database_url=target.db_url,
            delivery={**FAST_DELIVERY, **(delivery or {})},
        )
        app = create_app(settings)
        target.runtime = app.state.runtime
        async with serve_app(app):
            yield target


def _client(request: Any) -> str:
    return str(request.body["client"]["externalId"])


def _answered(target: Target, client: str) -> list[Any]:
    return [r for r in target.sandbox.requests if _client(r) == client and r.status is not None]


async def test_a_retried_key_holds_back_only_its_own_events(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, {"retry_schedule": "0,0.5s"}) as t:
        t.sandbox.add_fault({"mode": "http_status", "status": 503, "times": 2, "match": {"externalId": "A"}})
        await publish_events(
            kafka.bootstrap_servers,
            *[client_event(f"a{i}", "A", "+79160000001") for i in range(3)],
            *[client_event(f"b{i}", f"B{i}", f"+7916000010{i}") for i in range(5)],
        )
        await eventually(lambda: len(_answered(t, "A")) == 5, what="A's three events")
        await eventually(lambda: len(t.sandbox.clients) == 6, what="every client")
        a = _answered(t, "A")
        assert [event_id_of(r) for r in a] == ["a0", "a0", "a0", "a1", "a2"]
        assert [r.status for r in a] == [503, 503, 200, 200, 200]
        # The other keys did not wait for A's retries.
        others = [r for r in t.sandbox.requests if _client(r).startswith("B")]
        assert len(others) == 5
        assert max(r.time for r in others) < a[2].time


async def test_a_late_retry_is_parked_and_the_offsets_move_on(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, {"retry_schedule": "0,3s", "hold_in_memory_s": 0.1}) as t:
        t.sandbox.add_fault({"mode": "http_status", "status": 503, "times": 2, "match": {"externalId": "A"}})
        await publish_events(
            kafka.bootstrap_servers,
            *[client_event(f"a{i}", "A", "+79160000001") for i in range(3)],
            *[client_event(f"b{i}", f"B{i}", f"+7916000010{i}") for i in range(3)],
        )

        # a0 waits for its retry in the ledger, a1 and a2 behind it; every offset is committed meanwhile.
        async def parked_and_committed() -> bool:
            offsets = await committed(kafka.bootstrap_servers, "relay-maxma", EVENTS)
            return await t.ledger.parked_count("maxma") == 3 and sum(offsets.values()) == 6

        await eventually(parked_and_committed, timeout=15, what="A parked and all offsets committed")
        assert len(_answered(t, "A")) == 2
        assert len(t.sandbox.clients) == 3

        await eventually(lambda: len(_answered(t, "A")) == 5, timeout=20, what="A delivered after its retry")
        assert [event_id_of(r) for r in _answered(t, "A")] == ["a0", "a0", "a0", "a1", "a2"]

        async def nothing_parked() -> bool:
            return await t.ledger.parked_count("maxma") == 0

        await eventually(nothing_parked, timeout=5, what="nothing parked")


async def test_retry_after_of_a_429_is_respected(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, {"throttle_floor_s": 1.0}) as t:
        t.sandbox.add_fault(
            {"mode": "http_status", "status": 429, "retry_after": 2, "times": 1, "match": {"externalId": "A"}}
        )
        await publish_events(kafka.bootstrap_servers, client_event("a0", "A", "+79160000001"))
        await eventually(lambda: len(_answered(t, "A")) == 2, timeout=15, what="the retry after the 429")
        first, second = _answered(t, "A")
        assert first.status == 429
        assert second.status == 200
        assert second.time - first.time >= 2.0


async def test_the_circuit_opens_parks_without_burning_attempts_and_recovers(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    delivery = {"retry_schedule": "0,0.3s,0.3s,0.3s", "circuit_failures": 3, "circuit_open_s": 1.0}
    async with running(kafka, tmp_path, delivery) as t:
        t.sandbox.add_fault({"mode": "http_status", "status": 503, "times": 1000})
        await publish_events(
            kafka.bootstrap_servers, *[client_event(f"e{i}", f"C{i}", f"+7916000020{i}") for i in range(8)]
        )
        await eventually(lambda: CIRCUITS_OPEN.labels("maxma")._value.get() >= 1, what="the circuit to open")

        async def some_parked() -> bool:
            return await t.ledger.parked_count("maxma") > 0

        await eventually(some_parked, what="parked deliveries")
        during_outage = len(t.sandbox.requests)
        t.sandbox.clear_faults()
        await eventually(lambda: len(t.sandbox.clients) == 8, timeout=30, what="every client after recovery")
        assert CIRCUITS_OPEN.labels("maxma")._value.get() == 0
        # While open, the circuit let only a few probes through instead of 8 events x 5 attempts.
        assert during_outage < 8 * 5

        async def deliveries() -> list[Any]:
            return [await t.ledger.get(f"maxma:maxma:new-client:e{i}") for i in range(8)]

        # The sandbox saw the request a moment before the ledger's group commit records the success.
        async def all_delivered() -> bool:
            return all(d is not None and d.status.value == "delivered" for d in await deliveries())

        await eventually(all_delivered, timeout=10, what="every delivery recorded as delivered")
        for d in await deliveries():
            assert d is not None
            assert d.status.value == "delivered"
            # Parking for the circuit did not count as attempts: nobody ran out of its five.
            assert d.attempts <= 5


async def test_the_rate_limit_holds_under_load(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, rate_limit_per_s=10) as t:
        await publish_events(
            kafka.bootstrap_servers,
            *[client_event(f"e{i}", f"R{i}", f"+791600030{i:02d}") for i in range(40)],
        )
        await eventually(lambda: len(t.sandbox.clients) == 40, timeout=30, what="every client")
        times = sorted(r.time for r in t.sandbox.requests)
        # A full bucket (10) at once, then 10 a second: 40 requests take at least 3 s.
        assert times[-1] - times[0] >= 2.9
        for i, start in enumerate(times):
            in_window = sum(1 for x in times[i:] if x - start < 1.0)
            assert in_window <= 20


async def test_a_replayed_dead_letter_is_delivered_once(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path) as t:
        t.sandbox.add_fault({"mode": "error_code", "code": 25, "times": 1, "match": {"externalId": "D"}})
        await publish_events(
            kafka.bootstrap_servers,
            client_event("d0", "D", "+79160000009"),
            client_event("x0", "X", "+79160000010"),
        )
        await eventually(lambda: len(t.sandbox.requests) == 2, what="both attempts")
        flt = DlqFilter(targets=("maxma",))
        await eventually(lambda: _dead_letters(kafka, flt, 1), what="the dead letter")
        (dead,) = await read_dlq(kafka.bootstrap_servers, ["maxma"], flt)
        assert (dead.event_id, dead.vendor_code, dead.conn_id) == ("d0", "25", "salon/maxma")

        # The card conflict is fixed in Maxma; the operator replays: one new attempt, the client exists.
        assert await replay(kafka.bootstrap_servers, [dead]) == 1
        await eventually(lambda: len(t.sandbox.clients) == 2, what="the replayed client")

        async def replay_recorded() -> bool:
            # The ledger's group commit lands a moment after the sandbox saw the request.
            d = await t.ledger.get("maxma:maxma:new-client:d0")
            return d is not None and d.status.value == "delivered"

        await eventually(replay_recorded, timeout=10, what="the replay recorded as delivered")
        d = await t.ledger.get("maxma:maxma:new-client:d0")
        assert d is not None
        assert d.status.value == "delivered"

        # Replaying again (or a duplicate dead letter) never reaches Maxma a second time.
        assert await replay(kafka.bootstrap_servers, [dead]) == 1
        await eventually(lambda: _all_committed(kafka, 4), what="the second replay read")
        sent = [event_id_of(r) for r in t.sandbox.requests]
        assert sorted(sent) == ["d0", "d0", "x0"]  # d0: the conflict, then the replay; never a third time


async def _dead_letters(kafka: KafkaSettings, flt: DlqFilter, n: int) -> bool:
    return len(await read_dlq(kafka.bootstrap_servers, ["maxma"], flt)) >= n


async def _all_committed(kafka: KafkaSettings, n: int) -> bool:
    return sum((await committed(kafka.bootstrap_servers, "relay-maxma", EVENTS)).values()) >= n


async def test_a_full_buffer_pauses_the_partitions(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, {"max_buffered": 20, "max_in_flight": 10}) as t:
        t.sandbox.set_latency(100)
        await publish_events(
            kafka.bootstrap_servers, *[client_event(f"e{i}", f"P{i}", f"+7926{i:07d}") for i in range(1500)]
        )
        peak = 0

        async def done_watching() -> bool:
            nonlocal peak
            peak = max(peak, t.runtime.buffered)
            return len(t.sandbox.requests) >= 200

        await eventually(done_watching, timeout=60, interval=0.01, what="200 deliveries")
        # One fetch (at most 500 records) may land after the threshold; never the 1,500 waiting.
        assert 0 < peak <= 20 + 500
        assert len(t.sandbox.requests) < 1500


async def test_a_partition_that_cannot_commit_makes_the_service_not_ready_until_it_moves(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    async with maxma_target(tmp_path) as t:
        settings = load_settings(
            t.config, kafka={**kafka.model_dump(), "stall_after_s": 1.0}, database_url=t.db_url,
            delivery=FAST_DELIVERY,
        )  # fmt: skip
        t.sandbox.add_fault({"mode": "delay", "seconds": 4, "times": 1, "match": {"externalId": "A"}})
        async with serve_app(create_app(settings)) as url, httpx.AsyncClient(base_url=url) as http:
            await publish_events(kafka.bootstrap_servers, client_event("a0", "A", "+79160000001"))

            async def status() -> int:
                return (await http.get("/readyz")).status_code

            await eventually(lambda: _is(status, 503), timeout=10, what="not ready while A hangs")
            answer = await http.get("/readyz")
            assert "stalled: relay-maxma not_committing" in answer.text
            await eventually(lambda: _is(status, 200), timeout=15, what="ready once A is delivered")
            assert len(t.sandbox.clients) == 1


async def _is(check: Any, expected: int) -> bool:
    return bool(await check() == expected)


async def test_a_replayed_order_resumes_at_its_confirm(kafka: KafkaSettings, tmp_path: Path) -> None:
    # The confirm is refused (a rule in Maxma); once fixed, the replay confirms without a second set-order.
    async with running(kafka, tmp_path) as t:
        t.sandbox.run_operation("/new-client", {"client": {"phoneNumber": "+79160000011", "externalId": "P"}})
        t.sandbox.add_fault({"mode": "error_code", "code": 33, "times": 1, "path": "/confirm-order"})
        await publish_events(kafka.bootstrap_servers, paid_visit("p0", "P", "+79160000011", "9001"))
        flt = DlqFilter(targets=("maxma",))
        await eventually(lambda: _dead_letters(kafka, flt, 1), what="the dead letter")
        (dead,) = await read_dlq(kafka.bootstrap_servers, ["maxma"], flt)
        assert (dead.event_id, dead.action, dead.vendor_code) == ("p0", "set-order", "33")
        assert t.sandbox.orders["salon:9001"].status == "new"

        assert await replay(kafka.bootstrap_servers, [dead]) == 1
        await eventually(
            lambda: t.sandbox.orders["salon:9001"].status == "confirmed", what="the replay confirmed"
        )
        await eventually(lambda: _all_committed(kafka, 2), what="the replay read")
        paths = [r.path for r in t.sandbox.requests if r.path != "/new-client"]
        assert paths == ["/v2/set-order", "/confirm-order", "/confirm-order"]
        assert t.sandbox.orders["salon:9001"].to_dict()["confirmations"] == 1
