"""Unit tests for services.maxma.client: classification of Maxma's answers and the request it sends.

HTTP is mocked with respx; no network.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import respx

from services.common.outcome import Outcome, OutcomeKind
from services.maxma.client import MaxmaClient, classify

BASE = "https://api.maxma.test/v2"
KEY = "mx-processing-key-5f1e2d3c"
IDEM = "maxma:new-client:0f8e7d6c5b4a39281706f5e4d3c2b1a0"
BODY = {
    "client": {
        "phoneNumber": "+79991234567",
        "externalId": "1842",
        "fullName": "Иванова Анна Сергеевна",
        "surname": "Иванова",
        "name": "Анна",
        "patronymicName": "Сергеевна",
    }
}
SUCCESS = {
    "client": {
        "phoneNumber": "+79991234567",
        "card": 2220000257862891,
        "cardString": "2220000257862891",
        "name": "Анна",
        "fullName": "Иванова Анна Сергеевна",
        "gender": 2,
        "level": 1,
        "isEmailSubscribed": True,
        "isPhoneSubscribed": True,
        "bonuses": 0,
        "pendingBonuses": 0,
    },
    "bonuses": [],
}
HTML = b"<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"


def answer(status: int, body: Any = None, headers: dict[str, str] | None = None) -> Outcome:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return classify(status, httpx.Headers(headers or {}), raw)


def error(code: int, description: str = "") -> dict[str, Any]:
    return {"errorCode": code, "description": description}


# ---------------------------------------------------------------------------------------------------------
# classify


def test_success_target_ref_is_the_card_string() -> None:
    o = answer(200, SUCCESS)
    assert o.kind is OutcomeKind.SUCCESS
    assert o.ok
    assert o.target_ref == "2220000257862891"
    assert o.http_status == 200
    assert o.vendor_code is None


def test_success_falls_back_to_card_then_external_id() -> None:
    assert answer(200, {"client": {"card": 2220000257862891}}).target_ref == "2220000257862891"
    assert answer(200, {"client": {"externalId": "1842"}}).target_ref == "1842"
    o = answer(200, {"bonuses": []})
    assert o.ok
    assert o.target_ref is None


def test_error_code_zero_is_success() -> None:
    assert answer(200, {"errorCode": 0, **SUCCESS}).ok


@pytest.mark.parametrize("code", [24, 30])
def test_already_exists_is_success_with_vendor_code(code: int) -> None:
    o = answer(200, error(code, "Клиент уже существует"))
    assert o.kind is OutcomeKind.SUCCESS
    assert o.vendor_code == str(code)
    assert "already exists" in o.reason


def test_card_bound_to_another_client_is_permanent_never_success() -> None:
    o = answer(200, error(25, "Карта уже привязана к другому клиенту"))
    assert o.kind is OutcomeKind.PERMANENT
    assert not o.ok
    assert o.vendor_code == "25"
    assert "Карта уже привязана к другому клиенту" in o.reason
    assert o.http_status == 200


@pytest.mark.parametrize("code", [17, 32])
def test_already_processed_is_success(code: int) -> None:
    o = answer(200, error(code, "Уже обработано"))
    assert o.kind is OutcomeKind.SUCCESS
    assert o.vendor_code == str(code)


@pytest.mark.parametrize("code", [1, 49])
def test_try_later_codes_are_retryable(code: int) -> None:
    o = answer(200, error(code, "Сервис временно недоступен"))
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.vendor_code == str(code)
    assert "Сервис временно недоступен" in o.reason


def test_try_later_without_description_has_a_reason() -> None:
    o = answer(200, {"errorCode": 49})
    assert o.kind is OutcomeKind.RETRYABLE
    assert "temporarily unavailable" in o.reason


@pytest.mark.parametrize("code", [2, 20, 29, 3, 22, 99])
def test_other_vendor_codes_are_permanent(code: int) -> None:
    o = answer(200, error(code, "Неверный формат телефона"))
    assert o.kind is OutcomeKind.PERMANENT
    assert o.vendor_code == str(code)
    assert o.reason.startswith(f"Maxma {code}:")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retryable(status: int) -> None:
    o = answer(status, HTML)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status == status
    assert o.retry_after is None


def test_5xx_with_a_vendor_error_code_is_still_retryable() -> None:
    o = answer(503, error(2, "Ошибка валидации"))
    assert o.kind is OutcomeKind.RETRYABLE


def test_429_with_retry_after_seconds() -> None:
    o = answer(429, error(1, "Too many requests"), {"Retry-After": "7"})
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status == 429
    assert o.retry_after == 7.0


def test_503_with_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    o = answer(503, HTML, {"Retry-After": when})
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.retry_after is not None
    assert 110 <= o.retry_after <= 121


def test_429_with_junk_retry_after() -> None:
    o = answer(429, b"", {"Retry-After": "soon"})
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.retry_after is None


def test_non_ascii_retry_after_does_not_crash_classification() -> None:
    # A proxy's garbage header: the answer must still be classified, not raise.
    o = classify(429, httpx.Headers([(b"retry-after", b"\xb2")]), b"")
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.retry_after is None


@pytest.mark.parametrize("status", [401, 403])
def test_auth_errors_are_permanent(status: int) -> None:
    o = answer(status, error(22, "Неверный ключ процессинга"))
    assert o.kind is OutcomeKind.PERMANENT
    assert o.http_status == status
    assert o.vendor_code == "22"
    assert "processing key" in o.reason


def test_401_without_body_is_permanent() -> None:
    o = answer(401, b"")
    assert o.kind is OutcomeKind.PERMANENT
    assert o.vendor_code is None


def test_200_html_page_is_retryable() -> None:
    o = answer(
        200,
        b"<!DOCTYPE html><html><body>\xd0\xa2\xd0\xb5\xd1\x85\xd1\x80\xd0\xb0\xd0\xb1\xd0\xbe\xd1\x82\xd1\x8b</body></html>",
    )
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status == 200


@pytest.mark.parametrize("body", [b"", b"[]", b'"ok"', b"\xff\xfe"])
def test_200_without_a_json_object_is_retryable(body: bytes) -> None:
    assert answer(200, body).kind is OutcomeKind.RETRYABLE


@pytest.mark.parametrize("status", [400, 404, 422])
def test_other_4xx_without_vendor_code_is_permanent(status: int) -> None:
    assert answer(status, HTML).kind is OutcomeKind.PERMANENT
    assert answer(status, {"message": "bad"}).kind is OutcomeKind.PERMANENT


def test_4xx_with_already_exists_code_is_success() -> None:
    o = answer(400, error(24, "Клиент с таким телефоном уже существует"))
    assert o.ok
    assert o.vendor_code == "24"


# ---------------------------------------------------------------------------------------------------------
# MaxmaClient.call with a mocked transport


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncBaseTransport]:
    # respx intercepts httpx's own transport; production uses the aiohttp one (same interface).
    async with httpx.AsyncHTTPTransport() as transport:
        yield transport


@pytest.fixture
def mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=BASE, assert_all_called=False) as router:
        yield router


def maxma(http: httpx.AsyncBaseTransport) -> MaxmaClient:
    return MaxmaClient(http, BASE + "/", KEY, timeout_s=3.0)


async def test_call_sends_the_request_maxma_expects(
    http: httpx.AsyncBaseTransport, mock: respx.MockRouter
) -> None:
    route = mock.post("/new-client").respond(200, json=SUCCESS)
    o = await maxma(http).new_client(BODY, idempotency_key=IDEM)
    assert o.ok
    assert o.target_ref == "2220000257862891"
    assert route.call_count == 1
    req = route.calls.last.request
    assert req.method == "POST"
    assert str(req.url) == f"{BASE}/new-client"
    assert req.headers["X-Processing-Key"] == KEY
    assert req.headers["Idempotency-Key"] == IDEM
    assert req.headers["Accept"] == "application/json"
    assert req.headers["Content-Type"] == "application/json"
    assert json.loads(req.content) == BODY


async def test_call_other_method(http: httpx.AsyncBaseTransport, mock: respx.MockRouter) -> None:
    route = mock.post("/set-order").respond(200, json=error(32, "Заказ уже обработан"))
    o = await maxma(http).call("set-order", {"orderId": "55017"}, idempotency_key=IDEM)
    assert o.ok
    assert o.vendor_code == "32"
    assert route.called


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "vendor_code", "retry_after"),
    [
        (200, error(30, "Клиент с таким externalId уже существует"), {}, OutcomeKind.SUCCESS, "30", None),
        (200, error(25, "Карта уже привязана к другому клиенту"), {}, OutcomeKind.PERMANENT, "25", None),
        (200, error(49, "Временно недоступно"), {}, OutcomeKind.RETRYABLE, "49", None),
        (429, {"errorCode": 1}, {"Retry-After": "7"}, OutcomeKind.RETRYABLE, None, 7.0),
        (502, HTML, {}, OutcomeKind.RETRYABLE, None, None),
        (401, error(22, "Неверный ключ"), {}, OutcomeKind.PERMANENT, "22", None),
        (200, HTML, {"Content-Type": "text/html"}, OutcomeKind.RETRYABLE, None, None),
    ],
)
async def test_call_classifies_the_answer(
    http: httpx.AsyncBaseTransport,
    mock: respx.MockRouter,
    status: int,
    body: Any,
    headers: dict[str, str],
    kind: OutcomeKind,
    vendor_code: str | None,
    retry_after: float | None,
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    mock.post("/new-client").respond(status, content=content, headers=headers)
    o = await maxma(http).new_client(BODY, idempotency_key=IDEM)
    assert o.kind is kind
    assert o.http_status == status
    assert o.vendor_code == vendor_code
    assert o.retry_after == retry_after


async def test_call_connect_error_is_retryable(
    http: httpx.AsyncBaseTransport, mock: respx.MockRouter
) -> None:
    mock.post("/new-client").mock(side_effect=httpx.ConnectError("Connection refused"))
    o = await maxma(http).new_client(BODY, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.http_status is None
    assert "connection failed" in o.reason
    assert "ConnectError" in o.reason


@pytest.mark.parametrize(
    "exc", [httpx.ConnectTimeout, httpx.ReadTimeout, httpx.PoolTimeout, httpx.WriteTimeout]
)
async def test_call_timeout_is_retryable(
    http: httpx.AsyncBaseTransport, mock: respx.MockRouter, exc: type[httpx.TimeoutException]
) -> None:
    mock.post("/new-client").mock(side_effect=exc("timed out"))
    o = await maxma(http).new_client(BODY, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.reason.startswith("timeout:")


async def test_call_remote_protocol_error_is_retryable(
    http: httpx.AsyncBaseTransport, mock: respx.MockRouter
) -> None:
    mock.post("/new-client").mock(side_effect=httpx.RemoteProtocolError("Server disconnected"))
    o = await maxma(http).new_client(BODY, idempotency_key=IDEM)
    assert o.kind is OutcomeKind.RETRYABLE


def test_request_timeout_408_is_retryable() -> None:
    out = classify(408, httpx.Headers(), b"")
    assert out.kind is OutcomeKind.RETRYABLE
    assert out.http_status == 408
    assert out.throttle


@pytest.mark.parametrize(("code", "kind"), [("24", OutcomeKind.SUCCESS), ("25", OutcomeKind.PERMANENT)])
def test_error_code_sent_as_a_string_is_read_as_the_number(code: str, kind: OutcomeKind) -> None:
    out = classify(200, httpx.Headers(), json.dumps({"errorCode": code, "description": "x"}).encode())
    assert out.kind is kind
    assert out.vendor_code == code


# Every code of targets.md's table, with its class: (kind, opens the connection's circuit, throttle).
CODE_TABLE: dict[int, tuple[OutcomeKind, bool, bool]] = {
    1: (OutcomeKind.RETRYABLE, False, False),
    49: (OutcomeKind.RETRYABLE, False, False),
    28: (OutcomeKind.RETRYABLE, False, True),
    **dict.fromkeys((2, 18, 20, 29), (OutcomeKind.PERMANENT, False, False)),
    3: (OutcomeKind.PERMANENT, False, False),
    **dict.fromkeys((4, 5, 22, 23), (OutcomeKind.PERMANENT, True, False)),
    **dict.fromkeys((24, 30, 17, 32), (OutcomeKind.SUCCESS, False, False)),
    **dict.fromkeys((25, 48, 31, 21), (OutcomeKind.PERMANENT, False, False)),
    **dict.fromkeys((6, 7, 10, 11, 13, 33, 34, 35, 36, 37, 40, 41, 42, 43, 44, 45, 46, 47),
                    (OutcomeKind.PERMANENT, False, False)),
}  # fmt: skip


@pytest.mark.parametrize(("code", "expected"), sorted(CODE_TABLE.items()))
def test_every_documented_code_has_its_class(code: int, expected: tuple[OutcomeKind, bool, bool]) -> None:
    o = answer(200, {"errorCode": code, "description": "Ошибка", "hint": "Проверьте настройки"})
    assert (o.kind, o.opens_circuit, o.throttle) == expected
    assert o.vendor_code == str(code)
    if o.kind is not OutcomeKind.SUCCESS:
        assert o.hint == "Проверьте настройки"  # kept for the dead letter's headers


def test_a_broken_connection_without_a_hint_gets_ours() -> None:
    o = answer(200, {"errorCode": 5, "description": "Магазин не найден"})
    assert o.opens_circuit
    assert o.hint is not None
    assert "shop_code" in o.hint


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_open_the_circuit(status: int) -> None:
    assert answer(status, {"errorCode": 22, "description": "x"}).opens_circuit
