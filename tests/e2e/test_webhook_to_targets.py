"""A salon's day through the whole relay: seed-template webhooks -> ingest API -> Tansu -> normalizer (with the
Klientiks API completing thin ones) -> the four delivery services -> their sandboxes, each service a process.

A new client becomes a Maxma client and one CPA.House lead; a paid visit (the seed's template carries no
amount) becomes a Maxma order with a row per service, confirmed once; a cancellation cancels it; an online
booking of the same client is a counted skip for CPA.House; a visit the API does not know is a dead letter
that names the template parameter to add; a 503 is retried; Weeek keeps one contact per client and a deal
per visit, moved, won and lost as the visit goes; Plarin gets one conversion for the paid visit's ad click; a vendor's message about the key is a dead
letter with that message, and opens the connection's circuit.
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
from services.sandbox.plarin import PlarinSandbox, create_plarin_app
from services.sandbox.weeek import SEED_FUNNEL_NAME, WeeekSandbox, create_weeek_app, status_id
from tests.support import (
    MAXMA_KEY,
    SOURCE_TOKEN,
    Roles,
    committed,
    demo_connection,
    eventually,
    role_env,
    serve_app,
)

CPA_KEY = "cpa-house-api-key-0123456789"
WEEEK_TOKEN = "weeek-token-0123456789abcdef"
PLARIN_TOKEN = "plarin-token-0123456789"
TARGETS = ("maxma", "cpahouse", "weeek", "plarin")
_accounts = itertools.count(int(time.time()) % 100000 * 100 + 70)


@dataclass
class Stack:
    roles: Roles
    maxma: MaxmaSandbox
    cpa: CpaHouseSandbox
    weeek: WeeekSandbox
    plarin: PlarinSandbox
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


def _config(path: Path, urls: dict[str, str], klientiks_url: str, account: SandboxAccount) -> Path:
    maxma_url, cpa_url = urls["maxma"], urls["cpahouse"]
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
            demo_connection("weeek", urls["weeek"], WEEEK_TOKEN),
            demo_connection("plarin", urls["plarin"], PLARIN_TOKEN),
        ],
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


@pytest.fixture
async def stack(broker: EmbeddedBroker, tmp_path: Path) -> AsyncIterator[Stack]:
    account = SandboxAccount(str(next(_accounts)), "113421", "kl-access-token-7f3a9c1e5b2d")
    klientiks_app = create_klientiks_sandbox([account], seed=3)
    maxma, cpa, weeek, plarin = MaxmaSandbox(), CpaHouseSandbox(), WeeekSandbox(), PlarinSandbox()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    ledger = Ledger.from_url(db_url)
    await upgrade(ledger.engine)
    await ledger.close()
    async with (
        serve_app(create_maxma_app({MAXMA_KEY}, maxma)) as maxma_url,
        serve_app(create_cpahouse_app({CPA_KEY: "1001"}, cpa)) as cpa_url,
        serve_app(create_weeek_app({WEEEK_TOKEN}, weeek)) as weeek_url,
        serve_app(create_plarin_app(PLARIN_TOKEN, plarin)) as plarin_url,
        serve_app(klientiks_app) as klientiks_url,
    ):
        urls = {"maxma": maxma_url, "cpahouse": cpa_url, "weeek": weeek_url, "plarin": plarin_url}
        config = _config(tmp_path / "relay.yaml", urls, klientiks_url, account)
        roles = Roles(role_env(config, broker.bootstrap_servers, db_url), tmp_path)
        try:
            roles.start("api", "ingest", "api")
            roles.start("normalizer", "ingest", "normalizer")
            for target in TARGETS:
                roles.start(target, target)
            await roles.ready("api", "normalizer", *TARGETS)
            yield Stack(
                roles,
                maxma,
                cpa,
                weeek,
                plarin,
                klientiks_app.state.sandbox,
                account,
                broker.bootstrap_servers,
            )
        finally:
            roles.stop_all()


async def _caught_up(bootstrap: str, group: str, n: int) -> bool:
    return sum((await committed(bootstrap, group, EVENTS)).values()) >= n


def _deal(stack: Stack, visit: str) -> Any:
    """The Weeek deal of a Klientiks visit: the one whose description names it."""
    found = [d for d in stack.weeek.deals.values() if d.description and d.description.endswith(f"№{visit}")]
    return found[0] if len(found) == 1 else None


async def test_a_salons_day_reaches_all_four_targets(stack: Stack) -> None:
    kl, acc = stack.klientiks, stack.account.account_id
    status = lambda name: status_id(SEED_FUNNEL_NAME, name)  # noqa: E731
    client = kl.add_client({"account_id": acc, "phone": "+7 916 123-45-67",
                            "first_name": "Анна", "second_name": "Иванова", "patron_name": "Сергеевна"})  # fmt: skip
    cid = str(client["id"])
    # "Добавление клиента", as the seed's template renders it.
    await stack.hook("client-created", client_id=cid, client_phone="79161234567",
                     client_name="Иванова Анна Сергеевна", client_first_name="Анна", client_patron_name="Сергеевна",
                     client_second_name="Иванова", client_deleted="false", client_email="")  # fmt: skip
    await eventually(lambda: len(stack.maxma.clients) == 1 and len(stack.cpa.leads) == 1
                     and len(stack.weeek.contacts) == 1, timeout=30,
                     what="the client in Maxma and Weeek, the lead in CPA.House")  # fmt: skip
    (lead,) = stack.cpa.leads
    assert (lead.name, lead.phone, lead.county_code, lead.sub_id_1) == (
        "Иванова Анна Сергеевна", "+79161234567", "RU", cid,
    )  # fmt: skip
    (contact,) = stack.weeek.contacts.values()
    assert (contact.first_name, contact.last_name, contact.middle_name) == ("Анна", "Иванова", "Сергеевна")
    assert [p["phone"] for p in contact.phones] == ["+79161234567"]

    # "Запись клиента на прием" (seed template): a Weeek deal in the first status, linked to the contact.
    start = datetime.now().replace(microsecond=0) + timedelta(hours=1)
    visit = kl.add_appointment({"account_id": acc, "client_id": int(cid), "start_datetime": start.isoformat(),
                                "services": ["Стрижка женская", "Укладка"]})  # fmt: skip
    vid = str(visit["id"])
    await stack.hook("appointment-created", client_id=cid, client_phone="79161234567",
                     client_name="Иванова Анна Сергеевна", appointment_id=vid,
                     appointment_date=start.strftime("%d.%m.%Y"), appointment_time=start.strftime("%H:%M"),
                     services="Стрижка женская, Укладка", appointment_total_cost="3300")  # fmt: skip
    await eventually(lambda: _deal(stack, vid) is not None and _deal(stack, vid).contacts, timeout=30,
                     what="the deal in Weeek, linked")  # fmt: skip
    deal = _deal(stack, vid)
    assert deal.title == f"Стрижка женская, Укладка — {start:%d.%m.%Y %H:%M}"
    assert (deal.amount, deal.status_id, deal.contacts) == (3300, status("Новая заявка"), [contact.id])
    # Confirmed (seed 004's thin template): the deal moves to the status the connection maps.
    await stack.hook("appointment-changed", appointment_id=vid, status="confirmed")
    await eventually(
        lambda: _deal(stack, vid).status_id == status("Записан"), timeout=30, what="the deal moved"
    )

    # "Визит клиента оплачен": no amount in the seed's template (the Klientiks API gives it, per service),
    # and the ad click the client came from.
    stack.maxma.add_fault({"mode": "http_status", "status": 503, "path": "/v2/set-order"})  # retried once
    await stack.hook("visit-paid", client_id=cid, appointment_id=vid, appointment_account_id=acc,
                     appointment_created=visit["created"], appointment_appointment_id=vid,
                     appointment_status="finished", appointment_paid="1", yclid="7364527123")  # fmt: skip
    order_id = f"salon:{vid}"
    await eventually(
        lambda: order_id in stack.maxma.orders and stack.maxma.orders[order_id].status == "confirmed"
        and _deal(stack, vid).win_status == "won" and len(stack.plarin.postbacks) == 1,
        timeout=30, what="the order confirmed, the deal won, the conversion posted",
    )  # fmt: skip
    order = stack.maxma.orders[order_id].to_dict()
    assert [(r["product"]["title"], r["product"]["blackPrice"]) for r in order["rows"]] == [
        ("Стрижка женская", 1800.0), ("Укладка", 1500.0),
    ]  # fmt: skip
    assert order["confirmations"] == 1
    (postback,) = stack.plarin.postbacks
    assert {k: postback.params[k] for k in ("click_id", "event", "value", "currency")} == {
        "click_id": "7364527123", "event": "visit-paid", "value": "3300.00", "currency": "RUB",
    }  # fmt: skip

    # The same client books online (seed 004's thin template): CPA.House already has this client's lead;
    # Weeek gets a deal for the new visit, linked to the same contact.
    booking = kl.add_appointment({"account_id": acc, "client_id": int(cid),
                                  "start_datetime": (start + timedelta(days=7)).isoformat()})  # fmt: skip
    await stack.hook("online-booking", appointment_id=str(booking["id"]), status="scheduled")
    # The visit is cancelled (a refund): the confirmed order is cancelled, the deal lost.
    await stack.hook("appointment-changed", appointment_id=vid, status="cancelled")
    await eventually(lambda: stack.maxma.orders[order_id].status == "cancelled"
                     and _deal(stack, vid).win_status == "lost", timeout=30,
                     what="the order cancelled in Maxma, the deal lost in Weeek")  # fmt: skip

    # A paid visit the API does not know: no amount anywhere, a dead letter saying which parameter to add.
    await stack.hook("visit-paid", client_id=cid, appointment_id="99999999", appointment_status="finished")
    # CPA.House refuses the next lead with its own message, about the key: every lead would fail alike.
    stack.cpa.add_fault({"mode": "error_msg", "msg": "Неверный api_key"})
    other = kl.add_client({"account_id": acc, "phone": "+79035550022", "first_name": "Ольга"})
    await stack.hook(
        "client-created", client_id=str(other["id"]), client_phone="79035550022", client_name="Ольга"
    )

    async def dead_letters() -> list[Any]:
        return await read_dlq(stack.bootstrap, list(TARGETS), DlqFilter(targets=TARGETS))

    await eventually(lambda: _count(dead_letters, 2), timeout=30, what="two dead letters")
    by_target = {d.target: d for d in await dead_letters()}
    assert set(by_target) == {"maxma", "cpahouse"}
    assert "no amount" in by_target["maxma"].reason
    assert by_target["maxma"].hint is not None
    assert "appointment_total_cost={{appointment.total_cost}}" in by_target["maxma"].hint
    assert by_target["cpahouse"].reason == "CPA.House: Неверный api_key"
    assert by_target["cpahouse"].opened_circuit
    assert not by_target["maxma"].opened_circuit

    # Everything committed, and nothing more reaches any vendor.
    for target in TARGETS:
        await eventually(lambda t=target: _caught_up(stack.bootstrap, f"relay-{t}", 8), timeout=30,
                         what=f"{target} caught up")  # fmt: skip
    await asyncio.sleep(1.0)
    assert len(stack.cpa.leads) == 1  # the booking was a skip, the second client's lead was refused
    paths = stack.maxma_paths()
    assert paths.count("/v2/set-order") == 2  # the 503, then the order
    assert paths.count("/confirm-order") == 1
    assert paths.count("/cancel-order") == 1
    assert len(stack.weeek.contacts) == 2  # one per client, however many deals
    assert (
        len([d for d in stack.weeek.deals.values() if contact.id in d.contacts]) == 3
    )  # two visits, one unknown
    assert len(stack.plarin.postbacks) == 1  # the unknown visit carried no click id: a skip
    assert (
        await _metric(
            stack.roles.url("cpahouse"),
            'relay_delivery_skips_total{action="lead",reason="lead_already_sent",target="cpahouse"}',
        )
        == 1
    )
    assert (
        await _metric(
            stack.roles.url("plarin"),
            'relay_delivery_skips_total{action="conversion",reason="no_click_id",target="plarin"}',
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
