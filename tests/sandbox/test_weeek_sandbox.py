"""The Weeek sandbox over real HTTP: uvicorn on 127.0.0.1, httpx as the client."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.sandbox.weeek import (
    API_PREFIX,
    SEED_FUNNEL_NAME,
    SEED_STATUS_NAMES,
    SEED_USERS,
    FaultSpec,
    WeeekSandbox,
    contact_id,
    create_weeek_app,
    custom_field_id,
    deal_id,
    funnel_id,
    status_id,
    user_id,
)

TOKEN = "weeek-secret-token-0123456789"
OTHER_TOKEN = "weeek-other-token-9876543210"
FUNNEL = funnel_id(SEED_FUNNEL_NAME)
NEW, BOOKED, CAME, PAID, REFUSED = (status_id(SEED_FUNNEL_NAME, name) for name in SEED_STATUS_NAMES)
ADMIN, MASTER = (user_id(email) for _, email in SEED_USERS)
VISIT_FIELD = custom_field_id("Klientiks visit id")
SUM_FIELD = custom_field_id("Сумма визита")
MISSING = "00000000-0000-0000-0000-000000000000"

ServeApp = Callable[[Any], AbstractAsyncContextManager[str]]


@dataclass
class Env:
    sandbox: WeeekSandbox
    http: httpx.AsyncClient

    async def api(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = TOKEN,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        """Call the API the way the integrations do: Bearer token, JSON body."""
        sent = {"Accept": "application/json"}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if body is not None or content is not None:
            sent["Content-Type"] = "application/json"
            # json.dumps escapes non-ASCII, so a lone surrogate travels as "\\ud800", as a client can send it.
            content = content if content is not None else json.dumps(body).encode()
        sent.update(headers or {})
        return await self.http.request(
            method, API_PREFIX + path, content=content, headers=sent, params=params
        )

    async def contact(self, **fields: Any) -> dict[str, Any]:
        r = await self.api("POST", "/crm/contacts", {"firstName": "Анна", **fields})
        return ok(r)["contact"]  # type: ignore[no-any-return]

    async def deal(self, status: str = NEW, **fields: Any) -> dict[str, Any]:
        r = await self.api("POST", f"/crm/statuses/{status}/deals", {"title": "Стрижка", **fields})
        return ok(r)["deal"]  # type: ignore[no-any-return]

    async def fault(self, **spec: Any) -> dict[str, Any]:
        r = await self.http.post("/_sandbox/faults", json=spec)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def control(self, what: str) -> Any:
        r = await self.http.get(f"/_sandbox/{what}")
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def app_server() -> ServeApp:
    """The conftest's fixture at module scope, so one server can serve the whole module."""
    from tests.support import serve_app

    return serve_app


@pytest.fixture(scope="module")
async def served(app_server: ServeApp) -> AsyncIterator[Env]:
    # One server and client for the module (a fresh pair per test costs more than the tests): reset per test.
    sandbox = WeeekSandbox()
    async with (
        app_server(create_weeek_app({TOKEN, OTHER_TOKEN}, sandbox)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield Env(sandbox, http)


@pytest.fixture
def env(served: Env) -> Iterator[Env]:
    served.sandbox.reset()
    yield served
    served.sandbox.reset()


def ok(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = r.json()
    assert body["success"] is True, body
    return body


def failed(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["success"] is False
    assert isinstance(body["message"], str)
    assert body["message"]
    return body


def invalid(r: httpx.Response) -> dict[str, list[str]]:
    """The errors of a 422 answer."""
    body = failed(r, 422)
    assert body["message"] == "The given data was invalid."
    errors: dict[str, list[str]] = body["errors"]
    assert errors
    assert all(isinstance(m, list) and m and all(isinstance(x, str) for x in m) for m in errors.values())
    return errors


# ---- funnels and statuses ----------------------------------------------------------------------


async def test_funnels_and_statuses_are_listed(env: Env) -> None:
    body = ok(await env.api("GET", "/crm/funnels"))
    assert body == {
        "success": True,
        "funnels": [
            {
                "id": FUNNEL,
                "name": "Продажи",
                "currencyId": "RUB",
                "dealsCount": 0,
                "dealsAmount": 0,
                "isPrivate": False,
                "team": [],
            }
        ],
    }
    statuses = ok(await env.api("GET", f"/crm/funnels/{FUNNEL}/statuses"))["statuses"]
    assert [s["name"] for s in statuses] == list(SEED_STATUS_NAMES)
    assert [s["id"] for s in statuses] == [NEW, BOOKED, CAME, PAID, REFUSED]
    assert set(statuses[0]) == {"id", "name", "dealsCount", "dealsAmount", "createdAt"}
    failed(await env.api("GET", f"/crm/funnels/{MISSING}/statuses"), 404)


async def test_counts_follow_the_deals(env: Env) -> None:
    await env.deal(amount=1500)
    await env.deal(amount=99.5)
    await env.deal(BOOKED, amount=10)
    [funnel] = ok(await env.api("GET", "/crm/funnels"))["funnels"]
    assert (funnel["dealsCount"], funnel["dealsAmount"]) == (3, 1609.5)
    statuses = ok(await env.api("GET", f"/crm/funnels/{FUNNEL}/statuses"))["statuses"]
    assert [(s["dealsCount"], s["dealsAmount"]) for s in statuses[:3]] == [(2, 1599.5), (1, 10), (0, 0)]


async def test_workspace_has_the_ids_a_config_needs(env: Env) -> None:
    ws = await env.control("workspace")
    [funnel] = ws["funnels"]
    assert (funnel["id"], funnel["name"]) == (FUNNEL, SEED_FUNNEL_NAME)
    assert funnel["statuses"] == [
        {"id": status_id(SEED_FUNNEL_NAME, n), "name": n} for n in SEED_STATUS_NAMES
    ]
    assert [u["id"] for u in ws["users"]] == [ADMIN, MASTER]
    assert ws["customFields"] == [
        {"id": VISIT_FIELD, "name": "Klientiks visit id", "type": "text"},
        {"id": SUM_FIELD, "name": "Сумма визита", "type": "number"},
    ]
    # Deterministic: another sandbox has the same ids.
    assert WeeekSandbox().workspace() == ws


async def test_added_funnel_is_served_and_dropped_by_reset(env: Env) -> None:
    r = await env.http.post("/_sandbox/funnels", json={"name": "Повторные", "statuses": ["Первый", "Второй"]})
    assert r.status_code == 201, r.text
    added = r.json()
    assert added["id"] == funnel_id("Повторные")
    assert [s["id"] for s in added["statuses"]] == [
        status_id("Повторные", "Первый"),
        status_id("Повторные", "Второй"),
    ]
    assert len(ok(await env.api("GET", "/crm/funnels"))["funnels"]) == 2
    statuses = ok(await env.api("GET", f"/crm/funnels/{added['id']}/statuses"))["statuses"]
    assert [s["name"] for s in statuses] == ["Первый", "Второй"]
    r = await env.http.post("/_sandbox/funnels", json={"name": "Повторные", "statuses": ["X"]})
    assert r.status_code == 409
    for bad in (
        {"name": "X", "statuses": []},
        {"name": "X", "statuses": ["a", "a"]},
        {"name": " X", "statuses": ["a"]},
        {"name": "X", "statuses": ["{{status}}"]},
        {"name": "X", "statuses": ["a"], "extra": 1},
    ):
        assert (await env.http.post("/_sandbox/funnels", json=bad)).status_code == 422, bad
    env.sandbox.reset()
    assert [f["id"] for f in (await env.control("workspace"))["funnels"]] == [FUNNEL]


# ---- contacts ----------------------------------------------------------------------------------


async def test_contact_create_get_update_and_list(env: Env) -> None:
    r = await env.api(
        "POST",
        "/crm/contacts",
        {
            "firstName": "Анна",
            "lastName": "Иванова",
            "middleName": "Сергеевна",
            "emails": ["anna@example.com"],
            "phones": ["+79161234567"],
        },
    )
    contact = ok(r)["contact"]
    assert contact["id"] == contact_id(1)
    assert set(contact) == {
        "id",
        "firstName",
        "lastName",
        "middleName",
        "emails",
        "phones",
        "tags",
        "createdAt",
        "updatedAt",
    }
    assert (contact["firstName"], contact["lastName"], contact["middleName"]) == (
        "Анна",
        "Иванова",
        "Сергеевна",
    )
    [email] = contact["emails"]
    assert email["email"] == "anna@example.com"
    assert isinstance(email["id"], str)
    assert [p["phone"] for p in contact["phones"]] == ["+79161234567"]
    assert contact["tags"] == []
    assert contact["createdAt"].endswith("Z")
    assert contact["updatedAt"] == contact["createdAt"]
    cid = contact["id"]
    assert ok(await env.api("GET", f"/crm/contacts/{cid}"))["contact"] == contact

    # PATCH changes the fields given; an unchanged email keeps its entry id.
    patched = ok(
        await env.api("PATCH", f"/crm/contacts/{cid}", {"emails": ["anna@example.com", "a2@example.org"]})
    )["contact"]
    assert patched["lastName"] == "Иванова"
    assert [e["email"] for e in patched["emails"]] == ["anna@example.com", "a2@example.org"]
    assert patched["emails"][0]["id"] == email["id"]
    # PUT replaces the contact: what is left out is cleared.
    put = ok(await env.api("PUT", f"/crm/contacts/{cid}", {"firstName": "Аня", "phones": ["89161234567"]}))
    assert (put["contact"]["firstName"], put["contact"]["lastName"], put["contact"]["emails"]) == (
        "Аня",
        None,
        [],
    )
    invalid(await env.api("PUT", f"/crm/contacts/{cid}", {"lastName": "Иванова"}))  # firstName required

    await env.contact(firstName="Ольга")
    await env.contact(firstName="Мария")
    listed = ok(await env.api("GET", "/crm/contacts", params={"limit": "50", "offset": "0"}))["contacts"]
    assert [c["firstName"] for c in listed] == ["Аня", "Ольга", "Мария"]
    assert listed[0] == put["contact"]
    page = ok(await env.api("GET", "/crm/contacts", params={"limit": "1", "offset": "1"}))["contacts"]
    assert [c["firstName"] for c in page] == ["Ольга"]
    assert [c["firstName"] for c in ok(await env.api("GET", "/crm/contacts"))["contacts"]] == [
        "Аня",
        "Ольга",
        "Мария",
    ]
    [stored] = [c for c in await env.control("contacts") if c["id"] == cid]
    assert [h["action"] for h in stored["history"]] == ["created", "patched", "replaced"]


async def test_unknown_contact_is_404(env: Env) -> None:
    for method, body in (("GET", None), ("PUT", {"firstName": "A"}), ("PATCH", {"lastName": "B"})):
        body_ = failed(await env.api(method, f"/crm/contacts/{MISSING}", body), 404)
        assert body_["message"] == "Contact not found"


@pytest.mark.parametrize(
    "params",
    [{"limit": "0"}, {"limit": "101"}, {"limit": "x"}, {"offset": "-1"}, {"page": "1"}, {"limit": ""}],
)
async def test_bad_paging_is_422(env: Env, params: dict[str, str]) -> None:
    errors = invalid(await env.api("GET", "/crm/contacts", params=params))
    assert set(errors) == set(params)


# ---- deals -------------------------------------------------------------------------------------


async def test_deal_is_created_in_a_status_with_everything(env: Env) -> None:
    contact = await env.contact()
    r = await env.api(
        "POST",
        f"/crm/statuses/{BOOKED}/deals",
        {
            "title": "Стрижка и укладка",
            "amount": 2500.5,
            "description": "Визит 2024-06-03 10:00, мастер Ирина",
            "assignees": [MASTER],
            "customFields": {VISIT_FIELD: "visit-42", SUM_FIELD: 2500.5},
            "contacts": [contact["id"]],
        },
    )
    deal = ok(r)["deal"]
    assert deal == {
        "id": deal_id(1),
        "title": "Стрижка и укладка",
        "amount": 2500.5,
        "description": "Визит 2024-06-03 10:00, мастер Ирина",
        "statusId": BOOKED,
        "funnelId": FUNNEL,
        "winStatus": None,
        "assignees": [MASTER],
        "contacts": [contact["id"]],
        "customFields": {VISIT_FIELD: "visit-42", SUM_FIELD: 2500.5},
        "createdAt": deal["createdAt"],
        "updatedAt": deal["updatedAt"],
    }
    assert ok(await env.api("GET", f"/crm/deals/{deal['id']}"))["deal"] == deal
    assert ok(await env.api("GET", f"/crm/statuses/{BOOKED}/deals"))["deals"] == [deal]
    assert ok(await env.api("GET", f"/crm/statuses/{NEW}/deals"))["deals"] == []
    stored = env.sandbox.deals[deal["id"]]
    assert (stored.status_id, stored.title, stored.amount) == (BOOKED, "Стрижка и укладка", 2500.5)
    assert [h["action"] for h in stored.history] == ["created"]
    # A minimal deal: just a title.
    minimal = await env.deal()
    assert (minimal["id"], minimal["amount"], minimal["assignees"]) == (deal_id(2), 0, [])


async def test_deal_without_title_or_with_name_is_422(env: Env) -> None:
    errors = invalid(await env.api("POST", f"/crm/statuses/{NEW}/deals", {"amount": 100}))
    assert errors == {"title": ["The title field is required."]}
    # The seed's "name" (and "status_id") are not Weeek's fields.
    errors = invalid(
        await env.api(
            "POST", f"/crm/statuses/{NEW}/deals", {"name": "Стрижка", "status_id": NEW, "amount": 1}
        )
    )
    assert set(errors) == {"name", "status_id", "title"}
    assert env.sandbox.deals == {}


async def test_unknown_status_is_404(env: Env) -> None:
    body = failed(await env.api("POST", f"/crm/statuses/{MISSING}/deals", {"title": "X"}), 404)
    assert body["message"] == "Status not found"
    failed(await env.api("GET", f"/crm/statuses/{MISSING}/deals"), 404)
    # A status id is checked before the body: a stale config id is a 404 whatever is sent.
    failed(await env.api("POST", f"/crm/statuses/{MISSING}/deals", {"name": "X"}), 404)
    assert env.sandbox.deals == {}


async def test_patch_win_status_and_amount(env: Env) -> None:
    deal = await env.deal(amount=100)
    path = f"/crm/deals/{deal['id']}"
    assert ok(await env.api("PATCH", path, {"winStatus": "won", "amount": 1990.99})) == {"success": True}
    got = ok(await env.api("GET", path))["deal"]
    assert (got["winStatus"], got["amount"]) == ("won", 1990.99)
    ok(await env.api("PATCH", path, {"winStatus": "lost"}))
    ok(await env.api("PATCH", path, {"customFields": {VISIT_FIELD: "v-1"}, "assignees": [ADMIN, MASTER]}))
    ok(await env.api("PATCH", path, {"customFields": {SUM_FIELD: 5}, "title": "Окрашивание"}))
    got = ok(await env.api("GET", path))["deal"]
    assert got["winStatus"] == "lost"
    assert got["customFields"] == {VISIT_FIELD: "v-1", SUM_FIELD: 5}  # merged key by key
    assert (got["title"], got["assignees"]) == ("Окрашивание", [ADMIN, MASTER])
    history = env.sandbox.deals[deal["id"]].history
    assert [h["action"] for h in history] == ["created", "patched", "patched", "patched", "patched"]
    assert history[1]["changes"] == {"winStatus": "won", "amount": 1990.99}
    assert invalid(await env.api("PATCH", path, {})) == {"body": ["Send at least one field to change."]}


async def test_move_to_another_status(env: Env) -> None:
    deal = await env.deal()
    assert ok(await env.api("POST", f"/crm/deals/{deal['id']}/move", {"statusId": CAME})) == {"success": True}
    assert ok(await env.api("GET", f"/crm/deals/{deal['id']}"))["deal"]["statusId"] == CAME
    ok(await env.api("POST", f"/crm/deals/{deal['id']}/move", {"statusId": CAME}))  # same status: a no-op
    assert [d["id"] for d in ok(await env.api("GET", f"/crm/statuses/{CAME}/deals"))["deals"]] == [deal["id"]]
    moves = [h for h in env.sandbox.deals[deal["id"]].history if h["action"] == "moved"]
    assert [(m["from"], m["to"]) for m in moves] == [(NEW, CAME), (CAME, CAME)]
    # A stale status id is a 404, a missing one a 422, an unknown field a 422.
    body = failed(await env.api("POST", f"/crm/deals/{deal['id']}/move", {"statusId": MISSING}), 404)
    assert body["message"] == "Status not found"
    assert set(invalid(await env.api("POST", f"/crm/deals/{deal['id']}/move", {"status_id": CAME}))) == {
        "status_id",
        "statusId",
    }
    failed(await env.api("POST", f"/crm/deals/{MISSING}/move", {"statusId": CAME}), 404)


async def test_move_to_a_status_of_another_funnel(env: Env) -> None:
    env.sandbox.add_funnel("Повторные", ["Первый"])
    deal = await env.deal()
    ok(await env.api("POST", f"/crm/deals/{deal['id']}/move", {"statusId": status_id("Повторные", "Первый")}))
    got = ok(await env.api("GET", f"/crm/deals/{deal['id']}"))["deal"]
    assert got["funnelId"] == funnel_id("Повторные")


async def test_link_contact_twice_is_success(env: Env) -> None:
    contact = await env.contact()
    deal = await env.deal()
    path = f"/crm/deals/{deal['id']}/contacts"
    assert ok(await env.api("POST", path, {"contactId": contact["id"]})) == {"success": True}
    assert ok(await env.api("POST", path, {"contactId": contact["id"]})) == {"success": True}
    assert ok(await env.api("GET", f"/crm/deals/{deal['id']}"))["deal"]["contacts"] == [contact["id"]]
    links = [h for h in env.sandbox.deals[deal["id"]].history if h["action"] == "contact_linked"]
    assert [h["alreadyLinked"] for h in links] == [False, True]
    body = failed(await env.api("POST", path, {"contactId": MISSING}), 404)
    assert body["message"] == "Contact not found"
    body = failed(await env.api("POST", f"/crm/deals/{MISSING}/contacts", {"contactId": contact["id"]}), 404)
    assert body["message"] == "Deal not found"
    assert set(invalid(await env.api("POST", path, {"contact_id": contact["id"]}))) == {
        "contact_id",
        "contactId",
    }
    assert invalid(await env.api("POST", path, {"contactId": 5})) == {
        "contactId": ["The contactId must be a string."]
    }


async def test_unknown_and_deleted_deal_is_404(env: Env) -> None:
    for method, body in (("GET", None), ("PATCH", {"amount": 1}), ("DELETE", None)):
        assert (
            failed(await env.api(method, f"/crm/deals/{MISSING}", body), 404)["message"] == "Deal not found"
        )
    deal = await env.deal()
    assert ok(await env.api("DELETE", f"/crm/deals/{deal['id']}")) == {"success": True}
    failed(await env.api("GET", f"/crm/deals/{deal['id']}"), 404)
    failed(await env.api("DELETE", f"/crm/deals/{deal['id']}"), 404)
    assert ok(await env.api("GET", f"/crm/statuses/{NEW}/deals"))["deals"] == []
    [listed] = await env.control("deals")
    assert (listed["deleted"], [h["action"] for h in listed["history"]]) == (True, ["created", "deleted"])


async def test_custom_field_types_datetime_and_link(env: Env) -> None:
    for name, kind in (("Дата визита", "datetime"), ("Карточка", "link")):
        r = await env.http.post("/_sandbox/custom-fields", json={"name": name, "type": kind})
        assert r.status_code == 201, r.text
        assert r.json() == {"id": custom_field_id(name), "name": name, "type": kind}
    assert (
        await env.http.post("/_sandbox/custom-fields", json={"name": "Карточка", "type": "text"})
    ).status_code == 409
    assert (
        await env.http.post("/_sandbox/custom-fields", json={"name": "X", "type": "select"})
    ).status_code == 422
    when, link = custom_field_id("Дата визита"), custom_field_id("Карточка")
    for value in ("2024-06-03", "2024-06-03T10:00", "2024-06-03T10:00:00Z", "2024-06-03T10:00:00.5+03:00"):
        await env.deal(customFields={when: value})
    await env.deal(customFields={link: "https://klientiks.ru/clientix/appointment/42"})
    refused: list[tuple[str, object]] = [
        *(
            (when, v)
            for v in ("03.06.2024", "2024-13-01", "2024-06-03 10:00", 1717400000, "2024-06-03T25:00")
        ),
        *((link, v) for v in ("klientiks.ru/x", "ftp://x.example/a", "https://", "https://a b.example", 42)),
    ]
    for field_id, bad in refused:
        body = {"title": "X", "customFields": {field_id: bad}}
        errors = invalid(await env.api("POST", f"/crm/statuses/{NEW}/deals", body))
        assert set(errors) == {f"customFields.{field_id}"}, bad
    assert len(env.sandbox.deals) == 5


# ---- strictness --------------------------------------------------------------------------------

_DEAL_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"title": "t" * 256}, "title"),
    ({"title": 42}, "title"),
    ({"title": None}, "title"),
    ({"title": ""}, "title"),
    ({"title": "   "}, "title"),
    ({"title": " Стрижка"}, "title"),
    ({"title": "Стрижка\u00a0"}, "title"),
    ({"title": "Стрижка\n"}, "title"),
    ({"title": "Стри\tжка"}, "title"),
    ({"title": "Стрижка\u200b"}, "title"),  # zero-width space (Cf)
    ({"title": "Стрижка\u2028"}, "title"),  # line separator
    ({"title": "Стри\x00жка"}, "title"),
    ({"title": "Стрижка \ufffd"}, "title"),
    ({"title": "Стрижка \ud800"}, "title"),  # a lone surrogate
    ({"title": "Визит {{appointment.id}}"}, "title"),
    ({"title": "Визит {{id"}, "title"),
    ({"description": "строка 1\nстрока 2"}, "description"),
    ({"description": "d" * 10001}, "description"),
    ({"amount": "1500"}, "amount"),
    ({"amount": True}, "amount"),
    ({"amount": -1}, "amount"),
    ({"amount": 10.005}, "amount"),
    ({"amount": 1e-7}, "amount"),
    ({"amount": 10**12}, "amount"),
    ({"amount": None}, "amount"),
    ({"assignees": "x"}, "assignees"),
    ({"assignees": [MISSING]}, "assignees.0"),
    ({"assignees": [ADMIN, ADMIN]}, "assignees.1"),
    ({"assignees": [1]}, "assignees.0"),
    ({"assignees": [""]}, "assignees.0"),
    ({"contacts": [MISSING]}, "contacts.0"),
    ({"customFields": [VISIT_FIELD]}, "customFields"),
    ({"customFields": {MISSING: "x"}}, f"customFields.{MISSING}"),
    ({"customFields": {VISIT_FIELD: 42}}, f"customFields.{VISIT_FIELD}"),
    ({"customFields": {VISIT_FIELD: "v" * 1001}}, f"customFields.{VISIT_FIELD}"),
    ({"customFields": {VISIT_FIELD: " visit-42"}}, f"customFields.{VISIT_FIELD}"),
    ({"customFields": {VISIT_FIELD: "{{visit_id}}"}}, f"customFields.{VISIT_FIELD}"),
    ({"customFields": {SUM_FIELD: "2500"}}, f"customFields.{SUM_FIELD}"),
    ({"customFields": {SUM_FIELD: False}}, f"customFields.{SUM_FIELD}"),
    ({"customFields": {VISIT_FIELD + " ": "x"}}, f"customFields.{VISIT_FIELD} "),  # a key with a space
    ({"customFields": {"": "x"}}, "customFields."),
    ({"winStatus": "won"}, "winStatus"),  # only a PATCH takes it
    ({"name": "Стрижка"}, "name"),
    ({"tags": [1]}, "tags"),
    ({"extra": {"k\u200b": "v"}}, "extra.k\u200b"),
]


@pytest.mark.parametrize(("over", "field"), _DEAL_REFUSED, ids=[str(i) for i in range(len(_DEAL_REFUSED))])
async def test_deal_create_strictness(env: Env, over: dict[str, Any], field: str) -> None:
    body = {"title": "Стрижка", **over}
    errors = invalid(await env.api("POST", f"/crm/statuses/{NEW}/deals", body))
    assert field in errors, errors
    assert env.sandbox.deals == {}
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.status, rec.message, rec.errors) == (422, "The given data was invalid.", errors)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"winStatus": "open"}, "winStatus"),
        ({"winStatus": "WON"}, "winStatus"),
        ({"winStatus": None}, "winStatus"),
        ({"amount": 1.234}, "amount"),
        ({"amount": "10"}, "amount"),
        ({"title": "t" * 256}, "title"),
        ({"contacts": [MISSING]}, "contacts.0"),
        ({"statusId": NEW}, "statusId"),
        ({"customFields": {SUM_FIELD: "1"}}, f"customFields.{SUM_FIELD}"),
    ],
)
async def test_deal_patch_strictness(env: Env, body: dict[str, Any], field: str) -> None:
    deal = await env.deal(amount=5)
    assert field in invalid(await env.api("PATCH", f"/crm/deals/{deal['id']}", body))
    got = ok(await env.api("GET", f"/crm/deals/{deal['id']}"))["deal"]
    assert (got["amount"], got["winStatus"], got["updatedAt"]) == (5, None, deal["updatedAt"])


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"lastName": "Иванова"}, "firstName"),
        ({"firstName": ""}, "firstName"),
        ({"firstName": "я" * 256}, "firstName"),
        ({"firstName": "Анна", "lastName": "Иванова "}, "lastName"),
        ({"firstName": "Анна", "middleName": "{{patron_name}}"}, "middleName"),
        ({"firstName": "Анна", "emails": ["anna"]}, "emails.0"),
        ({"firstName": "Анна", "emails": ["anna@example"]}, "emails.0"),
        ({"firstName": "Анна", "emails": ["an na@example.com"]}, "emails.0"),
        ({"firstName": "Анна", "emails": ["a@example.com", "A@example.com"]}, "emails.1"),
        ({"firstName": "Анна", "emails": "anna@example.com"}, "emails"),
        ({"firstName": "Анна", "emails": [""]}, "emails.0"),
        ({"firstName": "Анна", "phones": ["+7 916 123-45-67"]}, "phones.0"),
        ({"firstName": "Анна", "phones": ["+7916123"]}, "phones.0"),
        ({"firstName": "Анна", "phones": ["+7916123456789012"]}, "phones.0"),
        ({"firstName": "Анна", "phones": ["+7916123456７"]}, "phones.0"),  # a fullwidth digit
        ({"firstName": "Анна", "phones": [79161234567]}, "phones.0"),
        ({"firstName": "Анна", "phones": ["{{client.phone}}"]}, "phones.0"),
        ({"firstName": "Анна", "organizations": []}, "organizations"),
        ({"firstName": "Анна", "phone": "+79161234567"}, "phone"),
        ({"firstName": "Анна", "lastName": None}, "lastName"),
    ],
)
async def test_contact_strictness(env: Env, body: dict[str, Any], field: str) -> None:
    assert field in invalid(await env.api("POST", "/crm/contacts", body))
    assert env.sandbox.contacts == {}


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"title": "X"}', "text/plain"),
        (b"title=X", "application/x-www-form-urlencoded"),
        (b'{"title": "X"}', "application/json; charset=windows-1251"),
        (b"", "application/json"),
        (b'{"title": "X",}', "application/json"),
        (b'{"title": "X", "title": "Y"}', "application/json"),
        (b'\xef\xbb\xbf{"title": "X"}', "application/json"),
        (b'{"title": "X", "amount": NaN}', "application/json"),
        (b'{"title": "\xff"}', "application/json"),
        (b'["title"]', "application/json"),
        (b'"X"', "application/json"),
    ],
)
async def test_body_must_be_a_strict_json_object(env: Env, content: bytes, content_type: str) -> None:
    r = await env.api(
        "POST", f"/crm/statuses/{NEW}/deals", headers={"Content-Type": content_type}, content=content
    )
    assert set(invalid(r)) == {"body"}
    assert env.sandbox.deals == {}


async def test_json_with_charset_is_accepted(env: Env) -> None:
    r = await env.api(
        "POST",
        f"/crm/statuses/{NEW}/deals",
        headers={"Content-Type": "application/json; charset=utf-8"},
        content='{"title": "Стрижка"}'.encode(),
    )
    ok(r)


async def test_query_and_bodies_where_none_belong(env: Env) -> None:
    assert set(invalid(await env.api("GET", "/crm/funnels", params={"limit": "10"}))) == {"limit"}
    errors = invalid(await env.api("GET", "/crm/funnels", content=b"{}"))
    assert errors == {"body": ["A GET request takes no body."]}
    r = await env.api("POST", f"/crm/statuses/{NEW}/deals", {"title": "X"}, params={"title": "Y"})
    assert set(invalid(r)) == {"title"}


async def test_unknown_path_and_wrong_method(env: Env) -> None:
    for path in ("/crm/funnels/", "/crm/deal", "/crm/deals/x/y/z"):
        assert failed(await env.api("GET", path), 404)["message"] == "Route not found"
    r = await env.http.get("/crm/funnels", headers={"Authorization": f"Bearer {TOKEN}"})  # without the prefix
    failed(r, 404)
    r = await env.api("PUT", f"/crm/deals/{MISSING}", {"title": "X"})
    failed(r, 405)
    assert r.headers["allow"] == "GET, PATCH, DELETE"
    r = await env.api("POST", "/crm/funnels", {"name": "X"})
    assert (r.status_code, r.headers["allow"]) == (405, "GET")
    # Checked before the token, and recorded.
    assert (await env.api("DELETE", "/crm/contacts", token=None)).status_code == 405
    recs = await env.sandbox.wait_for_requests(7, timeout=5)
    assert [(r.route, r.status) for r in recs][-3:] == [
        ("/crm/deals/{dealId}", 405),
        ("/crm/funnels", 405),
        ("/crm/contacts", 405),
    ]
    assert (await env.http.get("/_sandbox/nothing")).status_code == 404


# ---- auth --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"bearer {TOKEN}"},
        {"Authorization": f"Token {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer  {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer"},
        {
            "Authorization": f"Bearer {TOKEN}",
            "X-Extra": "1",
            "authorization": f"Bearer {TOKEN}",
        },  # given twice
    ],
)
async def test_bad_token_is_401(env: Env, headers: dict[str, str]) -> None:
    r = await env.api("POST", "/crm/contacts", {"firstName": "Анна"}, token=None, headers=headers)
    assert failed(r, 401) == {"success": False, "message": "Unauthenticated."}
    assert env.sandbox.contacts == {}
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.token_present, rec.token_valid, rec.status) == (bool(headers), False, 401)


async def test_the_other_token_works(env: Env) -> None:
    ok(await env.api("GET", "/crm/funnels", token=OTHER_TOKEN))


async def test_any_token_without_configuration(app_server: ServeApp) -> None:
    sandbox = WeeekSandbox()
    async with (
        app_server(create_weeek_app(None, sandbox)) as base_url,
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        r = await http.get(API_PREFIX + "/crm/funnels", headers={"Authorization": "Bearer whatever"})
        ok(r)
        failed(await http.get(API_PREFIX + "/crm/funnels"), 401)
        failed(await http.get(API_PREFIX + "/crm/funnels", headers={"Authorization": "Bearer"}), 401)
    assert [r.token_valid for r in sandbox.requests] == [True, False, False]
    with pytest.raises(ValueError):  # noqa: PT011
        create_weeek_app({"has space"})


async def test_token_never_appears_in_control_routes(env: Env) -> None:
    contact = await env.contact()
    await env.api("GET", "/crm/funnels", token="wrong-secret-token")
    await env.api("GET", "/crm/funnels", token=OTHER_TOKEN)
    await env.api("DELETE", "/crm/funnels")
    await env.sandbox.wait_for_requests(4, timeout=5)
    for what in ("requests", "contacts", "deals", "workspace", "faults"):
        text = (await env.http.get(f"/_sandbox/{what}")).text
        for secret in (TOKEN, OTHER_TOKEN, "wrong-secret-token"):
            assert secret not in text, what
    requests = await env.control("requests")
    assert [r["token_valid"] for r in requests] == [True, False, True, True]
    assert requests[0]["body"] == {"firstName": "Анна"}
    assert requests[0]["route"] == "/crm/contacts"
    assert requests[0]["path"] == f"{API_PREFIX}/crm/contacts"
    assert contact["id"] == contact_id(1)


async def test_lone_surrogate_is_logged_escaped(env: Env) -> None:
    invalid(await env.api("POST", "/crm/contacts", {"firstName": "A\ud800"}))
    [rec] = await env.control("requests")
    assert rec["body"] == {"firstName": "A\\ud800"}
    assert rec["errors"] == {"firstName": ["The value must not contain a lone surrogate."]}


# ---- faults ------------------------------------------------------------------------------------


async def test_http_status_429_with_retry_after(env: Env) -> None:
    await env.fault(mode="http_status", status=429, retry_after=7, times=1)
    r = await env.api("POST", "/crm/contacts", {"firstName": "Анна"})
    assert (r.status_code, r.headers["retry-after"]) == (429, "7")
    assert env.sandbox.contacts == {}
    await env.contact()  # once only


async def test_http_status_503_and_error_mode(env: Env) -> None:
    await env.fault(mode="http_status", status=503)
    r = await env.api("GET", "/crm/funnels")
    assert (r.status_code, r.headers["content-type"].split(";")[0]) == (503, "text/html")
    await env.fault(mode="error", message="Сервис недоступен")
    assert failed(await env.api("GET", "/crm/funnels"), 200) == {
        "success": False,
        "message": "Сервис недоступен",
    }
    await env.fault(mode="error", message="Too Many Attempts.", status=429)
    failed(await env.api("GET", "/crm/funnels"), 429)
    ok(await env.api("GET", "/crm/funnels"))


async def test_drop_closes_the_connection(env: Env) -> None:
    await env.fault(mode="drop", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await env.api("POST", "/crm/contacts", {"firstName": "Анна"})
    assert env.sandbox.contacts == {}
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.outcome, rec.status) == ("dropped", None)
    await env.contact()


async def test_delay_answers_late_with_the_side_effect(env: Env) -> None:
    await env.fault(mode="delay", seconds=0.3, times=1)
    with pytest.raises(httpx.ReadTimeout):
        await env.http.post(
            API_PREFIX + "/crm/contacts",
            json={"firstName": "Анна"},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=0.1,
        )
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert rec.status == 200
    assert rec.duration_ms is not None
    assert rec.duration_ms >= 300
    assert len(env.sandbox.contacts) == 1  # created although the client gave up
    started = time.perf_counter()
    await env.contact()
    assert time.perf_counter() - started < 0.3


@pytest.mark.parametrize(
    "spec",
    [
        {"route": "/crm/deals/{dealId}/contacts", "method": "POST"},
        {"path_regex": r"^/public/v1/crm/deals/[^/]+/contacts$"},
        {"path_regex": "/contacts$", "method": "POST", "match": {"contactId": contact_id(1)}},
    ],
)
async def test_fault_filtered_to_the_link_step(env: Env, spec: dict[str, Any]) -> None:
    await env.fault(mode="http_status", status=503, times=1, **spec)
    contact = await env.contact()  # POST /crm/contacts: not the link step
    deal = await env.deal(contacts=[])
    path = f"/crm/deals/{deal['id']}/contacts"
    assert (await env.api("POST", path, {"contactId": contact["id"]})).status_code == 503
    assert env.sandbox.deals[deal["id"]].contacts == []
    ok(await env.api("POST", path, {"contactId": contact["id"]}))
    assert env.sandbox.deals[deal["id"]].contacts == [contact["id"]]
    recs = await env.control("requests?route=/crm/deals/{dealId}/contacts")
    assert [r["status"] for r in recs] == [503, 200]


async def test_path_prefix_fault_hits_contacts_but_not_the_link(env: Env) -> None:
    await env.fault(mode="http_status", status=500, path_prefix=f"{API_PREFIX}/crm/contacts", times=2)
    deal = await env.deal()  # not under the prefix
    assert (await env.api("POST", "/crm/contacts", {"firstName": "Анна"})).status_code == 500
    assert (await env.api("GET", "/crm/contacts")).status_code == 500
    assert env.sandbox.contacts == {}
    contact = await env.contact()
    # The link step is /crm/deals/{dealId}/contacts: outside the prefix.
    ok(await env.api("POST", f"/crm/deals/{deal['id']}/contacts", {"contactId": contact["id"]}))
    assert await env.control("faults") == []


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "error"},
        {"mode": "error", "message": ""},
        {"mode": "drop", "message": "x"},
        {"mode": "drop", "route": "/crm/deals/{id}"},
        {"mode": "drop", "route": "/crm/funnels", "method": "POST"},
        {"mode": "drop", "method": "FETCH"},
        {"mode": "drop", "path_prefix": "crm/contacts"},
        {"mode": "drop", "path_regex": "("},
        {"mode": "drop", "token": TOKEN},
        {"mode": "teapot"},
    ],
)
async def test_invalid_fault_specs_are_refused(env: Env, spec: dict[str, Any]) -> None:
    r = await env.http.post("/_sandbox/faults", json=spec)
    assert r.status_code == 422, r.text
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError
        FaultSpec.model_validate(spec)


async def test_faults_never_hit_unknown_paths(env: Env) -> None:
    await env.fault(mode="http_status", status=503, times=1)
    failed(await env.api("GET", "/crm/nothing"), 404)
    failed(await env.api("POST", "/crm/funnels", {}), 405)
    assert (await env.api("GET", "/crm/funnels")).status_code == 503


# ---- reset -------------------------------------------------------------------------------------


async def test_reset_forgets_everything_and_ids_restart(env: Env) -> None:
    await env.contact()
    await env.deal()
    await env.fault(mode="http_status", status=500, route="/crm/funnels")
    await env.http.post("/_sandbox/latency", json={"ms": 5})
    assert (await env.http.post("/_sandbox/reset")).json() == {"ok": True}
    for what in ("contacts", "deals", "requests", "faults"):
        assert await env.control(what) == []
    assert (await env.control("latency")) == {"ms": 0.0}
    assert (await env.contact())["id"] == contact_id(1)
    assert (await env.deal())["id"] == deal_id(1)
    ok(await env.api("GET", "/crm/funnels"))
