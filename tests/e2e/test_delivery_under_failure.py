"""The maxma process stopped gracefully or killed at random moments, under load: nothing lost, nothing twice."""

from __future__ import annotations

import signal
from pathlib import Path

from services.common.embedded import EmbeddedBroker
from services.common.events import CloudEvent
from services.common.kafka import EVENTS
from services.sandbox.maxma import MaxmaSandbox
from tests.support import (
    Roles,
    client_event,
    committed,
    event_id_of,
    eventually,
    maxma_target,
    paid_visit,
    publish_events,
    role_env,
)

N = 1500
# Paying clients in the kill and rebalance tests, and the paid visits of each (orders of two steps).
PAYERS, VISITS = 8, 6


def _paying_clients(payers: int, visits: int) -> list[CloudEvent]:
    """Each payer's new-client, then its paid visits, on the payer's key (appointment ids give the order)."""
    out: list[CloudEvent] = []
    for p in range(payers):
        phone = f"+7926{p:07d}"
        out.append(client_event(f"p{p}", f"P{p}", phone))
        out.extend(paid_visit(f"p{p}-v{v}", f"P{p}", phone, f"{p + 1}{v:04d}") for v in range(visits))
    return out


def _all_done(sandbox: MaxmaSandbox, clients: int) -> bool:
    confirmed = sum(1 for o in sandbox.orders.values() if o.status == "confirmed")
    return len(sandbox.clients) == clients + PAYERS and confirmed == PAYERS * VISITS


def _orders_once_in_order(sandbox: MaxmaSandbox) -> None:
    """Every paid visit confirmed exactly once, each payer's visits confirmed in the order they were paid."""
    orders = [o.to_dict() for o in sandbox.orders.values()]
    assert len(orders) == PAYERS * VISITS
    assert all(o["confirmations"] == 1 and o["cancellations"] == 0 for o in orders)
    for p in range(PAYERS):
        mine = sorted(
            (o for o in orders if o["orderId"].startswith(f"salon:{p + 1}")), key=lambda o: o["confirmedAt"]
        )
        assert [o["orderId"] for o in mine] == [f"salon:{p + 1}{v:04d}" for v in range(VISITS)], (
            f"payer {p} out of order"
        )


async def test_sigterm_under_load_loses_nothing_and_sends_nothing_twice(
    broker: EmbeddedBroker, kafka: object, tmp_path: Path
) -> None:
    async with maxma_target(tmp_path) as t:
        t.sandbox.set_latency(100)
        roles = Roles(role_env(t.config, broker.bootstrap_servers, t.db_url), tmp_path)
        try:
            # The whole load is waiting before the service starts, so SIGTERM always lands in the middle.
            await publish_events(
                broker.bootstrap_servers,
                *[client_event(f"e{i}", f"S{i}", f"+7916{i:07d}") for i in range(N)],
            )
            roles.start("maxma", "maxma")
            await roles.ready("maxma")
            await eventually(lambda: len(t.sandbox.requests) >= 100, what="deliveries under way")
            # uvicorn re-raises the signal after a clean shutdown: -15 is a graceful exit.
            assert await roles.terminate("maxma") in (0, -signal.SIGTERM), roles.log("maxma")[-3000:]
            assert "delivery runtime stopped" in roles.log("maxma")
            stopped_at = len(t.sandbox.requests)
            assert stopped_at < N, "the load was over before SIGTERM: the test proves nothing"

            roles.start("maxma", "maxma")
            await roles.ready("maxma")
            await eventually(lambda: len(t.sandbox.clients) == N, timeout=60, what="every client")
            await eventually(
                lambda: _all_committed(broker.bootstrap_servers, N), what="every offset committed"
            )
            ids = [event_id_of(r) for r in t.sandbox.requests]
            assert len(ids) == N
            assert len(set(ids)) == N
        finally:
            roles.stop_all()


async def _all_committed(bootstrap: str, n: int) -> bool:
    return sum((await committed(bootstrap, "relay-maxma", EVENTS)).values()) == n


async def test_rebalances_under_load_send_nothing_twice_and_keep_order(
    broker: EmbeddedBroker, kafka: object, tmp_path: Path
) -> None:
    keys, per_key = 40, 40
    async with maxma_target(tmp_path) as t:
        # Slow enough that the load outlasts both rebalances (a cheaper ledger once delivered it all first).
        t.sandbox.set_latency(60)
        roles = Roles(role_env(t.config, broker.bootstrap_servers, t.db_url), tmp_path)
        try:
            for k in range(keys):
                await publish_events(
                    broker.bootstrap_servers,
                    *[client_event(f"k{k}-{j}", f"R{k}-{j}", f"+7977{k:03d}{j:04d}") for j in range(per_key)],
                    key=f"salon:R{k}",
                )
            await publish_events(broker.bootstrap_servers, *_paying_clients(PAYERS, VISITS))
            roles.start("a", "maxma")
            await roles.ready("a")
            await eventually(lambda: len(t.sandbox.requests) >= 150, what="a delivering")
            # b joins: a gives up half its partitions mid-flight.
            roles.start("b", "maxma")
            await roles.ready("b")
            before = len(t.sandbox.requests)
            await eventually(
                lambda: len(t.sandbox.requests) >= before + 300, timeout=30, what="both delivering"
            )
            # a leaves: b takes everything.
            assert await roles.terminate("a") in (0, -signal.SIGTERM)
            assert len(t.sandbox.requests) < keys * per_key, "the load was over before the second rebalance"
            await eventually(
                lambda: _all_done(t.sandbox, keys * per_key), timeout=90, what="every client and order"
            )
        finally:
            roles.stop_all()

    _orders_once_in_order(t.sandbox)
    # Each order's two steps were sent once each: no step repeated across the rebalances.
    for path in ("/v2/set-order", "/confirm-order"):
        assert sum(1 for r in t.sandbox.requests if r.path == path) == PAYERS * VISITS, path
    ids = [
        event_id_of(r)
        for r in t.sandbox.requests
        if r.path == "/new-client" and not r.body["client"]["externalId"].startswith("P")
    ]
    assert len(ids) == keys * per_key  # each event exactly one request: nothing twice across the rebalances
    assert len(set(ids)) == keys * per_key
    for k in range(keys):
        seq = [int(i.rsplit("-", 1)[1]) for i in ids if i.startswith(f"k{k}-")]
        assert seq == list(range(per_key)), f"key {k} out of order"
