"""services.common.vendorhttp: Retry-After, what is worth a retry, and one-call sends to a real HTTP server."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common.httpclient import make_transport
from services.common.outcome import OutcomeKind
from services.common.vendorhttp import (
    Failure,
    error_failure,
    error_outcome,
    parse_retry_after,
    send,
    status_failure,
    status_outcome,
)
from tests.support import free_port, serve_app

NOW = 1445412470.0  # Wed, 21 Oct 2015 07:27:50 GMT

# ---------------------------------------------------------------------------------------------- Retry-After


@pytest.mark.parametrize(("value", "seconds"), [("7", 7.0), (" 120 ", 120.0), ("0", 0.0), ("007", 7.0)])
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    assert parse_retry_after(value) == seconds


@pytest.mark.parametrize(
    "value",
    [
        "Wed, 21 Oct 2015 07:28:00 GMT",  # IMF-fixdate
        "Wednesday, 21-Oct-15 07:28:00 GMT",  # RFC 850
        "Wed Oct 21 07:28:00 2015",  # asctime: no zone, read as UTC
        "Wed, 21 Oct 2015 10:28:00 +0300",
    ],
)
def test_retry_after_as_an_http_date(value: str) -> None:
    assert parse_retry_after(value, now=NOW) == 10.0


def test_retry_after_date_uses_the_clock_by_default() -> None:
    waited = parse_retry_after(email.utils.formatdate(time.time() + 120, usegmt=True))
    assert waited is not None
    assert 110 <= waited <= 121


def test_retry_after_in_the_past_is_now_never_negative() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now=NOW) == 0.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now=NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "через минуту",
        "1.5",
        "1e3",
        "-5",
        "-0",
        "+5",
        "²",  # str.isdigit() says yes, float() says no
        "٣",  # an Arabic-Indic three
        "Wed, 21 Oct 99999 07:28:00 GMT",
        "Wed, 32 Oct 2015 07:28:00 GMT",
    ],
)
def test_retry_after_garbage_and_negative_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now=NOW) is None


def test_huge_retry_after_is_not_capped_here() -> None:
    # Callers cap: Klientiks waits 30 s at most, the delivery policy takes what the vendor asks.
    assert parse_retry_after("86400000") == 86400000.0
    assert parse_retry_after("Fri, 31 Dec 9999 23:59:59 GMT", now=NOW) == pytest.approx(253402300799.0 - NOW)


# ---------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "failure"),
    [
        (200, None),
        (201, None),
        (204, None),
        (301, None),
        (302, None),
        (400, None),
        (401, None),
        (403, None),
        (404, None),
        (409, None),
        (422, None),
        (499, None),
        (408, Failure.TIMEOUT),
        (429, Failure.RATE_LIMITED),
        (500, Failure.SERVER_ERROR),
        (502, Failure.SERVER_ERROR),
        (503, Failure.SERVER_ERROR),
        (504, Failure.SERVER_ERROR),
        (599, Failure.SERVER_ERROR),
    ],
)
def test_status_classification(status: int, failure: Failure | None) -> None:
    assert status_failure(status) is failure


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (httpx.ConnectTimeout("t"), Failure.TIMEOUT),
        (httpx.ReadTimeout("t"), Failure.TIMEOUT),
        (httpx.WriteTimeout("t"), Failure.TIMEOUT),
        (httpx.PoolTimeout("t"), Failure.TIMEOUT),
        (TimeoutError(), Failure.TIMEOUT),
        (httpx.ConnectError("refused"), Failure.NETWORK),
        (httpx.ReadError("reset"), Failure.NETWORK),
        (httpx.WriteError("broken pipe"), Failure.NETWORK),
        (httpx.RemoteProtocolError("server disconnected"), Failure.NETWORK),
        (httpx.ProxyError("proxy"), Failure.NETWORK),
        (httpx.UnsupportedProtocol("ftp"), Failure.NETWORK),
        # Not the network: a bug or a cancellation must surface, not be retried.
        (httpx.DecodingError("gzip"), None),
        (ValueError("x"), None),
        (asyncio.CancelledError(), None),
    ],
)
def test_exception_classification(exc: BaseException, failure: Failure | None) -> None:
    assert error_failure(exc) is failure


@pytest.mark.parametrize(
    ("failure", "throttle"),
    [
        (Failure.TIMEOUT, True),
        (Failure.RATE_LIMITED, True),
        (Failure.NETWORK, False),
        (Failure.SERVER_ERROR, False),
    ],
)
def test_throttle_after_timeouts_and_429_only(failure: Failure, throttle: bool) -> None:
    assert failure.throttle is throttle


def test_failure_values_are_the_stable_reason_codes() -> None:
    assert [f.value for f in Failure] == ["timeout", "network", "rate_limited", "server_error"]


@pytest.mark.parametrize(
    ("status", "headers", "retry_after", "throttle"),
    [
        (429, {"Retry-After": "7"}, 7.0, True),
        (408, {}, None, True),
        (500, {}, None, False),
        (503, {"Retry-After": "soon"}, None, False),
        (503, {"Retry-After": "120"}, 120.0, False),
    ],
)
def test_status_outcome(
    status: int, headers: dict[str, str], retry_after: float | None, throttle: bool
) -> None:
    outcome = status_outcome(status, httpx.Headers(headers))
    assert outcome is not None
    assert outcome.kind is OutcomeKind.RETRYABLE
    assert outcome.reason == f"HTTP {status}"
    assert outcome.http_status == status
    assert outcome.retry_after == retry_after
    assert outcome.throttle is throttle


@pytest.mark.parametrize("status", [200, 400, 401, 404])
def test_status_outcome_leaves_other_statuses_to_the_vendor(status: int) -> None:
    assert status_outcome(status, httpx.Headers({"Retry-After": "7"})) is None


def test_status_outcome_survives_a_non_ascii_retry_after() -> None:
    outcome = status_outcome(429, httpx.Headers([(b"retry-after", b"\xb2")]))
    assert outcome is not None
    assert outcome.retry_after is None


def test_error_outcome_names_the_type_never_the_message() -> None:
    url = "https://vendor.example/t/SECRET-TOKEN/clients"
    timeout = error_outcome(httpx.ReadTimeout(f"timed out reading {url}"))
    assert (timeout.kind, timeout.reason, timeout.throttle) == (
        OutcomeKind.RETRYABLE,
        "timeout: ReadTimeout",
        True,
    )
    assert error_outcome(TimeoutError()).reason == "timeout: TimeoutError"
    refused = error_outcome(httpx.ConnectError(f"cannot connect to {url}"))
    assert (refused.kind, refused.reason, refused.throttle) == (
        OutcomeKind.RETRYABLE,
        "connection failed: ConnectError",
        False,
    )
    assert refused.http_status is None


# ---------------------------------------------------------------------------------------------- send


async def echo(request: Request) -> Response:
    body = await request.body()
    return JSONResponse(
        {
            "method": request.method,
            "path": request.url.path,
            "query": request.url.query,
            "content_type": request.headers.get("content-type"),
            "content_length": request.headers.get("content-length"),
            "idempotency_key": request.headers.get("idempotency-key"),
            "body": body.decode(),
        }
    )


async def status(request: Request) -> Response:
    code = int(request.path_params["code"])
    return Response(b"busy", status_code=code, headers={"Retry-After": "7"})


async def slow(request: Request) -> Response:
    await asyncio.sleep(1.5)
    return Response(b"late")


async def trickle(request: Request) -> Response:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(30):
            yield b"x"
            await asyncio.sleep(0.05)

    return StreamingResponse(chunks())


BIG = b"0123456789abcdef" * 65536  # 1 MiB


async def big(request: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


APP = Starlette(
    routes=[
        Route("/echo", echo, methods=["GET", "POST", "PUT"]),
        Route("/status/{code}", status, methods=["GET", "POST"]),
        Route("/slow", slow),
        Route("/trickle", trickle),
        Route("/big", big),
    ]
)


@pytest.fixture(scope="module")
async def base_url() -> AsyncIterator[str]:
    async with serve_app(APP) as url:
        yield url


@pytest.fixture(scope="module")
async def transport() -> AsyncIterator[httpx.AsyncBaseTransport]:
    # The production transport: aiohttp's pool behind httpx's interface.
    transport = make_transport(max_connections=4)
    yield transport
    await transport.aclose()


@pytest.mark.parametrize("kind", ["aiohttp", "httpcore"])
async def test_send_json(base_url: str, transport: httpx.AsyncBaseTransport, kind: str) -> None:
    headers = {"Idempotency-Key": "maxma:c:new-client:e1", "Accept": "application/json"}
    body = {"client": {"name": "Анна", "externalId": "1842"}}
    if kind == "aiohttp":
        resp = await send(transport, "POST", f"{base_url}/echo", json=body, headers=headers, timeout_s=5)
    else:
        async with httpx.AsyncHTTPTransport() as plain:
            resp = await send(plain, "POST", f"{base_url}/echo", json=body, headers=headers, timeout_s=5)
    assert resp.status_code == 200
    seen = resp.json()
    assert seen["method"] == "POST"
    assert seen["content_type"] == "application/json"
    assert seen["idempotency_key"] == "maxma:c:new-client:e1"
    assert json.loads(seen["body"]) == body


async def test_send_form(base_url: str, transport: httpx.AsyncBaseTransport) -> None:
    form = {"name": "Анна Иванова", "phone": "+79991234567", "note": "a&b=c"}
    resp = await send(transport, "PUT", httpx.URL(f"{base_url}/echo"), form=form, timeout_s=5)
    seen = resp.json()
    assert seen["method"] == "PUT"
    assert seen["content_type"] == "application/x-www-form-urlencoded"
    assert dict(httpx.QueryParams(seen["body"])) == form


async def test_send_without_a_body(base_url: str, transport: httpx.AsyncBaseTransport) -> None:
    url = httpx.URL(f"{base_url}/echo", params={"offset": "0", "limit": "100"})
    resp = await send(transport, "GET", url, timeout_s=5)
    seen = resp.json()
    assert (seen["method"], seen["query"], seen["body"]) == ("GET", "offset=0&limit=100", "")
    assert seen["content_type"] is None


async def test_send_json_and_form_together_is_refused(transport: httpx.AsyncBaseTransport) -> None:
    with pytest.raises(ValueError, match="json or form"):
        await send(transport, "POST", "http://127.0.0.1:9/", json={}, form={"a": "b"}, timeout_s=1)


async def test_an_error_status_is_an_answer_not_an_exception(
    base_url: str, transport: httpx.AsyncBaseTransport
) -> None:
    resp = await send(transport, "POST", f"{base_url}/status/503", json={}, timeout_s=5)
    assert resp.status_code == 503
    assert resp.content == b"busy"
    outcome = status_outcome(resp.status_code, resp.headers)
    assert outcome is not None
    assert outcome.retry_after == 7.0


async def test_the_body_is_read_whole_and_the_connection_released(
    base_url: str, transport: httpx.AsyncBaseTransport
) -> None:
    # More calls at once than the pool has connections: each must hand its connection back.
    responses = await asyncio.gather(
        *(send(transport, "GET", f"{base_url}/big", timeout_s=5) for _ in range(12))
    )
    assert all(r.content == BIG for r in responses)


async def test_a_slow_answer_is_a_timeout(base_url: str, transport: httpx.AsyncBaseTransport) -> None:
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException) as e:
        await send(transport, "GET", f"{base_url}/slow", timeout_s=0.3)
    assert time.monotonic() - started < 1.2
    assert error_failure(e.value) is Failure.TIMEOUT
    assert error_outcome(e.value).throttle


async def test_the_deadline_bounds_a_trickled_answer(
    base_url: str, transport: httpx.AsyncBaseTransport
) -> None:
    # Each byte comes within the per-read timeout, so only the deadline stops the call.
    started = time.monotonic()
    with pytest.raises(TimeoutError) as e:
        await send(transport, "GET", f"{base_url}/trickle", timeout_s=0.5, deadline_s=0.4)
    assert time.monotonic() - started < 1.0
    assert error_failure(e.value) is Failure.TIMEOUT


async def test_without_a_deadline_a_trickled_answer_completes(
    base_url: str, transport: httpx.AsyncBaseTransport
) -> None:
    resp = await send(transport, "GET", f"{base_url}/trickle", timeout_s=0.5)
    assert resp.content == b"x" * 30


async def test_nobody_listening_is_retryable(transport: httpx.AsyncBaseTransport) -> None:
    with pytest.raises(httpx.TransportError) as e:
        await send(transport, "POST", f"http://127.0.0.1:{free_port()}/x", json={}, timeout_s=2)
    # httpx-aiohttp maps a refused connection to ConnectTimeout, so it counts as a timeout there.
    assert error_failure(e.value) in (Failure.TIMEOUT, Failure.NETWORK)
    assert error_outcome(e.value).kind is OutcomeKind.RETRYABLE
