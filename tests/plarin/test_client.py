"""services.plarin.client: how an answer to a postback is classified, and the GET against the sandbox.

``classify`` is fed statuses directly; ``PlarinClient`` talks over real HTTP (uvicorn, the service's pooled
transport) to the strict Plarin sandbox.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from services.common.httpclient import make_transport
from services.common.outcome import OutcomeKind
from services.plarin.client import PlarinClient, classify
from services.sandbox.plarin import PlarinSandbox, create_plarin_app
from tests.plarin.support import TOKEN
from tests.support import serve_app

IDEM = "plarin:plarin:conversion:0f8e7d6c5b4a39281706f5e4d3c2b1a0"
QUERY = "click_id=7364512098347561234&event=visit-paid&value=1500.00&currency=RUB&ts=1710407730"


# ---------------------------------------------------------------------------------------------------------
# classify


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_success(status: int) -> None:
    o = classify(status, httpx.Headers())
    assert o.kind is OutcomeKind.SUCCESS
    assert o.ok
    assert (o.http_status, o.skipped, o.opens_circuit) == (status, None, False)


@pytest.mark.parametrize(
    "status", [100, 300, 301, 302, 304, 307, 308, 400, 404, 405, 409, 410, 414, 422, 451]
)
def test_3xx_and_other_4xx_are_permanent(status: int) -> None:
    o = classify(status, httpx.Headers({"Retry-After": "5"}))
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == f"HTTP {status}"
    assert o.http_status == status
    assert o.opens_circuit is False


@pytest.mark.parametrize("status", [401, 403])
def test_401_and_403_open_the_circuit(status: int) -> None:
    o = classify(status, httpx.Headers())
    assert o.kind is OutcomeKind.PERMANENT
    assert o.opens_circuit is True
    assert o.http_status == status
    assert o.reason.startswith(f"HTTP {status}")


@pytest.mark.parametrize("status", [408, 429])
def test_408_and_429_are_retryable_and_throttle(status: int) -> None:
    o = classify(status, httpx.Headers({"Retry-After": "7"}))
    assert o.kind is OutcomeKind.RETRYABLE
    assert (o.http_status, o.retry_after, o.throttle) == (status, 7.0, True)
    assert classify(status, httpx.Headers()).retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_5xx_is_retryable(status: int) -> None:
    o = classify(status, httpx.Headers({"Retry-After": "30"}))
    assert o.kind is OutcomeKind.RETRYABLE
    assert (o.http_status, o.retry_after, o.throttle, o.opens_circuit) == (status, 30.0, False, False)
    assert classify(status, httpx.Headers({"Retry-After": "soon"})).retry_after is None


def test_retry_after_as_an_http_date() -> None:
    o = classify(503, httpx.Headers({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.retry_after == 0.0  # a date in the past


# ---------------------------------------------------------------------------------------------------------
# The request itself


async def test_one_get_with_the_idempotency_key_and_no_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok", "id": 1})

    url = f"https://plarin.example/postback?{QUERY}&sub=%D0%B0%2Bb"
    out = await PlarinClient(httpx.MockTransport(handler), 5).postback(url, idempotency_key=IDEM)
    assert out.ok
    [req] = seen
    assert req.method == "GET"
    assert str(req.url) == url  # sent as rendered: nothing re-encoded, nothing decoded
    assert req.headers["idempotency-key"] == IDEM
    assert req.content == b""


async def test_an_invalid_url_is_permanent_and_not_echoed() -> None:
    def handler(request: httpx.Request) -> httpx.Response:  # pragma: no cover - never reached
        raise AssertionError("sent")

    out = await PlarinClient(httpx.MockTransport(handler), 5).postback(
        f"http://[::1/postback?token={TOKEN}", idempotency_key=IDEM
    )
    assert out.kind is OutcomeKind.PERMANENT
    assert out.reason == "the postback URL is not a valid URL once filled"
    assert TOKEN not in out.reason


# ---------------------------------------------------------------------------------------------------------
# Against the sandbox over real HTTP


@dataclass
class Served:
    sandbox: PlarinSandbox
    url: str


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    sandbox = PlarinSandbox()
    async with serve_app(create_plarin_app(TOKEN, sandbox)) as url:
        yield Served(sandbox, url)


@pytest.fixture
def sandbox(served: Served) -> Iterator[PlarinSandbox]:
    served.sandbox.reset()
    yield served.sandbox
    served.sandbox.reset()


@pytest.fixture
async def client() -> AsyncIterator[PlarinClient]:
    transport = make_transport(10)
    try:
        yield PlarinClient(transport, timeout_s=5)
    finally:
        await transport.aclose()


def postback(served: Served, token: str = TOKEN, query: str = QUERY) -> str:
    return f"{served.url}/postback?token={token}&{query}"


async def test_an_accepted_postback(served: Served, sandbox: PlarinSandbox, client: PlarinClient) -> None:
    out = await client.postback(postback(served), idempotency_key=IDEM)
    assert out.kind is OutcomeKind.SUCCESS
    assert out.http_status == 200
    [pb] = sandbox.postbacks
    assert pb.params == {"token": "***", "click_id": "7364512098347561234", "event": "visit-paid",
                         "value": "1500.00", "currency": "RUB", "ts": "1710407730"}  # fmt: skip


async def test_a_refused_postback_is_permanent(
    served: Served, sandbox: PlarinSandbox, client: PlarinClient
) -> None:
    out = await client.postback(
        postback(served, query="event=visit-paid"), idempotency_key=IDEM
    )  # no click_id
    assert out.kind is OutcomeKind.PERMANENT
    assert (out.http_status, out.opens_circuit) == (400, False)
    assert sandbox.postbacks == []


async def test_a_wrong_token_opens_the_circuit(
    served: Served, sandbox: PlarinSandbox, client: PlarinClient
) -> None:
    out = await client.postback(postback(served, token="revoked-token-000"), idempotency_key=IDEM)
    assert out.kind is OutcomeKind.PERMANENT
    assert (out.http_status, out.opens_circuit) == (403, True)
    assert "revoked-token-000" not in out.reason
    assert sandbox.postbacks == []


async def test_a_wrong_path_is_permanent(
    served: Served, sandbox: PlarinSandbox, client: PlarinClient
) -> None:
    out = await client.postback(f"{served.url}/postbacks?token={TOKEN}&{QUERY}", idempotency_key=IDEM)
    assert out.kind is OutcomeKind.PERMANENT
    assert out.http_status == 404


async def test_a_503_is_retryable_with_retry_after(
    served: Served, sandbox: PlarinSandbox, client: PlarinClient
) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 503, "retry_after": 12})
    out = await client.postback(postback(served), idempotency_key=IDEM)
    assert out.kind is OutcomeKind.RETRYABLE
    assert (out.http_status, out.retry_after, out.throttle) == (503, 12.0, False)
    assert sandbox.postbacks == []
    assert (await client.postback(postback(served), idempotency_key=IDEM)).ok
    assert len(sandbox.postbacks) == 1


async def test_a_429_is_retryable_and_throttles(
    served: Served, sandbox: PlarinSandbox, client: PlarinClient
) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 429, "retry_after": 3})
    out = await client.postback(postback(served), idempotency_key=IDEM)
    assert out.kind is OutcomeKind.RETRYABLE
    assert (out.http_status, out.retry_after, out.throttle) == (429, 3.0, True)


async def test_a_dropped_connection_is_retryable_and_not_throttled(
    served: Served, sandbox: PlarinSandbox, client: PlarinClient
) -> None:
    # Twice: aiohttp sends an idempotent GET again, once, on a connection dropped without an answer.
    sandbox.add_fault({"mode": "drop", "times": 2})
    out = await client.postback(postback(served), idempotency_key=IDEM)
    assert out.kind is OutcomeKind.RETRYABLE
    assert out.throttle is False
    assert out.reason.startswith("connection failed: ")
    assert TOKEN not in out.reason
    assert sandbox.postbacks == []
    assert all(r.outcome == "dropped" for r in sandbox.requests)


async def test_a_refused_connection_is_retryable_and_not_throttled(client: PlarinClient) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = await client.postback(
        f"http://127.0.0.1:{port}/postback?token={TOKEN}&{QUERY}", idempotency_key=IDEM
    )
    assert out.kind is OutcomeKind.RETRYABLE
    assert out.throttle is False
    assert out.reason.startswith("connection failed: ")
    assert TOKEN not in out.reason


async def test_a_timeout_is_retryable_and_throttles(served: Served, sandbox: PlarinSandbox) -> None:
    sandbox.add_fault({"mode": "delay", "seconds": 0.5})
    transport = make_transport(2)
    try:
        out = await PlarinClient(transport, timeout_s=0.1).postback(postback(served), idempotency_key=IDEM)
    finally:
        await transport.aclose()
    assert out.kind is OutcomeKind.RETRYABLE
    assert out.throttle is True
    assert out.reason.startswith("timeout: ")
    # The sandbox took it all the same once the delay was over: the answer was lost, not the postback.
    await sandbox.wait_for_requests(1, timeout=5, answered=True)
    assert len(sandbox.postbacks) == 1
