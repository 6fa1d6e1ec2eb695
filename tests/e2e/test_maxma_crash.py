"""The maxma process dies after Maxma answered but before its offset was committed: no second client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from services.common.embedded import EmbeddedBroker
from services.common.failpoints import EXIT_CODE
from services.common.kafka import EVENTS
from services.common.ledger import DeliveryStatus, idempotency_key
from tests.support import (
    Roles,
    client_event,
    committed,
    eventually,
    maxma_target,
    paid_visit,
    publish_events,
    role_env,
)


@pytest.mark.parametrize(
    ("failpoint", "requests_after_restart"),
    [
        # Killed before the ledger knew: the retry meets Maxma's natural key (externalId), not a new client;
        # the client's fingerprint (queued, not awaited) died with the process, so the retry also sends one
        # update-client with the same data.
        ("maxma.after_send", 3),
        # Killed after the ledger write: the retry is skipped, Maxma never hears of it again.
        ("maxma.after_record", 1),
    ],
)
async def test_killed_before_commit_creates_the_client_once(
    broker: EmbeddedBroker, kafka: object, tmp_path: Path, failpoint: str, requests_after_restart: int
) -> None:
    async with maxma_target(tmp_path) as target:
        sandbox, ledger = target.sandbox, target.ledger
        roles = Roles(role_env(target.config, broker.bootstrap_servers, target.db_url), tmp_path)
        try:
            roles.start("maxma", "maxma", env={"RELAY_FAILPOINTS": f'["{failpoint}"]'})
            await roles.ready("maxma")
            await publish_events(
                broker.bootstrap_servers,
                client_event("evt-crash", "6439302", "+79031112233", "Смирнова Ольга Петровна"),
            )

            assert await roles.wait_exit("maxma") == EXIT_CODE, roles.log("maxma")[-2000:]
            assert len(sandbox.clients) == 1
            assert len(sandbox.requests) == 1
            assert await committed(broker.bootstrap_servers, "relay-maxma", EVENTS) == {}

            roles.start("maxma", "maxma")
            await roles.ready("maxma")
            await eventually(
                lambda: _committed_one(broker.bootstrap_servers),
                timeout=30,
                what="the restarted service to commit the event",
            )
            await asyncio.sleep(0.5)
            assert len(sandbox.clients) == 1
            assert len(sandbox.requests) == requests_after_restart
            if requests_after_restart == 3:
                # The second attempt was told the client exists (Maxma code 24 or 30): success, not a new client.
                assert sandbox.requests[1].error_code in (24, 30)
                assert sandbox.requests[2].path == "/update-client"
            delivery = await ledger.get(idempotency_key("maxma", "maxma", "new-client", "evt-crash"))
            assert delivery is not None
            assert delivery.status is DeliveryStatus.DELIVERED
        finally:
            roles.stop_all()


async def _committed_one(bootstrap: str) -> bool:
    return sum((await committed(bootstrap, "relay-maxma", EVENTS)).values()) == 1


@pytest.mark.parametrize(
    ("failpoint", "set_orders"),
    [
        # (Killed after set-order was answered but before the step was kept, set-order is sent again: Maxma
        # replaces an order not yet confirmed. tests/maxma/test_flows.py covers that resend without a process.)
        # Killed after the step was kept, before the confirm: the restart goes straight to the confirm.
        ("maxma.step.set-order.kept", 1),
    ],
)
async def test_killed_between_set_order_and_confirm_confirms_the_order_once(
    broker: EmbeddedBroker, kafka: object, tmp_path: Path, failpoint: str, set_orders: int
) -> None:
    async with maxma_target(tmp_path) as target:
        sandbox = target.sandbox
        sandbox.run_operation(
            "/new-client", {"client": {"phoneNumber": "+79035550011", "externalId": "7701"}}
        )
        roles = Roles(role_env(target.config, broker.bootstrap_servers, target.db_url), tmp_path)
        try:
            roles.start("maxma", "maxma", env={"RELAY_FAILPOINTS": f'["{failpoint}"]'})
            await roles.ready("maxma")
            await publish_events(
                broker.bootstrap_servers, paid_visit("evt-paid", "7701", "+79035550011", "8801")
            )

            assert await roles.wait_exit("maxma") == EXIT_CODE, roles.log("maxma")[-2000:]
            assert sandbox.orders["salon:8801"].status == "new"  # set, not confirmed

            roles.start("maxma", "maxma")
            await roles.ready("maxma")
            await eventually(
                lambda: _committed_one(broker.bootstrap_servers), timeout=30, what="the visit committed"
            )
            await asyncio.sleep(0.5)
            order = sandbox.orders["salon:8801"].to_dict()
            assert order["status"] == "confirmed"
            assert order["confirmations"] == 1
            paths = [r.path for r in sandbox.requests if r.path != "/new-client"]
            assert paths == ["/v2/set-order"] * set_orders + ["/confirm-order"]
            d = await target.ledger.get(idempotency_key("maxma", "maxma", "set-order", "evt-paid"))
            assert d is not None
            assert d.status is DeliveryStatus.DELIVERED
        finally:
            roles.stop_all()
