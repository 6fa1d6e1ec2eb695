"""services.weeek.client: how Weeek's answers are classified, and the client against the sandbox over HTTP.

``classify`` is fed answers directly; ``WeeekClient`` talks over real HTTP (uvicorn, the service's pooled
transport) to the strict Weeek sandbox, or to an ``httpx.MockTransport`` to see exactly what it sends.
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
from services.sandbox.weeek import API_PREFIX, WeeekSandbox, create_weeek_app
from services.weeek.client import WeeekClient, classify
from tests.support import serve_app
from tests.weeek.support import BOOKED, NEW, STALE, TOKEN

HTML = b"<html><head><title>502 Bad Gateway</title></head><body><center>nginx</center></body></html>"
KEY = "weeek:weeek:deal:0f8e7d6c5b4a39281706f5e4d3c2b1a0"
CONTACT_ID = "5f0e9b4e-2a8c-4d7e-9d3b-0c2f7b8a1e11"


def answer(
    status: int,
    body: Any = None,
    headers: dict[str, str] | None = None,
    *,
    entity: str = "deal",
    what: str = f"status {NEW}",
) -> Outcome:
    raw = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return classify(status, httpx.Headers(headers or {}), raw, entity=entity, what=what)


# ---------------------------------------------------------------------------------------------------------
# classify


def test_success_with_the_entitys_id() -> None:
    o = answer(200, {"success": True, "deal": {"id": "d-1", "title": "Стрижка"}})
    assert o.kind is OutcomeKind.SUCCESS
    assert (o.target_ref, o.http_status, o.opens_circuit, o.hint) == ("d-1", 200, False, None)
    c = answer(201, {"success": True, "contact": {"id": CONTACT_ID}}, entity="contact", what="contacts")
    assert (c.ok, c.target_ref) == (True, CONTACT_ID)
    assert answer(200, {"success": True, "deal": {"id": 42}}).target_ref == "42"


def test_success_without_an_entity() -> None:
    # PATCH, move and link answer {"success": true} only.
    o = answer(200, {"success": True}, what="deal d-1")
    assert o.ok
    assert o.target_ref is None
    # The id of another entity is not taken for this one's.
    assert answer(200, {"success": True, "contact": {"id": "c-1"}}).target_ref is None
    assert answer(200, {"success": True, "deal": "d-1"}).target_ref is None


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"success": False, "message": "Deal limit reached"}, "Weeek: Deal limit reached"),
        ({"success": False}, "Weeek: success is not true"),
        ({"deal": {"id": "d-1"}}, "Weeek: success is not true"),  # no success at all
        ({"success": "true"}, "Weeek: success is not true"),  # only the JSON true
    ],
)
def test_success_false_is_permanent_with_the_message(body: dict[str, Any], says: str) -> None:
    o = answer(200, body)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == says
    assert o.http_status == 200
    assert not o.opens_circuit


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_is_permanent_and_opens_the_circuit(status: int) -> None:
    o = answer(status, {"success": False, "message": "Unauthenticated."})
    assert o.kind is OutcomeKind.PERMANENT
    assert o.opens_circuit
    assert o.http_status == status
    assert "token" in o.reason
    assert o.hint is not None
    assert "token" in o.hint
    assert answer(status, HTML).opens_circuit  # whatever the body


def test_404_on_a_status_names_the_command_that_lists_statuses() -> None:
    o = answer(404, {"success": False, "message": "Status not found"}, what=f"status {STALE}")
    assert o.kind is OutcomeKind.PERMANENT
    assert not o.opens_circuit
    assert STALE in o.reason
    assert o.hint is not None
    assert "relay weeek statuses" in o.hint
    assert "status_id" in o.hint
    assert "stale" in o.hint


def test_404_on_a_deal_is_permanent_without_the_status_hint() -> None:
    o = answer(404, {"success": False, "message": "Deal not found"}, what="deal d-9")
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == "HTTP 404: Weeek has no deal d-9"
    assert o.hint is None
    assert not o.opens_circuit
    assert answer(404, HTML, what="contact c-1").reason == "HTTP 404: Weeek has no contact c-1"


def test_422_is_permanent_with_the_message_and_the_field_errors() -> None:
    body = {
        "success": False,
        "message": "The given data was invalid.",
        "errors": {
            "title": ["The title may not be greater than 255 characters."],
            "phones.0": ["bad", "worse"],
        },
    }
    o = answer(422, body)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.http_status == 422
    assert o.reason.startswith("HTTP 422: The given data was invalid. (")
    assert "title: The title may not be greater than 255 characters." in o.reason
    assert "phones.0: bad, worse" in o.reason
    assert not o.opens_circuit


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            {"success": False, "errors": {"amount": ["The amount must be a number."]}},
            "HTTP 422: amount: The amount must be a number.",
        ),
        ({"success": False, "message": "Nope", "errors": {}}, "HTTP 422: Nope"),
        ({"success": False, "message": "Nope", "errors": ["a"]}, "HTTP 422: Nope"),
        (HTML, "HTTP 422: refused"),
        ({"message": "x" * 1000}, "HTTP 422: " + "x" * 300),  # a long message is cut
    ],
)
def test_422_shapes(body: Any, reason: str) -> None:
    o = answer(422, body)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == reason


@pytest.mark.parametrize("status", [400, 405, 409, 410])
def test_other_4xx_are_permanent(status: int) -> None:
    o = answer(status, {"success": False, "message": "Bad"})
    assert o.kind is OutcomeKind.PERMANENT
    assert o.reason == f"HTTP {status}: Bad"
    assert not o.opens_circuit


def test_429_is_retryable_with_retry_after_and_throttles() -> None:
    o = answer(429, {"success": False, "message": "Too Many Attempts."}, {"Retry-After": "7"})
    assert o.kind is OutcomeKind.RETRYABLE
    assert (o.retry_after, o.throttle, o.http_status) == (7.0, True, 429)
    assert answer(429, HTML).retry_after is None


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_retryable(status: int) -> None:
    o = answer(status, HTML, {"Retry-After": "3"})
    assert o.kind is OutcomeKind.RETRYABLE
    assert (o.http_status, o.retry_after, o.throttle) == (status, 3.0, False)


def test_408_is_retryable() -> None:
    assert answer(408, b"").kind is OutcomeKind.RETRYABLE


@pytest.mark.parametrize("body", [HTML, b"", b"[1, 2]", b'"ok"', b"{truncated"])
def test_a_2xx_without_a_json_object_is_retryable(body: bytes) -> None:
    o = answer(200, body)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.reason == "HTTP 200 without a JSON object"


# ---------------------------------------------------------------------------------------------------------
# What the client sends (a mock transport)


@dataclass
class Sent:
    method: str
    url: str
    headers: httpx.Headers
    body: Any


def _mock(reply: dict[str, Any], sent: list[Sent], status: int = 200) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        sent.append(Sent(request.method, str(request.url), request.headers, body))
        return httpx.Response(status, json=reply)

    return httpx.MockTransport(handler)


async def test_each_call_sends_its_method_path_body_and_headers() -> None:
    sent: list[Sent] = []
    api = WeeekClient(_mock({"success": True}, sent), "https://api.weeek.net/public/v1/", TOKEN, 5)
    await api.create_contact({"firstName": "Анна"}, key=f"{KEY}/contact")
    await api.update_contact("c-1", {"firstName": "Анна"}, key=f"{KEY}/contact-update")
    await api.create_deal(NEW, {"title": "Стрижка"}, key=f"{KEY}/deal")
    await api.update_deal("d-1", {"amount": 10}, key=f"{KEY}/update")
    await api.move_deal("d-1", BOOKED, key=f"{KEY}/move")
    await api.link_contact("d-1", "c-1", key=f"{KEY}/link")
    base = "https://api.weeek.net/public/v1"
    assert [(s.method, s.url, s.body) for s in sent] == [
        ("POST", f"{base}/crm/contacts", {"firstName": "Анна"}),
        ("PATCH", f"{base}/crm/contacts/c-1", {"firstName": "Анна"}),
        ("POST", f"{base}/crm/statuses/{NEW}/deals", {"title": "Стрижка"}),
        ("PATCH", f"{base}/crm/deals/d-1", {"amount": 10}),
        ("POST", f"{base}/crm/deals/d-1/move", {"statusId": BOOKED}),
        ("POST", f"{base}/crm/deals/d-1/contacts", {"contactId": "c-1"}),
    ]
    for s, suffix in zip(sent, ["contact", "contact-update", "deal", "update", "move", "link"], strict=True):
        assert s.headers["authorization"] == f"Bearer {TOKEN}"
        assert s.headers["idempotency-key"] == f"{KEY}/{suffix}"
        assert s.headers["content-type"] == "application/json"
        assert s.headers["accept"] == "application/json"


async def test_a_transport_error_is_retryable_without_the_url() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError(f"cannot reach {request.url} with {TOKEN}")

    api = WeeekClient(httpx.MockTransport(fail), "https://api.weeek.net/public/v1", TOKEN, 5)
    o = await api.create_contact({"firstName": "Анна"}, key=KEY)
    assert o.kind is OutcomeKind.RETRYABLE
    assert o.reason == "connection failed: ConnectError"
    assert not o.maybe_sent  # never connected: Weeek cannot have it
    with pytest.raises(RuntimeError, match="unreachable: ConnectError") as e:
        await api.list("/crm/funnels", "funnels")
    assert TOKEN not in str(e.value)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (httpx.ReadTimeout("slow"), "timeout: ReadTimeout"),
        (httpx.RemoteProtocolError("closed"), "connection failed: RemoteProtocolError"),
        (httpx.ReadError("reset"), "connection failed: ReadError"),
    ],
)
async def test_no_answer_after_the_request_went_out_may_have_been_sent(error: Exception, reason: str) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise error

    api = WeeekClient(httpx.MockTransport(fail), "https://api.weeek.net/public/v1", TOKEN, 5)
    o = await api.create_deal(NEW, {"title": "Стрижка"}, key=KEY)
    assert (o.kind, o.reason, o.maybe_sent) == (OutcomeKind.RETRYABLE, reason, True)


async def test_list_needs_a_list_under_the_entity() -> None:
    sent: list[Sent] = []
    api = WeeekClient(_mock({"success": True, "funnels": {"id": "f"}}, sent), "https://x/public/v1", TOKEN, 5)
    with pytest.raises(RuntimeError, match="without funnels"):
        await api.list("/crm/funnels", "funnels")
    assert sent[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert "idempotency-key" not in sent[0].headers
    api = WeeekClient(
        _mock({"success": True, "funnels": [{"id": "f"}, "junk", 3]}, []), "https://x/public/v1", TOKEN, 5
    )
    assert await api.list("/crm/funnels", "funnels") == [{"id": "f"}]


# ---------------------------------------------------------------------------------------------------------
# Against the sandbox over HTTP


@dataclass
class Served:
    sandbox: WeeekSandbox
    url: str


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    sandbox = WeeekSandbox()
    async with serve_app(create_weeek_app({TOKEN}, sandbox)) as url:
        yield Served(sandbox, url)


@pytest.fixture
def sandbox(served: Served) -> Iterator[WeeekSandbox]:
    served.sandbox.reset()
    yield served.sandbox
    served.sandbox.reset()


@pytest.fixture
async def transport() -> AsyncIterator[httpx.AsyncBaseTransport]:
    t = make_transport(4)
    try:
        yield t
    finally:
        await t.aclose()


@pytest.fixture
def api(served: Served, sandbox: WeeekSandbox, transport: httpx.AsyncBaseTransport) -> WeeekClient:
    return WeeekClient(transport, served.url + API_PREFIX, TOKEN, 5)


async def test_the_calls_against_the_sandbox(api: WeeekClient, sandbox: WeeekSandbox) -> None:
    contact = await api.create_contact(
        {"firstName": "Анна", "phones": ["+79161234567"]}, key=f"{KEY}/contact"
    )
    assert contact.ok
    assert contact.target_ref in sandbox.contacts
    deal = await api.create_deal(NEW, {"title": "Стрижка", "amount": 2500}, key=f"{KEY}/deal")
    assert deal.ok
    assert deal.target_ref in sandbox.deals
    assert deal.target_ref is not None
    assert contact.target_ref is not None
    assert (await api.link_contact(deal.target_ref, contact.target_ref, key=f"{KEY}/link")).ok
    assert (await api.update_deal(deal.target_ref, {"amount": 3000.5}, key=f"{KEY}/update")).ok
    assert (await api.move_deal(deal.target_ref, BOOKED, key=f"{KEY}/move")).ok
    updated = await api.update_contact(
        contact.target_ref, {"firstName": "Анна", "lastName": "Иванова"}, key=KEY
    )
    assert (updated.ok, updated.target_ref) == (True, contact.target_ref)
    d = sandbox.deals[deal.target_ref]
    assert (d.title, d.amount, d.status_id, d.contacts) == ("Стрижка", 3000.5, BOOKED, [contact.target_ref])
    assert sandbox.contacts[contact.target_ref].last_name == "Иванова"
    assert [r.status for r in sandbox.requests] == [200] * 6


async def test_the_token_is_never_in_the_sandboxs_log(
    api: WeeekClient, served: Served, sandbox: WeeekSandbox
) -> None:
    await api.create_contact({"firstName": "Анна"}, key=KEY)
    await api.create_deal(STALE, {"title": "x"}, key=KEY)
    await api.update_deal("nope", {"title": "x"}, key=KEY)
    await api.list("/crm/funnels", "funnels")
    assert len(sandbox.requests) == 4
    assert all(r.token_present and r.token_valid for r in sandbox.requests)
    log = json.dumps([r.to_dict() for r in sandbox.requests], ensure_ascii=False)
    assert TOKEN not in log
    async with httpx.AsyncClient(base_url=served.url) as http:
        over_http = (await http.get("/_sandbox/requests")).text
    assert TOKEN not in over_http
    assert "/crm/contacts" in over_http


async def test_a_stale_status_is_404_with_the_hint(api: WeeekClient, sandbox: WeeekSandbox) -> None:
    o = await api.create_deal(STALE, {"title": "Стрижка"}, key=KEY)
    assert o.kind is OutcomeKind.PERMANENT
    assert o.http_status == 404
    assert o.hint is not None
    assert "relay weeek statuses" in o.hint
    assert not sandbox.deals
    moved = await api.move_deal(
        (await api.create_deal(NEW, {"title": "x"}, key=KEY)).target_ref or "", STALE, key=KEY
    )
    assert moved.http_status == 404
    assert moved.hint is not None
    assert "relay weeek statuses" in moved.hint


async def test_a_missing_deal_or_contact_is_404(api: WeeekClient, sandbox: WeeekSandbox) -> None:
    o = await api.update_deal(STALE, {"title": "x"}, key=KEY)
    assert (o.kind, o.http_status, o.hint) == (OutcomeKind.PERMANENT, 404, None)
    assert STALE in o.reason
    deal = await api.create_deal(NEW, {"title": "x"}, key=KEY)
    assert deal.target_ref is not None
    link = await api.link_contact(deal.target_ref, STALE, key=KEY)
    assert (link.kind, link.http_status) == (OutcomeKind.PERMANENT, 404)
    assert STALE in link.reason
    assert (await api.update_contact(STALE, {"firstName": "А"}, key=KEY)).http_status == 404


async def test_invalid_data_is_422_with_weeeks_field_errors(api: WeeekClient, sandbox: WeeekSandbox) -> None:
    o = await api.create_contact(
        {"firstName": "Анна", "phones": ["12345"], "emails": ["not-an-email"]}, key=KEY
    )
    assert o.kind is OutcomeKind.PERMANENT
    assert o.http_status == 422
    assert "The given data was invalid." in o.reason
    assert "phones.0: The phones.0 must be an optional + and 10 to 15 digits." in o.reason
    assert "emails.0" in o.reason
    assert not sandbox.contacts
    deal = await api.create_deal(NEW, {"title": "x" * 256, "amount": "2500"}, key=KEY)
    assert deal.http_status == 422
    assert "title" in deal.reason
    assert "amount: The amount must be a number." in deal.reason


async def test_a_wrong_token_is_401_and_opens_the_circuit(
    served: Served, sandbox: WeeekSandbox, transport: httpx.AsyncBaseTransport
) -> None:
    api = WeeekClient(transport, served.url + API_PREFIX, "another-token-0123456789", 5)
    o = await api.create_contact({"firstName": "Анна"}, key=KEY)
    assert (o.kind, o.http_status, o.opens_circuit) == (OutcomeKind.PERMANENT, 401, True)
    assert not sandbox.contacts
    with pytest.raises(RuntimeError, match="HTTP 401: the Weeek token was refused"):
        await api.list("/crm/funnels", "funnels")


async def test_faults_are_classified(api: WeeekClient, sandbox: WeeekSandbox) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 429, "retry_after": 7, "route": "/crm/contacts"})
    sandbox.add_fault({"mode": "http_status", "status": 503, "method": "POST"})
    sandbox.add_fault({"mode": "error", "message": "Workspace is frozen"})
    sandbox.add_fault({"mode": "error", "status": 403, "message": "Forbidden"})
    first, second, third, fourth = [
        await api.create_contact({"firstName": "Анна"}, key=KEY) for _ in range(4)
    ]
    assert (first.kind, first.retry_after, first.throttle) == (OutcomeKind.RETRYABLE, 7.0, True)
    assert (second.kind, second.http_status) == (OutcomeKind.RETRYABLE, 503)
    assert (third.kind, third.reason) == (OutcomeKind.PERMANENT, "Weeek: Workspace is frozen")
    assert (fourth.kind, fourth.opens_circuit) == (OutcomeKind.PERMANENT, True)
    assert not sandbox.contacts  # none of them reached the API
    assert (await api.create_contact({"firstName": "Анна"}, key=KEY)).ok


async def test_a_dropped_connection_is_retryable_and_may_have_been_sent(
    api: WeeekClient, sandbox: WeeekSandbox
) -> None:
    sandbox.add_fault({"mode": "drop", "route": "/crm/statuses/{statusId}/deals"})
    o = await api.create_deal(NEW, {"title": "Стрижка"}, key=KEY)
    assert (o.kind, o.maybe_sent) == (OutcomeKind.RETRYABLE, True)
    assert (await api.create_deal(NEW, {"title": "Стрижка"}, key=KEY)).ok


async def test_list_funnels_and_statuses(api: WeeekClient, sandbox: WeeekSandbox) -> None:
    [funnel] = await api.list("/crm/funnels", "funnels")
    assert funnel["name"] == "Продажи"
    statuses = await api.list(f"/crm/funnels/{funnel['id']}/statuses", "statuses")
    assert [s["name"] for s in statuses] == ["Новая заявка", "Записан", "Пришёл", "Оплачен", "Отказ"]
    assert statuses[0]["id"] == NEW
    with pytest.raises(RuntimeError, match="HTTP 404") as e:
        await api.list(f"/crm/funnels/{STALE}/statuses", "statuses")
    assert STALE in str(e.value)
