"""services.cpahouse.client: how an answer of send_order is classified, and the request against the sandbox.

``classify`` is fed answers directly; ``CpaHouseClient`` talks over real HTTP (uvicorn, the service's pooled
transport) to the strict CPA.House sandbox.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.common.httpclient import make_transport
from services.common.outcome import Outcome, OutcomeKind
from services.cpahouse.client import CpaHouseClient, classify
from services.sandbox.cpahouse import SEND_ORDER_PATH, CpaHouseSandbox, create_cpahouse_app
from tests.cpahouse.support import KEY, WEBMASTER
from tests.support import serve_app

HTML = b"<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"
IDEM = "cpahouse:cpahouse:lead:0f8e7d6c5b4a39281706f5e4d3c2b1a0"
FORM = {
    "api_key": KEY,
    "id_webmaster": WEBMASTER,
    "name": "Иванова Анна Сергеевна",
    "phone": "+79161234567",
    "id_offer": "501",
    "id_source": "11",
    "id_stream": "21",
    "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
    "ip_address": "203.0.113.10",
    "county_code": "RU",
    "sub_id_1": "1842",
}


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Outcome:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return classify(status, httpx.Headers(headers or {}), raw)


# ---------------------------------------------------------------------------------------------------------
# classify


def test_success_with_an_id() -> None:
    o = answer(200, {"status": "success", "id": 17})
    assert o.kind is OutcomeKind.SUCCESS
    assert o.ok
    assert (o.target_ref, o.http_status, o.skipped, o.opens_circuit) == ("17", 200, None, False)


def test_success_without_an_id() -> None:
    # The real answer may carry no id at all (targets.md section 4).
    o = answer(200, {"status": "success"})
    assert o.ok
    assert o.target_ref is None
    assert answer(200, {"status": "success", "order_id": "A-9"}).target_ref == "A-9"
    assert answer(201, {"status": "success", "id": 3}).ok


def test_error_with_msg_is_permanent_with_the_msg() -> None:
    o = answer(200, {"status": "error", "msg": "Неверный номер телефона (phone) для страны RU"})
    assert o.kind is OutcomeKind.PERMANENT
    assert not o.ok
    assert "Неверный номер телефона (phone) для страны RU" in o.reason
    assert o.reason.startswith("CPA.House: ")
    assert o.http_status == 200
    assert o.opens_circuit is False  # this lead's problem, not the connection's


def test_error_without_msg_still_has_a_reason() -> None:
    assert answer(200, {"status": "error"}).reason == "CPA.House: error"
    assert answer(200, {"status": "fail", "message": "Дубль"}).reason == "CPA.House: Дубль"
    o = answer(200, {})
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == "CPA.House: HTTP 200"


def test_a_long_msg_is_cut() -> None:
    o = answer(200, {"status": "error", "msg": "ошибка " * 200})
    assert len(o.reason) <= len("CPA.House: ") + 500


@pytest.mark.parametrize(
    "msg",
    [
        "Неверный api_key",
        "id_webmaster не соответствует api_key",
        "Неверный ID_WEBMASTER",
        "Оффер не найден: id_offer",
        "Поток id_stream отключён",
        "Источник id_source не принадлежит вебмастеру",
        "Неверный ключ",
    ],
)
def test_a_msg_naming_the_credentials_or_ids_opens_the_circuit(msg: str) -> None:
    o = answer(200, {"status": "error", "msg": msg})
    assert o.kind is OutcomeKind.PERMANENT
    assert o.opens_circuit is True
    assert msg in o.reason


def test_success_is_never_taken_from_an_error_status() -> None:
    # "success" in the body of a 4xx: the API did not take the lead.
    o = answer(400, {"status": "success", "id": 1})
    assert o.kind is OutcomeKind.PERMANENT


@pytest.mark.parametrize("status", [401, 403])
@pytest.mark.parametrize("body", [HTML, {"status": "error", "msg": "Forbidden"}, b""])
def test_401_and_403_open_the_circuit(status: int, body: Any) -> None:
    o = answer(status, body)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.opens_circuit is True
    assert o.http_status == status
    assert "api_key" in o.reason


def test_429_with_retry_after() -> None:
    o = answer(429, {"status": "error", "msg": "Too many requests"}, {"Retry-After": "7"})
    assert o.kind is OutcomeKind.RETRYABLE
    assert (o.http_status, o.retry_after, o.throttle) == (429, 7.0, True)
    no_header = answer(429, HTML)
    assert no_header.kind is OutcomeKind.RETRYABLE
    assert no_header.retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
@pytest.mark.parametrize("body", [HTML, {"status": "error", "msg": "Неверный api_key"}, b""])
def test_5xx_is_retryable(status: int, body: Any) -> None:
    o = answer(status, body)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status == status
    assert o.opens_circuit is False


@pytest.mark.parametrize("body", [HTML, b"", b"not json", b"[1, 2]", b'"success"', b"null", b"\xff\xfe"])
def test_http_200_without_a_json_object_is_retryable(body: bytes) -> None:
    # A proxy or maintenance page in front of the API: the lead may still be taken later.
    o = answer(200, body)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status == 200


@pytest.mark.parametrize("status", [400, 404, 405, 422])
def test_a_4xx_without_json_is_permanent(status: int) -> None:
    o = answer(status, HTML)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == f"HTTP {status}"
    assert o.opens_circuit is False


def test_a_4xx_with_a_msg_keeps_the_msg() -> None:
    o = answer(400, {"status": "error", "msg": "Не передан обязательный параметр: phone"})
    assert o.kind is OutcomeKind.PERMANENT
    assert "Не передан обязательный параметр: phone" in o.reason


# ---------------------------------------------------------------------------------------------------------
# CpaHouseClient.send_order over HTTP against the sandbox


@dataclass
class Served:
    sandbox: CpaHouseSandbox
    url: str


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    sandbox = CpaHouseSandbox()
    async with serve_app(
        create_cpahouse_app({KEY: WEBMASTER, "cpa-other-key-987654321": "2002"}, sandbox)
    ) as url:
        yield Served(sandbox, url)


@pytest.fixture
def sandbox(served: Served) -> Iterator[CpaHouseSandbox]:
    served.sandbox.reset()
    yield served.sandbox
    served.sandbox.reset()


@pytest.fixture
async def transport() -> AsyncIterator[httpx.AsyncBaseTransport]:
    t = make_transport(10)
    try:
        yield t
    finally:
        await t.aclose()


@pytest.fixture
def api(served: Served, transport: httpx.AsyncBaseTransport) -> CpaHouseClient:
    return CpaHouseClient(transport, served.url, timeout_s=5)


async def test_send_order_creates_a_lead(api: CpaHouseClient, sandbox: CpaHouseSandbox) -> None:
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.ok
    assert (o.target_ref, o.http_status) == ("1", 200)
    [lead] = sandbox.leads
    assert (lead.name, lead.phone, lead.county_code, lead.sub_id_1) == ("Иванова Анна Сергеевна", "+79161234567",
                                                                         "RU", "1842")  # fmt: skip
    assert (lead.id_webmaster, lead.id_offer, lead.id_source, lead.id_stream) == ("1001", "501", "11", "21")
    [rec] = sandbox.requests
    assert (rec.method, rec.path) == ("POST", SEND_ORDER_PATH)
    assert rec.content_type == "application/x-www-form-urlencoded"
    assert rec.fields == {k: v for k, v in FORM.items() if k != "api_key"}
    assert rec.repeated == []
    assert rec.key_valid is True
    assert o.target_ref == str(rec.lead_id)


async def test_the_api_key_never_reaches_the_sandboxs_log(
    api: CpaHouseClient, sandbox: CpaHouseSandbox, served: Served
) -> None:
    assert (await api.send_order(FORM, idempotency_key=IDEM)).ok
    assert not (await api.send_order({**FORM, "phone": "bad"}, idempotency_key=IDEM)).ok
    assert len(sandbox.requests) == 2
    logged = json.dumps([r.to_dict() for r in sandbox.requests], ensure_ascii=False, default=str)
    assert KEY not in logged
    assert KEY not in repr(sandbox.requests)
    assert KEY not in repr(sandbox.leads)
    async with httpx.AsyncClient(base_url=served.url) as http:
        for what in ("requests", "leads"):
            r = await http.get(f"/_sandbox/{what}")
            assert r.status_code == 200
            assert KEY not in r.text


async def test_a_base_url_with_a_trailing_slash(
    served: Served, transport: httpx.AsyncBaseTransport, sandbox: CpaHouseSandbox
) -> None:
    api = CpaHouseClient(transport, served.url + "/", timeout_s=5)
    assert (await api.send_order(FORM, idempotency_key=IDEM)).ok
    assert [r.path for r in sandbox.requests] == [SEND_ORDER_PATH]


async def test_a_refused_lead_is_permanent_with_the_sandboxs_msg(
    api: CpaHouseClient, sandbox: CpaHouseSandbox
) -> None:
    o = await api.send_order({**FORM, "phone": "+79161234"}, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.PERMANENT
    assert "Неверный номер телефона" in o.reason
    assert o.opens_circuit is False
    assert sandbox.leads == []


async def test_a_wrong_api_key_opens_the_circuit(api: CpaHouseClient, sandbox: CpaHouseSandbox) -> None:
    o = await api.send_order({**FORM, "api_key": "cpa-unknown-key-000000"}, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.opens_circuit is True
    assert "api_key" in o.reason
    assert sandbox.requests[0].key_valid is False


async def test_a_webmaster_of_another_key_opens_the_circuit(
    api: CpaHouseClient, sandbox: CpaHouseSandbox
) -> None:
    o = await api.send_order({**FORM, "id_webmaster": "2002"}, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.opens_circuit is True
    assert "id_webmaster" in o.reason


async def test_a_dropped_connection_is_retryable(api: CpaHouseClient, sandbox: CpaHouseSandbox) -> None:
    sandbox.add_fault({"mode": "drop"})
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status is None
    assert KEY not in o.reason
    assert sandbox.leads == []
    assert sandbox.requests[0].outcome == "dropped"
    # The pool recovers: the next attempt is answered.
    assert (await api.send_order(FORM, idempotency_key=IDEM)).ok
    assert len(sandbox.leads) == 1


async def test_a_dropped_connection_is_a_network_failure_not_a_timeout(
    api: CpaHouseClient, sandbox: CpaHouseSandbox
) -> None:
    sandbox.add_fault({"mode": "drop"})
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.reason.startswith("connection failed")
    assert o.throttle is False


async def test_a_503_fault_is_retryable(api: CpaHouseClient, sandbox: CpaHouseSandbox) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 503})
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status == 503
    assert sandbox.leads == []


async def test_a_429_fault_carries_its_retry_after(api: CpaHouseClient, sandbox: CpaHouseSandbox) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 429, "retry_after": 30})
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert (o.http_status, o.retry_after, o.throttle) == (429, 30.0, True)


async def test_an_error_msg_fault_is_permanent(api: CpaHouseClient, sandbox: CpaHouseSandbox) -> None:
    sandbox.add_fault({"mode": "error_msg", "msg": "Сервис временно недоступен"})
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == "CPA.House: Сервис временно недоступен"
    assert sandbox.leads == []


async def test_a_slow_answer_times_out_as_retryable(
    served: Served, transport: httpx.AsyncBaseTransport, sandbox: CpaHouseSandbox
) -> None:
    sandbox.add_fault({"mode": "delay", "seconds": 1.0})
    api = CpaHouseClient(transport, served.url, timeout_s=0.2)
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.throttle is True
    assert "timeout" in o.reason


async def test_nothing_listens_is_retryable(transport: httpx.AsyncBaseTransport) -> None:
    from tests.support import free_port

    api = CpaHouseClient(transport, f"http://127.0.0.1:{free_port()}", timeout_s=2)
    o = await api.send_order(FORM, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status is None
