"""The Klientiks sandbox over real HTTP: uvicorn on 127.0.0.1, httpx as the client."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from services.sandbox.klientiks import (
    DEFAULT_ACCOUNT,
    KlientiksSandbox,
    SandboxAccount,
    create_klientiks_sandbox,
    klientiks_time,
)

A = DEFAULT_ACCOUNT
B = SandboxAccount("30511", "200001", "second-account-access-token-abcdef")
MSK = ZoneInfo("Europe/Moscow")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?")


@dataclass
class Env:
    sandbox: KlientiksSandbox
    http: httpx.AsyncClient

    async def api(
        self, action: str, rest: str, *, account: SandboxAccount = A, token: str | None = None, **query: Any
    ) -> httpx.Response:
        auth = f"a/{account.account_id}/u/{account.user_id}/t/{token or account.access_token}"
        return await self.http.get(f"/clientix/Restapi/{action}/{auth}/{rest}", params=query)

    async def appointment(self, appointment_id: Any, **kw: Any) -> httpx.Response:
        return await self.api("getAppointment", f"id/{appointment_id}", **kw)

    async def control(self, method: str, what: str, body: Any = None) -> Any:
        r = await self.http.request(method, f"/_sandbox/{what}", json=body)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def first(self, account: SandboxAccount = A) -> tuple[dict[str, Any], dict[str, Any]]:
        """An appointment of the account and its client (raw sandbox records)."""
        appt = next(
            a for a in self.sandbox.appointments.values() if str(a["account_id"]) == account.account_id
        )
        return appt, self.sandbox.clients[appt["client_id"]]


@pytest.fixture
async def env(app_server: Callable[[Any], AbstractAsyncContextManager[str]]) -> AsyncIterator[Env]:
    app = create_klientiks_sandbox([A, B], seed=7)
    async with app_server(app) as base_url, httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        yield Env(app.state.sandbox, http)


# ---- reads ---------------------------------------------------------------------------------------------


async def test_get_appointment_has_the_documented_shape(env: Env) -> None:
    appt, client = env.first()
    r = await env.appointment(appt["id"])
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    for name in (
        "id", "client_id", "executor_id", "start_datetime", "finish_datetime", "status",
        "appointed_services", "created", "modified", "paid", "urgent", "is_sale",
    ):  # fmt: skip
        assert name in body, name
    for name in ("start_datetime", "finish_datetime", "created", "modified"):
        assert TIMESTAMP.fullmatch(body[name]), body[name]
    assert body["status"] in {
        "scheduled", "confirmed", "in_progress", "finished", "missed", "cancelled", "cancelled_by_sms",
        "sms_confirmation_sent",
    }  # fmt: skip
    assert all({"id", "service_id", "name"} <= set(s) for s in body["appointed_services"])
    (link,) = body["appointment_client_links"]
    assert link["client_id"] == body["client_id"] == client["id"]
    assert link["client"]["phone"] == client["phone"]
    assert re.fullmatch(r"7\d{10}", client["phone"])
    assert re.fullmatch(r"[А-ЯЁ][а-яё]+", client["first_name"])
    assert "_link_id" not in body


async def test_unknown_appointment_or_another_accounts_is_empty(env: Env) -> None:
    r = await env.appointment(1)
    assert (r.status_code, r.json()) == (200, [])
    other, _ = env.first(B)
    assert (await env.appointment(other["id"])).json() == []
    assert (await env.appointment(other["id"], account=B)).json()["id"] == other["id"]


async def test_clients_can_be_left_out_of_links(app_server: Any) -> None:
    app = create_klientiks_sandbox(embed_clients=False)
    sandbox: KlientiksSandbox = app.state.sandbox
    appt = next(iter(sandbox.appointments.values()))
    async with app_server(app) as url, httpx.AsyncClient(base_url=url) as http:
        auth = f"a/{A.account_id}/u/{A.user_id}/t/{A.access_token}"
        body = (await http.get(f"/clientix/Restapi/getAppointment/{auth}/id/{appt['id']}")).json()
    assert body["appointment_client_links"][0].keys() == {"id", "appointment_id", "client_id", "status"}


@pytest.mark.parametrize("fmt", ["{d}", "8{n}", "+7 ({a}) {b}-{c}-{e}"])
async def test_get_client_by_phone(env: Env, fmt: str) -> None:
    _, client = env.first()
    d = client["phone"]
    phone = fmt.format(d=d, n=d[1:], a=d[1:4], b=d[4:7], c=d[7:9], e=d[9:])
    r = await env.api("list", f"m/getClientByPhone/phone/{phone}")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"offset", "items", "count", "limit"}
    assert [c["id"] for c in body["items"]] == [client["id"]]
    assert body["items"][0]["second_name"] == client["second_name"]


async def test_unknown_phone_is_an_empty_list(env: Env) -> None:
    body = (await env.api("list", "m/getClientByPhone/phone/79990000000")).json()
    assert (body["items"], body["count"]) == ([], 0)


async def test_clients_changed_since_a_date_paginate(env: Env) -> None:
    since = "2000-01-01"
    everyone = [c for c in env.sandbox.clients.values() if str(c["account_id"]) == A.account_id]
    first = (await env.api("list", f"m/clients/date/{since}", offset=0, limit=5)).json()
    assert (first["offset"], first["count"], first["limit"]) == (5, 5, 5)
    rest = (await env.api("list", f"m/clients/date/{since}", offset=5, limit=100)).json()
    ids = [c["id"] for c in first["items"] + rest["items"]]
    assert sorted(ids) == sorted(c["id"] for c in everyone)
    assert len(set(ids)) == len(ids)
    capped = (await env.api("list", f"m/Clients/date/{since}", limit=1000)).json()
    assert capped["limit"] == 100


async def test_clients_since_filters_by_modified(env: Env) -> None:
    added = await env.control("POST", "clients", {"phone": "+7 916 000-11-22", "first_name": "Дарья"})
    today = klientiks_time(datetime.now(MSK).replace(tzinfo=None))[:10]
    body = (await env.api("list", f"m/clients/date/{today}")).json()
    assert [c["id"] for c in body["items"]] == [added["id"]]
    assert added["phone"] == "79160001122"
    bad = await env.api("list", "m/clients/date/yesterday")
    assert bad.status_code == 400


async def test_unknown_method_is_404(env: Env) -> None:
    r = await env.api("list", "m/Nothing/")
    assert r.status_code == 404


# ---- credentials ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrong",
    [
        {"token": "wrong-token"},
        {"account": SandboxAccount(A.account_id, "999", A.access_token)},
        {"account": SandboxAccount("999", A.user_id, A.access_token)},
        {"account": A, "token": B.access_token},
    ],
)
async def test_bad_credentials_get_the_login_page(env: Env, wrong: dict[str, Any]) -> None:
    appt, _ = env.first()
    r = await env.appointment(appt["id"], **wrong)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert 'type="password"' in r.text


async def test_bad_credentials_can_be_401(app_server: Any) -> None:
    app = create_klientiks_sandbox(auth_failure="401")
    async with app_server(app) as url, httpx.AsyncClient(base_url=url) as http:
        r = await http.get(f"/clientix/Restapi/getAppointment/a/{A.account_id}/u/{A.user_id}/t/nope/id/1")
    assert r.status_code == 401


async def test_the_request_log_never_holds_the_token(env: Env) -> None:
    appt, _ = env.first()
    await env.appointment(appt["id"])
    await env.appointment(appt["id"], token="wrong-token-value")
    log = await env.control("GET", "requests")
    assert [(r["account"], r["action"], r["auth_ok"], r["status"]) for r in log] == [
        (A.account_id, "getAppointment", True, 200),
        (A.account_id, "getAppointment", False, 200),
    ]
    assert log[0]["params"] == {"id": str(appt["id"])}
    text = str(log)
    assert A.access_token not in text
    assert "wrong-token-value" not in text
    assert all(isinstance(r["time"], float) for r in log)


# ---- determinism and records -----------------------------------------------------------------------------


def test_same_seed_same_records_other_seed_other_records() -> None:
    one, two, other = KlientiksSandbox(seed=3), KlientiksSandbox(seed=3), KlientiksSandbox(seed=4)
    assert one.clients == two.clients
    assert one.appointments == two.appointments
    assert one.clients != other.clients
    assert len(one.clients) == 12
    assert len(one.appointments) == 24
    phones = [c["phone"] for c in one.clients.values()]
    assert len(set(phones)) == len(phones)


async def test_added_appointment_is_served_and_touches_its_client(env: Env) -> None:
    client = await env.control("POST", "clients", {"phone": "89161112233", "first_name": "Анна"})
    appt = await env.control(
        "POST",
        "appointments",
        {
            "client_id": client["id"],
            "start_datetime": "2024-06-20T15:00:00",
            "status": "confirmed",
            "services": ["Маникюр с покрытием", "Новая услуга"],
        },
    )
    body = (await env.appointment(appt["id"])).json()
    assert body["start_datetime"] == "2024-06-20 15:00:00"
    assert body["finish_datetime"] == "2024-06-20 16:00:00"
    assert [s["name"] for s in body["appointed_services"]] == ["Маникюр с покрытием", "Новая услуга"]
    assert body["appointment_client_links"][0]["client"]["phone"] == "79161112233"
    assert env.sandbox.clients[client["id"]]["modified"] >= client["modified"]
    r = await env.http.post(
        "/_sandbox/appointments", json={"client_id": 1, "start_datetime": "2024-06-20T15:00"}
    )
    assert r.status_code == 422
    listed = await env.control("GET", f"appointments?account={A.account_id}")
    assert appt["id"] in [a["id"] for a in listed]


async def test_reset_restores_the_seed(env: Env) -> None:
    before = dict(env.sandbox.clients)
    await env.control("POST", "clients", {"phone": "79160000001", "first_name": "Иван"})
    await env.control("POST", "faults", {"mode": "http_status", "status": 500})
    await env.control("POST", "rate-limit", {"per_s": 1})
    await env.control("POST", "reset")
    assert env.sandbox.clients == before
    assert await env.control("GET", "faults") == []
    assert await env.control("GET", "requests") == []
    assert (await env.control("GET", "rate-limit"))["per_s"] is None


# ---- faults --------------------------------------------------------------------------------------------


async def test_fail_the_next_n_requests_then_answer(env: Env) -> None:
    appt, _ = env.first()
    await env.control("POST", "faults", {"mode": "http_status", "status": 503, "times": 2})
    statuses = [(await env.appointment(appt["id"])).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    log = await env.control("GET", "requests")
    assert [r["fault"] is not None for r in log] == [True, True, False]


async def test_fault_with_retry_after_and_json_body(env: Env) -> None:
    await env.control(
        "POST", "faults", {"mode": "http_status", "status": 429, "retry_after": 3, "body": {"error": "slow"}}
    )
    r = await env.appointment(1)
    assert (r.status_code, r.headers["retry-after"], r.json()) == (429, "3", {"error": "slow"})


async def test_error_rate_is_seeded_and_repeatable(env: Env) -> None:
    async def run() -> list[int]:
        await env.control("DELETE", "faults")
        await env.control(
            "POST", "faults", {"mode": "http_status", "status": 500, "probability": 0.5, "seed": 1}
        )
        return [(await env.appointment(1)).status_code for _ in range(20)]

    first, second = await run(), await run()
    assert first == second
    assert 3 < first.count(500) < 17


async def test_fault_filters_by_action_and_account(env: Env) -> None:
    await env.control(
        "POST",
        "faults",
        {"mode": "http_status", "status": 502, "action": "getClientByPhone", "account": B.account_id},
    )
    assert (await env.appointment(1, account=B)).status_code == 200
    assert (await env.api("list", "m/getClientByPhone/phone/79990000000")).status_code == 200
    assert (await env.api("list", "m/getClientByPhone/phone/79990000000", account=B)).status_code == 502


async def test_drop_fault_and_the_request_log(env: Env) -> None:
    await env.control("POST", "faults", {"mode": "drop", "action": "getAppointment"})
    with pytest.raises(httpx.RemoteProtocolError):
        await env.appointment(1)
    assert (await env.appointment(1)).status_code == 200
    dropped, answered = await env.control("GET", "requests?action=getAppointment")
    assert (dropped["outcome"], dropped["status"], dropped["fault"]["mode"]) == ("dropped", None, "drop")
    assert (answered["outcome"], answered["status"], answered["fault"]) == ("answered", 200, None)
    [rec, _] = await env.sandbox.wait_for_requests(2, timeout=5, account=A.account_id)
    assert rec.outcome == "dropped"


async def test_invalid_fault_is_422(env: Env) -> None:
    for spec in ({"mode": "http_status"}, {"mode": "delay"}, {"mode": "delay", "seconds": 1, "status": 500}):
        assert (await env.http.post("/_sandbox/faults", json=spec)).status_code == 422


async def test_delay_fault_and_latency(env: Env) -> None:
    await env.control("POST", "faults", {"mode": "delay", "seconds": 0.3})
    started = time.monotonic()
    assert (await env.appointment(1)).status_code == 200
    assert time.monotonic() - started >= 0.3
    await env.control("POST", "latency", {"ms": 200})
    started = time.monotonic()
    await env.appointment(1)
    assert time.monotonic() - started >= 0.2
    assert (await env.control("GET", "latency")) == {"ms": 200}
    with pytest.raises(httpx.ReadTimeout):
        await env.http.get(
            f"/clientix/Restapi/getAppointment/a/{A.account_id}/u/{A.user_id}/t/{A.access_token}/id/1",
            timeout=0.05,
        )


# ---- rate limit ------------------------------------------------------------------------------------------


async def test_rate_limit_per_account_answers_429_with_retry_after(env: Env) -> None:
    await env.control("POST", "rate-limit", {"per_s": 2, "burst": 1})
    first, second = await env.appointment(1), await env.appointment(1)
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.headers["retry-after"] == "1"
    # Another account has its own bucket.
    assert (await env.appointment(1, account=B)).status_code == 200
    await asyncio.sleep(0.55)
    assert (await env.appointment(1)).status_code == 200
    log = await env.control("GET", f"requests?account={A.account_id}")
    assert [r["throttled"] for r in log] == [False, True, False]


async def test_rate_limit_burst(env: Env) -> None:
    await env.control("POST", "rate-limit", {"per_s": 1, "burst": 3})
    statuses = [(await env.appointment(1)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    await env.control("POST", "rate-limit", {"per_s": None})
    assert (await env.appointment(1)).status_code == 200
