"""A salon's day through the whole relay: seed-template webhooks -> ingest API -> Tansu -> normalizer (with the
Klientiks API completing thin ones) -> the maxma and cpahouse services -> their sandboxes, each a process.

A new client becomes a Maxma client and one CPA.House lead; a paid visit (the seed's template carries no
amount) becomes a Maxma order with a row per service, confirmed once; a cancellation cancels it; an online
booking of the same client is a counted skip for CPA.House; a visit the API does not know is a dead letter
that names the template parameter to add; a vendor's error message is a dead letter with that message.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.common.embedded import EmbeddedBroker
from services.common.kafka import EVENTS
from services.common.ledger import Ledger, upgrade
from services.common.ops import DlqFilter, read_dlq
from services.sandbox.cpahouse import CpaHouseSandbox, create_cpahouse_app
from services.sandbox.klientiks import KlientiksSandbox, SandboxAccount, create_klientiks_sandbox
from services.sandbox.maxma import MaxmaSandbox, create_maxma_app
from tests.support import MAXMA_KEY, SOURCE_TOKEN, Roles, committed, eventually, role_env, serve_app

CPA_KEY = "cpa-house-api-key-0123456789"
_accounts = itertools.count(int(time.time()) % 100000 * 100 + 70)


@dataclass
class Stack:
    roles: Roles
    maxma: MaxmaSandbox
    cpa: CpaHouseSandbox
    klientiks: KlientiksSandbox
    account: SandboxAccount
    bootstrap: str

    async def hook(self, event: str, **params: Any) -> str:
        async with httpx.AsyncClient() as http:
            r = await http.get(
                f"{self.roles.url('api')}/hooks/klientiks/{SOURCE_TOKEN}/{event}", params=params
            )
        assert r.status_code == 202, r.text
        return str(r.json()["event_id"])

    def maxma_paths(self) -> list[str]:
        return [r.path for r in self.maxma.requests]


def _config(path: Path, maxma_url: str, cpa_url: str, klientiks_url: str, account: SandboxAccount) -> Path:
    source = {
        "name": "salon", "token": "${RELAY_TEST_SOURCE_TOKEN}", "timezone": "Europe/Moscow", "phone_region": "RU",
        "klientiks": {"account_id": account.account_id, "user_id": account.user_id,
                      "access_token": account.access_token, "base_url": f"{klientiks_url}/clientix/Restapi",
                      "rate_limit_per_s": 20},
        "connections": [
            {"target": "maxma", "base_url": maxma_url, "processing_key": "${RELAY_TEST_MAXMA_KEY}",
             "shop_code": "main", "shop_name": "Салон на Тверской",
             "events": {"client-created": "new-client", "visit-paid": "set-order",
                        "appointment-changed": "cancel-order"}},
            {"target": "cpahouse", "base_url": cpa_url, "api_key": CPA_KEY, "webmaster_id": "1001",
             "offer_id": "501", "source_id": "11", "stream_id": "21",
             "user_agent": "Mozilla/5.0 (X11; Linux x86_64)", "ip_address": "203.0.113.10"},
        ],
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    account = SandboxAccount(str(next(_accounts)), "113421", "kl-access-token-7f3a9c1e5b2d")
    klientiks_app = create_klientiks_sandbox([account], seed=3)
    maxma, cpa = MaxmaSandbox(), CpaHouseSandbox()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    ledger = Ledger.from_url(db_url)
    await upgrade(ledger.engine)
    await ledger.close()
    async with (
        serve_app(create_maxma_app({MAXMA_KEY}, maxma)) as maxma_url,
        serve_app(create_cpahouse_app({CPA_KEY: "1001"}, cpa)) as cpa_url,
        serve_app(klientiks_app) as klientiks_url,
    ):
        config = _config(tmp_path / "relay.yaml", maxma_url, cpa_url, klientiks_url, account)
        roles = Roles(role_env(config, broker.bootstrap_servers, db_url), tmp_path)
        try:
            roles.start("api", "ingest", "api")
            roles.start("normalizer", "ingest", "normalizer")
            roles.start("maxma", "maxma")
            roles.start("cpahouse", "cpahouse")
            await roles.ready("api", "normalizer", "maxma", "cpahouse")
            yield Stack(roles, maxma, cpa, klientiks_app.state.sandbox, account, broker.bootstrap_servers)
        finally:
            roles.stop_all()


async def _caught_up(bootstrap: str, group: str, n: int) -> bool:
    return sum((await committed(bootstrap, group, EVENTS)).values()) >= n


async def test_a_salons_day_reaches_maxma_and_cpa_house(stack: Stack) -> None:
    kl = stack.klientiks
    client = kl.add_client({"account_id": stack.account.account_id, "phone": "+7 916 123-45-67",
                            "first_name": "Анна", "second_name": "Иванова", "patron_name": "Сергеевна"})  # fmt: skip
    cid = str(client["id"])
    # "Добавление клиента", as the seed's template renders it.
    await stack.hook("client-created", client_id=cid, client_phone="79161234567",
                     client_name="Иванова Анна Сергеевна", client_first_name="Анна", client_patron_name="Сергеевна",
                     client_second_name="Иванова", client_deleted="false", client_email="")  # fmt: skip
    await eventually(lambda: len(stack.maxma.clients) == 1 and len(stack.cpa.leads) == 1, timeout=30,
                     what="the client in Maxma and the lead in CPA.House")  # fmt: skip
    (lead,) = stack.cpa.leads
    assert (lead.name, lead.phone, lead.county_code, lead.sub_id_1) == (
        "Иванова Анна Сергеевна", "+79161234567", "RU", cid,
    )  # fmt: skip

    # "Визит клиента оплачен": the seed's template has no amount; the Klientiks API gives it, per service.
    start = datetime.now() + timedelta(hours=1)
    visit = kl.add_appointment({"account_id": stack.account.account_id, "client_id": int(cid),
                                "start_datetime": start.isoformat(timespec="seconds"), "status": "finished",
                                "services": ["Стрижка женская", "Укладка"], "paid": True})  # fmt: skip
    vid = str(visit["id"])
    await stack.hook("visit-paid", client_id=cid, appointment_id=vid, appointment_account_id=stack.account.account_id,
                     appointment_created=visit["created"], appointment_appointment_id=vid,
                     appointment_status="finished", appointment_paid="1")  # fmt: skip
    order_id = f"salon:{vid}"
    await eventually(
        lambda: order_id in stack.maxma.orders and stack.maxma.orders[order_id].status == "confirmed",
        timeout=30, what="the order confirmed in Maxma",
    )  # fmt: skip
    order = stack.maxma.orders[order_id].to_dict()
    assert [(r["product"]["title"], r["product"]["blackPrice"]) for r in order["rows"]] == [
        ("Стрижка женская", 1800.0), ("Укладка", 1500.0),
    ]  # fmt: skip
    assert order["confirmations"] == 1

    # The same client books online (seed 004's thin template): CPA.House already has this client's lead.
    booking = kl.add_appointment({"account_id": stack.account.account_id, "client_id": int(cid),
                                  "start_datetime": (start + timedelta(days=7)).isoformat(timespec="seconds")})  # fmt: skip
    await stack.hook("online-booking", appointment_id=str(booking["id"]), status="scheduled")
    # The visit is cancelled (a refund): the confirmed order is cancelled.
    await stack.hook("appointment-changed", appointment_id=vid, status="cancelled")
    await eventually(lambda: stack.maxma.orders[order_id].status == "cancelled", timeout=30,
                     what="the order cancelled in Maxma")  # fmt: skip

    # A paid visit the API does not know: no amount anywhere, a dead letter saying which parameter to add.
    await stack.hook("visit-paid", client_id=cid, appointment_id="99999999", appointment_status="finished")
    # CPA.House refuses the next lead with its own message.
    stack.cpa.add_fault({"mode": "error_msg", "msg": "Оффер остановлен"})
    other = kl.add_client(
        {"account_id": stack.account.account_id, "phone": "+79035550022", "first_name": "Ольга"}
    )
    await stack.hook(
        "client-created", client_id=str(other["id"]), client_phone="79035550022", client_name="Ольга"
    )

    async def dead_letters() -> list[Any]:
        return await read_dlq(
            stack.bootstrap, ["maxma", "cpahouse"], DlqFilter(targets=("maxma", "cpahouse"))
        )

    await eventually(lambda: _count(dead_letters, 2), timeout=30, what="two dead letters")
    by_target = {d.target: d for d in await dead_letters()}
    assert "no amount" in by_target["maxma"].reason
    assert by_target["maxma"].hint is not None
    assert "appointment_total_cost={{appointment.total_cost}}" in by_target["maxma"].hint
    assert by_target["cpahouse"].reason == "CPA.House: Оффер остановлен"

    # Everything committed, and nothing more reaches either vendor.
    await eventually(
        lambda: _caught_up(stack.bootstrap, "relay-maxma", 6), timeout=30, what="maxma caught up"
    )
    await eventually(
        lambda: _caught_up(stack.bootstrap, "relay-cpahouse", 6), timeout=30, what="cpahouse caught up"
    )
    await asyncio.sleep(1.0)
    assert len(stack.cpa.leads) == 1  # the booking was a skip, the second client's lead was refused
    paths = stack.maxma_paths()
    assert paths.count("/v2/set-order") == 1
    assert paths.count("/confirm-order") == 1
    assert paths.count("/cancel-order") == 1
    assert (
        await _metric(
            stack.roles.url("cpahouse"),
            'relay_delivery_skips_total{action="lead",reason="lead_already_sent",target="cpahouse"}',
        )
        == 1
    )


async def _count(read: Any, n: int) -> bool:
    return len(await read()) >= n


async def _metric(url: str, sample: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{url}/metrics/", follow_redirects=True)).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0
