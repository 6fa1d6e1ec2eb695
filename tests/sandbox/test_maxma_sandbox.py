"""The Maxma sandbox over real HTTP: uvicorn on 127.0.0.1, httpx as the client."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.sandbox.maxma import MaxmaSandbox, create_maxma_app

KEY = "test-processing-key"
PHONE = "+79998887766"
OTHER_PHONE = "+79990001122"


@dataclass
class Env:
    sandbox: MaxmaSandbox
    base_url: str
    http: httpx.AsyncClient

    async def call(self, method: str, body: Any, *, key: str | None = KEY) -> httpx.Response:
        """POST a Maxma method the way the SDKs do."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if key is not None:
            headers["X-Processing-Key"] = key
        return await self.http.post(f"/{method}", json=body, headers=headers)

    async def new_client(self, **client: Any) -> httpx.Response:
        return await self.call("new-client", {"client": {"phoneNumber": PHONE, **client}})

    async def fault(self, **spec: Any) -> dict[str, Any]:
        r = await self.http.post("/_sandbox/faults", json=spec)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def control(self, what: str) -> Any:
        r = await self.http.get(f"/_sandbox/{what}")
        assert r.status_code == 200
        return r.json()


@pytest.fixture
async def env(app_server: Callable[[Any], AbstractAsyncContextManager[str]]) -> AsyncIterator[Env]:
    sandbox = MaxmaSandbox()
    async with (
        app_server(create_maxma_app({KEY}, sandbox)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield Env(sandbox, base_url, http)


def error_code(r: httpx.Response) -> int | None:
    return r.json().get("errorCode")  # type: ignore[no-any-return]


# ---- clients -----------------------------------------------------------------------------------


async def test_new_client_creates_client_with_documented_shape(env: Env) -> None:
    r = await env.call(
        "new-client",
        {
            "client": {
                "phoneNumber": PHONE,
                "email": "anna@example.com",
                "surname": "Иванова",
                "name": "Анна",
                "patronymicName": "Сергеевна",
                "gender": 2,
                "birthdate": "1990-05-01",
                "externalId": "klientiks-42",
                "isEmailSubscribed": True,
                "isPhoneSubscribed": False,
                "extraFields": {"source": "klientiks"},
            },
            "shop": {"code": "main", "name": "Main salon"},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert "errorCode" not in body
    assert body["bonuses"] == []
    client = body["client"]
    assert client["phoneNumber"] == PHONE
    assert client["externalId"] == "klientiks-42"
    assert client["email"] == "anna@example.com"
    assert client["name"] == "Анна"
    assert client["fullName"] == "Иванова Анна Сергеевна"
    assert client["gender"] == 2
    assert client["birthdate"] == "1990-05-01T00:00:00+00:00"
    assert client["level"] == 1
    assert client["isEmailSubscribed"] is True
    assert client["isPhoneSubscribed"] is False
    assert client["bonuses"] == 0
    assert client["pendingBonuses"] == 0
    assert client["extraFields"] == {"source": "klientiks"}
    # Generated card: deterministic counter, integer in card, text in cardString (as in the SDKs).
    assert client["cardString"] == "2222000000001"
    assert client["card"] == 2222000000001

    [stored] = env.sandbox.clients.values()
    assert stored.phone_number == PHONE
    assert stored.shop == {"code": "main", "name": "Main salon"}
    listed = await env.control("clients")
    assert [c["phoneNumber"] for c in listed] == [PHONE]


async def test_given_card_is_kept(env: Env) -> None:
    body = (await env.new_client(card="7000123")).json()
    assert body["client"]["cardString"] == "7000123"
    assert body["client"]["card"] == 7000123


async def test_second_client_with_same_phone_is_24(env: Env) -> None:
    assert error_code(await env.new_client(externalId="a")) is None
    r = await env.new_client(externalId="b")
    assert r.status_code == 200
    assert error_code(r) == 24
    assert r.json()["description"]
    assert len(env.sandbox.clients) == 1


async def test_same_external_id_other_phone_is_30(env: Env) -> None:
    assert error_code(await env.new_client(externalId="ext-1")) is None
    r = await env.call("new-client", {"client": {"phoneNumber": OTHER_PHONE, "externalId": "ext-1"}})
    assert error_code(r) == 30
    assert len(env.sandbox.clients) == 1


async def test_card_bound_to_other_client_is_25_and_creates_nothing(env: Env) -> None:
    assert error_code(await env.new_client(card="5555000011112222")) is None
    r = await env.call("new-client", {"client": {"phoneNumber": OTHER_PHONE, "card": "5555000011112222"}})
    assert error_code(r) == 25
    assert r.json()["description"] == "Карта уже привязана к другому клиенту"
    assert env.sandbox.find_client(phone_number=OTHER_PHONE) is None
    assert len(await env.control("clients")) == 1


async def test_duplicate_email_is_48(env: Env) -> None:
    assert error_code(await env.new_client(email="x@example.com")) is None
    r = await env.call("new-client", {"client": {"phoneNumber": OTHER_PHONE, "email": "X@Example.com"}})
    assert error_code(r) == 48
    assert len(env.sandbox.clients) == 1


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_missing_or_unknown_key_is_401_with_22(env: Env, key: str | None) -> None:
    r = await env.call("new-client", {"client": {"phoneNumber": PHONE}}, key=key)
    assert r.status_code == 401
    assert error_code(r) == 22
    assert env.sandbox.clients == {}
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert rec.key_present is (key is not None)
    assert rec.key_valid is False
    assert (rec.status, rec.error_code) == (401, 22)


async def test_key_value_is_not_recorded(env: Env) -> None:
    await env.new_client()
    [rec] = await env.control("requests")
    assert rec["key_present"] is True
    assert rec["key_valid"] is True
    assert "x-processing-key" not in rec["headers"]
    assert KEY not in str(rec)
    assert rec["headers"]["content-type"] == "application/json"
    assert rec["body"] == {"client": {"phoneNumber": PHONE}}
    assert (rec["status"], rec["error_code"], rec["outcome"]) == (200, None, "answered")


@pytest.mark.parametrize("phone", ["89998887766", "+7999888", "+7 999 888-77-66", "+7999888776612345"])
async def test_invalid_phone_is_20(env: Env, phone: str) -> None:
    r = await env.call("new-client", {"client": {"phoneNumber": phone}})
    assert error_code(r) == 20
    assert env.sandbox.clients == {}


@pytest.mark.parametrize("client", [{}, {"phoneNumber": ""}, {"email": "a@example.com"}])
async def test_missing_phone_is_29(env: Env, client: dict[str, Any]) -> None:
    assert error_code(await env.call("new-client", {"client": client})) == 29


async def test_malformed_request_is_2(env: Env) -> None:
    r = await env.http.post(
        "/new-client",
        content=b"{not json",
        headers={"X-Processing-Key": KEY, "Content-Type": "application/json"},
    )
    assert (r.status_code, error_code(r)) == (200, 2)
    assert error_code(await env.call("new-client", {"client": "nope"})) == 2
    assert error_code(await env.call("new-client", {"client": {"phoneNumber": PHONE, "gender": 7}})) == 2
    [first, *_] = await env.control("requests")
    assert first["malformed"] is True
    assert env.sandbox.clients == {}


async def test_update_client_found_and_not_found(env: Env) -> None:
    await env.new_client(externalId="ext-1", name="Анна")
    r = await env.call(
        "update-client",
        {
            "externalId": "ext-1",
            "client": {"phoneNumber": OTHER_PHONE, "name": "Аня", "extraFields": {"k": "v"}},
        },
    )
    assert error_code(r) is None
    client = r.json()["client"]
    assert (client["phoneNumber"], client["name"], client["externalId"]) == (OTHER_PHONE, "Аня", "ext-1")
    assert client["extraFields"] == {"k": "v"}
    # The old phone is free again, the new one identifies the client.
    assert env.sandbox.find_client(phone_number=PHONE) is None
    assert error_code(await env.call("get-balance", {"phoneNumber": OTHER_PHONE})) is None

    missing = await env.call("update-client", {"phoneNumber": PHONE, "client": {"name": "X"}})
    assert error_code(missing) == 3


async def test_update_client_cannot_take_anothers_phone(env: Env) -> None:
    await env.new_client(externalId="a")
    await env.call("new-client", {"client": {"phoneNumber": OTHER_PHONE, "externalId": "b"}})
    r = await env.call("update-client", {"externalId": "b", "client": {"phoneNumber": PHONE}})
    assert error_code(r) == 24
    assert env.sandbox.find_client(external_id="b").phone_number == OTHER_PHONE  # type: ignore[union-attr]


async def test_get_balance_found_and_not_found(env: Env) -> None:
    created = (await env.new_client(externalId="ext-1")).json()["client"]
    env.sandbox.find_client(phone_number=PHONE).bonuses = 150  # type: ignore[union-attr]
    for ident in ({"phoneNumber": PHONE}, {"card": created["cardString"]}, {"externalId": "ext-1"}):
        r = await env.call("get-balance", ident)
        assert error_code(r) is None, ident
        body = r.json()
        assert body["client"]["phoneNumber"] == PHONE
        assert body["client"]["bonuses"] == 150
        assert body["bonuses"] == [{"amount": 150}]
    assert error_code(await env.call("get-balance", {"phoneNumber": OTHER_PHONE})) == 3
    assert error_code(await env.call("get-balance", {"externalId": "nobody"})) == 3
    assert error_code(await env.call("get-balance", {})) == 2


# ---- orders ------------------------------------------------------------------------------------


def order(order_id: str, *, rows: list[dict[str, Any]] | None = None, **query: Any) -> dict[str, Any]:
    default_rows = [
        {"product": {"sku": "haircut", "title": "Стрижка", "blackPrice": 1500}, "qty": 1},
        {"product": {"sku": "wax", "title": "Воск", "blackPrice": 250.5}, "qty": 2},
    ]
    return {
        "orderId": order_id,
        "calculationQuery": {
            "client": {"phoneNumber": PHONE},
            "shop": {"code": "main", "name": "Main salon"},
            "rows": default_rows if rows is None else rows,
            **query,
        },
    }


async def test_set_order_confirm_and_confirm_twice(env: Env) -> None:
    await env.new_client()
    env.sandbox.find_client(phone_number=PHONE).bonuses = 300  # type: ignore[union-attr]

    r = await env.call("v2/set-order", order("o-1", applyBonuses=100, collectBonuses="auto"))
    assert error_code(r) is None, r.json()
    body = r.json()
    assert body["clientBonuses"] == {"available": 200, "pending": 0, "reserved": 100}
    result = body["calculationResult"]
    assert result["bonuses"]["applied"] == 100
    assert result["bonuses"]["collected"] == 95  # 5 % of (2001 - 100), rounded down
    assert sum(row["bonuses"]["applied"] for row in result["rows"]) == 100
    assert result["summary"]["totalDiscount"] == 100

    confirmed = await env.call("confirm-order", {"orderId": "o-1"})
    assert error_code(confirmed) is None
    assert confirmed.json()["operationResult"] == {
        "appliedBonuses": 100,
        "collectedBonuses": 95,
        "remainingAmount": 1901.0,
    }
    assert confirmed.json()["clientBonuses"] == {"available": 200, "pending": 95, "reserved": 0}

    again = await env.call("confirm-order", {"orderId": "o-1"})
    assert error_code(again) == 32
    assert error_code(await env.call("cancel-order", {"orderId": "o-1"})) == 32
    assert error_code(await env.call("v2/set-order", order("o-1"))) == 32
    [stored] = await env.control("orders")
    assert (stored["orderId"], stored["status"]) == ("o-1", "confirmed")


async def test_cancel_order_releases_reservation(env: Env) -> None:
    await env.new_client()
    env.sandbox.find_client(phone_number=PHONE).bonuses = 300  # type: ignore[union-attr]
    await env.call("v2/set-order", order("o-2", applyBonuses="auto"))
    cancelled = await env.call("cancel-order", {"orderId": "o-2"})
    assert error_code(cancelled) is None
    assert cancelled.json()["clientBonuses"] == {"available": 300, "pending": 0, "reserved": 0}
    assert error_code(await env.call("confirm-order", {"orderId": "o-2"})) == 32
    assert env.sandbox.orders["o-2"].status == "cancelled"


async def test_order_errors(env: Env) -> None:
    assert error_code(await env.call("confirm-order", {"orderId": "nope"})) == 31
    assert error_code(await env.call("cancel-order", {"orderId": "nope"})) == 31
    assert error_code(await env.call("v2/set-order", order("o-3"))) == 3  # unknown client
    await env.new_client()
    assert error_code(await env.call("v2/set-order", order("o-3", rows=[]))) == 18
    assert error_code(await env.call("v2/set-order", {"calculationQuery": {}})) == 2
    assert env.sandbox.orders == {}


# ---- faults ------------------------------------------------------------------------------------


async def test_http_status_fault_for_times_then_normal(env: Env) -> None:
    await env.fault(mode="http_status", status=503, times=2)
    first = await env.new_client()
    second = await env.new_client()
    assert (first.status_code, second.status_code) == (503, 503)
    assert "text/html" in first.headers["content-type"]
    # A faulted request creates nothing but is recorded with what was answered.
    assert env.sandbox.clients == {}
    recs = await env.sandbox.wait_for_requests(2, timeout=5)
    assert [(r.status, r.fault["mode"] if r.fault else None) for r in recs] == [
        (503, "http_status"),
        (503, "http_status"),
    ]
    third = await env.new_client()
    assert (third.status_code, error_code(third)) == (200, None)
    assert len(env.sandbox.clients) == 1
    assert len(await env.control("requests")) == 3
    assert await env.control("faults") == []


async def test_http_429_fault_sets_retry_after(env: Env) -> None:
    await env.fault(mode="http_status", status=429, retry_after=2, times=1)
    r = await env.new_client()
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert env.sandbox.clients == {}


async def test_http_status_fault_with_json_body(env: Env) -> None:
    await env.fault(mode="http_status", status=500, body={"message": "boom"})
    r = await env.new_client()
    assert (r.status_code, r.json()) == (500, {"message": "boom"})


async def test_error_code_fault_answers_200_with_code(env: Env) -> None:
    await env.fault(mode="error_code", code=1, times=1)
    r = await env.new_client()
    assert r.status_code == 200
    assert error_code(r) == 1
    assert r.json()["description"]
    assert env.sandbox.clients == {}
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.status, rec.error_code) == (200, 1)
    assert error_code(await env.new_client()) is None


async def test_delay_fault_slows_then_answers_normally(env: Env) -> None:
    await env.fault(mode="delay", seconds=0.3, times=1)
    started = time.perf_counter()
    r = await env.new_client()
    assert time.perf_counter() - started >= 0.3
    # A delay is not a failure: the request is processed after the pause.
    assert error_code(r) is None
    assert len(env.sandbox.clients) == 1
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert rec.fault is not None
    assert rec.fault["mode"] == "delay"
    assert rec.duration_ms is not None
    assert rec.duration_ms >= 300


async def test_delay_longer_than_client_timeout_still_applies(env: Env) -> None:
    # The ambiguous outcome a relay must survive: it timed out, yet the client exists.
    await env.fault(mode="delay", seconds=0.5)
    with pytest.raises(httpx.ReadTimeout):
        await env.http.post(
            "/new-client",
            json={"client": {"phoneNumber": PHONE}},
            headers={"X-Processing-Key": KEY},
            timeout=0.1,
        )
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert rec.status == 200
    assert len(env.sandbox.clients) == 1
    assert error_code(await env.new_client()) == 24


async def test_drop_fault_closes_connection_without_answer(env: Env) -> None:
    await env.fault(mode="drop", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await env.new_client()
    assert env.sandbox.clients == {}
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.outcome, rec.status) == ("dropped", None)
    # The next request, on a new connection, is served normally.
    assert error_code(await env.new_client()) is None
    assert len(env.sandbox.clients) == 1


async def test_drop_fault_without_a_socket_raises() -> None:
    sandbox = MaxmaSandbox()
    sandbox.add_fault({"mode": "drop"})
    transport = httpx.ASGITransport(app=create_maxma_app({KEY}, sandbox))
    async with httpx.AsyncClient(transport=transport, base_url="http://maxma") as http:
        with pytest.raises(ConnectionError):
            await http.post(
                "/new-client", json={"client": {"phoneNumber": PHONE}}, headers={"X-Processing-Key": KEY}
            )
    assert sandbox.clients == {}
    assert [r.outcome for r in sandbox.requests] == ["dropped"]


async def test_fault_path_filter(env: Env) -> None:
    await env.fault(mode="error_code", code=49, path="/get-balance", times=1)
    assert error_code(await env.new_client()) is None  # other methods are untouched
    assert error_code(await env.call("get-balance", {"phoneNumber": PHONE})) == 49
    assert error_code(await env.call("get-balance", {"phoneNumber": PHONE})) is None
    await env.fault(mode="http_status", status=502, path="v2/set-order")  # leading slash optional
    assert error_code(await env.call("confirm-order", {"orderId": "x"})) == 31
    assert (await env.call("v2/set-order", order("o-1"))).status_code == 502


async def test_probability_fault_is_seeded_and_repeatable(env: Env) -> None:
    await env.fault(mode="http_status", status=503, probability=0.5, seed=7, path="/get-balance")
    statuses = [(await env.call("get-balance", {"externalId": "x"})).status_code for _ in range(20)]
    rng = random.Random(7)
    assert statuses == [503 if rng.random() < 0.5 else 200 for _ in range(20)]
    assert 0 < statuses.count(503) < 20
    [active] = await env.control("faults")  # unlimited until cleared
    assert active["hits"] == statuses.count(503)
    assert (await env.http.delete("/_sandbox/faults")).json() == {"cleared": 1}
    assert (await env.call("get-balance", {"externalId": "x"})).status_code == 200


async def test_faults_are_applied_in_order_and_cleared(env: Env) -> None:
    await env.fault(mode="http_status", status=503)
    await env.fault(mode="error_code", code=1)
    await env.fault(mode="drop", times=3)
    assert (await env.new_client()).status_code == 503
    assert error_code(await env.new_client()) == 1
    assert len(await env.control("faults")) == 1
    assert (await env.http.delete("/_sandbox/faults")).json() == {"cleared": 1}
    assert error_code(await env.new_client()) is None


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "http_status"},
        {"mode": "http_status", "status": 200},
        {"mode": "error_code"},
        {"mode": "delay"},
        {"mode": "delay", "seconds": 1, "code": 3},
        {"mode": "drop", "path": "/set-order"},
        {"mode": "drop", "times": 0},
        {"mode": "drop", "probability": 1.5},
        {"mode": "explode"},
    ],
)
async def test_invalid_fault_spec_is_422(env: Env, spec: dict[str, Any]) -> None:
    r = await env.http.post("/_sandbox/faults", json=spec)
    assert r.status_code == 422, spec
    assert env.sandbox.faults == []


# ---- latency, reset, waiting -------------------------------------------------------------------


async def test_latency_delays_every_answer(env: Env) -> None:
    assert (await env.http.post("/_sandbox/latency", json={"ms": 200})).json() == {"ms": 200}
    for call in (env.new_client(), env.call("get-balance", {"phoneNumber": OTHER_PHONE})):
        started = time.perf_counter()
        await call
        assert time.perf_counter() - started >= 0.2
    await env.http.post("/_sandbox/latency", json={"ms": 0})
    assert (await env.http.get("/_sandbox/latency")).json() == {"ms": 0}


async def test_reset_clears_everything(env: Env) -> None:
    await env.new_client()
    await env.call("v2/set-order", order("o-1"))
    await env.fault(mode="drop", times=5)
    await env.http.post("/_sandbox/latency", json={"ms": 10})
    assert (await env.http.post("/_sandbox/reset")).json() == {"ok": True}
    for what in ("clients", "orders", "requests", "faults"):
        assert await env.control(what) == [], what
    assert env.sandbox.latency_ms == 0
    # Counters restart too, so generated cards are deterministic per test.
    assert (await env.new_client()).json()["client"]["cardString"] == "2222000000001"


async def test_wait_for_requests(env: Env) -> None:
    waiter = asyncio.create_task(env.sandbox.wait_for_requests(2, timeout=5, path="/get-balance"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await env.new_client()
    await env.call("get-balance", {"phoneNumber": PHONE})
    await env.call("get-balance", {"phoneNumber": OTHER_PHONE})
    recs = await waiter
    assert [(r.path, r.error_code) for r in recs] == [("/get-balance", None), ("/get-balance", 3)]
    with pytest.raises(TimeoutError, match="3 of 4"):
        await env.sandbox.wait_for_requests(4, timeout=0.1)


async def test_requests_filter_by_path(env: Env) -> None:
    await env.new_client()
    await env.call("get-balance", {"phoneNumber": PHONE})
    recs = (await env.http.get("/_sandbox/requests", params={"path": "/get-balance"})).json()
    assert [r["path"] for r in recs] == ["/get-balance"]


async def test_a_fault_can_aim_at_one_client(app_server: Any) -> None:
    sandbox = MaxmaSandbox()
    async with app_server(create_maxma_app(state=sandbox)) as url, httpx.AsyncClient(base_url=url) as http:
        sandbox.add_fault({"mode": "http_status", "status": 503, "times": 1, "match": {"externalId": "B"}})
        headers = {"X-Processing-Key": "k"}
        a = await http.post(
            "/new-client",
            json={"client": {"phoneNumber": "+79161111111", "externalId": "A"}},
            headers=headers,
        )
        b = await http.post(
            "/new-client",
            json={"client": {"phoneNumber": "+79162222222", "externalId": "B"}},
            headers=headers,
        )
        b2 = await http.post(
            "/new-client",
            json={"client": {"phoneNumber": "+79162222222", "externalId": "B"}},
            headers=headers,
        )
    assert (a.status_code, b.status_code, b2.status_code) == (200, 503, 200)
    assert sorted(c.external_id for c in sandbox.clients.values()) == ["A", "B"]
