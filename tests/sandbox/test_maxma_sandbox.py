"""The Maxma sandbox over real HTTP: uvicorn on 127.0.0.1, httpx as the client."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.sandbox.maxma import DEFAULT_SHOPS, MaxmaSandbox, create_maxma_app
from tests.support import serve_app

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
        # json.dumps escapes non-ASCII, so a lone surrogate travels as "\\ud800", as a client can send it.
        return await self.http.post(f"/{method}", content=json.dumps(body), headers=headers)

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


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[tuple[MaxmaSandbox, str]]:
    """One server for the module: starting uvicorn for each test would take most of the file's time."""
    sandbox = MaxmaSandbox()
    async with serve_app(create_maxma_app({KEY}, sandbox)) as base_url:
        yield sandbox, base_url


@pytest.fixture
async def env(served: tuple[MaxmaSandbox, str]) -> AsyncIterator[Env]:
    sandbox, base_url = served
    sandbox.reset()
    sandbox.shops = set(DEFAULT_SHOPS)  # reset keeps shops (the account's setup); a test may have added one
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
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


# An empty phone is no phone, but as "" it is an unclean string (2, tested below); null is the way.
@pytest.mark.parametrize("client", [{}, {"phoneNumber": None}, {"email": "a@example.com"}])
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
    assert error_code(await env.call("v2/set-order", order("o-1"))) == 32
    [stored] = await env.control("orders")
    assert (stored["orderId"], stored["status"]) == ("o-1", "confirmed")
    assert (stored["confirmations"], stored["cancellations"]) == (1, 0)  # the repeat did not count


async def test_cancel_order_releases_reservation(env: Env) -> None:
    await env.new_client()
    env.sandbox.find_client(phone_number=PHONE).bonuses = 300  # type: ignore[union-attr]
    await env.call("v2/set-order", order("o-2", applyBonuses="auto"))
    cancelled = await env.call("cancel-order", {"orderId": "o-2"})
    assert error_code(cancelled) is None
    assert cancelled.json()["clientBonuses"] == {"available": 300, "pending": 0, "reserved": 0}
    assert error_code(await env.call("confirm-order", {"orderId": "o-2"})) == 32
    assert error_code(await env.call("cancel-order", {"orderId": "o-2"})) == 32
    assert error_code(await env.call("v2/set-order", order("o-2"))) == 32
    [stored] = await env.control("orders")
    assert (stored["status"], stored["confirmations"], stored["cancellations"]) == ("cancelled", 0, 1)


async def test_order_errors(env: Env) -> None:
    assert error_code(await env.call("confirm-order", {"orderId": "nope"})) == 31
    assert error_code(await env.call("cancel-order", {"orderId": "nope"})) == 31
    assert error_code(await env.call("v2/set-order", order("o-3"))) == 3  # unknown client
    await env.new_client()
    assert error_code(await env.call("v2/set-order", order("o-3", rows=[]))) == 18
    assert error_code(await env.call("v2/set-order", {"calculationQuery": {}})) == 2
    assert env.sandbox.orders == {}


# ---- shops -------------------------------------------------------------------------------------


def hint(r: httpx.Response) -> str:
    return str(r.json().get("hint") or "")


@pytest.mark.parametrize(
    ("shop", "field"),
    [
        (None, "calculationQuery.shop must be an object"),
        ("main", "calculationQuery.shop must be an object"),
        ({"code": "main"}, "calculationQuery.shop.name"),
        ({"name": "Main salon"}, "calculationQuery.shop.code"),
        ({"code": "main", "name": 5}, "calculationQuery.shop.name"),
        ({"code": "", "name": "Main salon"}, "calculationQuery.shop.code"),
    ],
)
async def test_set_order_needs_a_shop_with_code_and_name(env: Env, shop: Any, field: str) -> None:
    await env.new_client()
    r = await env.call("v2/set-order", order("o-1", shop=shop))
    assert (error_code(r), field in hint(r)) == (2, True), r.json()
    assert env.sandbox.orders == {}


async def test_unknown_shop_is_5_and_changes_nothing(env: Env) -> None:
    await env.new_client()
    branch = {"code": "branch-2", "name": "Филиал"}
    r = await env.call("v2/set-order", order("o-1", shop=branch))
    assert error_code(r) == 5
    assert r.json()["description"] == "Магазин не найден"
    assert "calculationQuery.shop.code" in hint(r)
    assert env.sandbox.orders == {}
    # new-client's shop is optional, but checked the same way when given.
    r = await env.call("new-client", {"client": {"phoneNumber": OTHER_PHONE}, "shop": branch})
    assert (error_code(r), "shop.code" in hint(r)) == (5, True)
    r = await env.call("new-client", {"client": {"phoneNumber": OTHER_PHONE}, "shop": {"code": "main"}})
    assert (error_code(r), "shop.name" in hint(r)) == (2, True)
    assert env.sandbox.find_client(phone_number=OTHER_PHONE) is None


async def test_shops_control_route_adds_and_reset_keeps_them(env: Env) -> None:
    assert await env.control("shops") == ["main"]
    r = await env.http.post("/_sandbox/shops", json={"code": "branch-2"})
    assert (r.status_code, r.json()) == (201, {"code": "branch-2", "shops": ["branch-2", "main"]})
    await env.new_client()
    branch = {"code": "branch-2", "name": "Филиал"}
    assert error_code(await env.call("v2/set-order", order("o-1", shop=branch))) is None
    assert (await env.http.post("/_sandbox/reset")).json() == {"ok": True}
    assert await env.control("shops") == ["branch-2", "main"]  # the account's setup, not its data


@pytest.mark.parametrize(
    "spec", [{}, {"code": ""}, {"code": "  "}, {"code": "a\nb"}, {"code": 5}, {"code": "x", "name": "y"}]
)
async def test_invalid_shop_spec_is_422(env: Env, spec: dict[str, Any]) -> None:
    assert (await env.http.post("/_sandbox/shops", json=spec)).status_code == 422
    assert env.sandbox.shops == {"main"}


def test_shops_are_the_sandboxs_configuration() -> None:
    assert MaxmaSandbox().shops == {"main"}
    assert MaxmaSandbox(shops=["a", "b"]).shops == {"a", "b"}
    assert create_maxma_app(shops=("x",)).state.sandbox.shops == {"x"}
    with pytest.raises(ValueError, match="state"):
        create_maxma_app(state=MaxmaSandbox(), shops=["x"])
    with pytest.raises(TypeError):
        MaxmaSandbox(shops="main")
    with pytest.raises(ValueError, match="shop code"):
        MaxmaSandbox(shops=[" "])


async def test_an_account_with_its_own_shops(app_server: Any) -> None:
    app = create_maxma_app({KEY}, shops=["salon-1"])
    async with app_server(app) as url, httpx.AsyncClient(base_url=url) as http:
        env = Env(app.state.sandbox, url, http)
        await env.new_client()
        own = order("o-1", shop={"code": "salon-1", "name": "Салон"})
        assert error_code(await env.call("v2/set-order", own)) is None
        assert error_code(await env.call("v2/set-order", order("o-2"))) == 5  # "main" is not this account's


def test_cli_shop_option(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from services.cli import roles

    served: list[set[str]] = []
    monkeypatch.setattr(roles, "configure_logging", lambda *a, **k: None)
    monkeypatch.setattr(roles, "serve", lambda app, *a, **k: served.append(app.state.sandbox.shops))
    runner = CliRunner()
    assert runner.invoke(roles.sandbox_app, ["maxma", "--shop", "a", "--shop", "b"]).exit_code == 0
    assert runner.invoke(roles.sandbox_app, ["maxma"]).exit_code == 0
    assert served == [{"a", "b"}, {"main"}]
    bad = runner.invoke(roles.sandbox_app, ["maxma", "--shop", " "])
    assert bad.exit_code == 2
    assert len(served) == 2


# ---- clean strings -----------------------------------------------------------------------------

UNCLEAN = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("\u00a0", id="nbsp-only"),
    pytest.param("Анна\x00", id="nul"),
    pytest.param("Анна\nИванова", id="newline"),
    pytest.param("Анна\t", id="tab"),
    pytest.param("Анна\x7f", id="del"),
    pytest.param("Ан\u200bна", id="zero-width-space"),
    pytest.param("\ufeffАнна", id="bom"),
    pytest.param("Анна\u202e", id="bidi-override"),
    pytest.param("Ан\u00adна", id="soft-hyphen"),
    pytest.param("Ан\ufffdна", id="replacement-char"),
    pytest.param("Анна\ud800", id="lone-surrogate"),
    pytest.param("\udc80", id="lone-low-surrogate"),
    pytest.param("{{client.name}}", id="placeholder"),
    pytest.param("Здравствуйте, {{ name }}!", id="placeholder-inside"),
]


@pytest.mark.parametrize("text", UNCLEAN)
async def test_unclean_string_is_2_naming_its_path(env: Env, text: str) -> None:
    r = await env.new_client(fullName=text)
    assert error_code(r) == 2
    assert hint(r).startswith("client.fullName "), hint(r)
    assert env.sandbox.clients == {}


def _order_with_title(title: str) -> dict[str, Any]:
    body = order("o-1")
    body["calculationQuery"]["rows"][1]["product"]["title"] = title
    return body


@pytest.mark.parametrize(
    ("method", "body", "path"),
    [
        (
            "new-client",
            {"client": {"phoneNumber": PHONE, "extraFields": {"note": "a\x00"}}},
            "client.extraFields.note",
        ),
        (
            "new-client",
            {"client": {"phoneNumber": PHONE, "extraFields": {"bad\u200bkey": "v"}}},
            "the key 'bad\\u200bkey' in client.extraFields",
        ),
        ("new-client", {"client": {"phoneNumber\ud800": PHONE}}, "the key 'phoneNumber\\ud800' in client"),
        (
            "new-client",
            {"client": {"phoneNumber": PHONE}, "shop": {"code": "main", "name": "{{shop}}"}},
            "shop.name",
        ),
        ("update-client", {"externalId": "", "client": {}}, "externalId"),
        ("update-client", {"externalId": "ext-1", "client": {"name": "Аня", "email": ""}}, "client.email"),
        ("get-balance", {"card": " "}, "card"),
        ("v2/set-order", _order_with_title("Воск\r\n"), "calculationQuery.rows[1].product.title"),
        (
            "v2/set-order",
            order("o-1", client={"externalId": "ext\u2060-1"}),
            "calculationQuery.client.externalId",
        ),
        ("confirm-order", {"orderId": "o-1\u0000"}, "orderId"),
        ("cancel-order", {"orderId": "o-1", "executedAt": ""}, "executedAt"),
    ],
)
async def test_unclean_strings_anywhere_are_2_before_anything_changes(
    env: Env, method: str, body: dict[str, Any], path: str
) -> None:
    await env.new_client(externalId="ext-1", email="a@example.com", name="Анна")
    before = (await env.control("clients"), await env.control("orders"))
    r = await env.call(method, body)
    assert error_code(r) == 2
    assert hint(r).startswith(path), hint(r)
    assert (await env.control("clients"), await env.control("orders")) == before


async def test_request_log_shows_a_lone_surrogate_escaped(env: Env) -> None:
    await env.new_client(fullName="\ud800")
    [rec] = await env.control("requests")  # the log still answers
    assert rec["body"]["client"]["fullName"] == "\\ud800"
    assert rec["error_code"] == 2


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b'{"client": {"phoneNumber": "+79998887766", "level": NaN}}', id="nan"),
        pytest.param(b'{"client": {"phoneNumber": "+79998887766", "level": Infinity}}', id="infinity"),
        pytest.param(b'\xef\xbb\xbf{"client": {"phoneNumber": "+79998887766"}}', id="bom"),
        pytest.param(b'{"client": {"phoneNumber": "+79998887766", "name": "\xff"}}', id="invalid-utf8"),
        pytest.param(
            b'{"client": {"phoneNumber": "+79998887766", "name": "\xed\xa0\x80"}}', id="utf8-surrogate"
        ),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="nested-too-deep"),
    ],
)
async def test_json_that_is_not_strict_is_2(env: Env, raw: bytes) -> None:
    r = await env.http.post(
        "/new-client", content=raw, headers={"X-Processing-Key": KEY, "Content-Type": "application/json"}
    )
    assert (r.status_code, error_code(r)) == (200, 2)
    assert env.sandbox.clients == {}
    [rec] = await env.control("requests")
    assert rec["malformed"] is True


# ---- order rows, ids and times -----------------------------------------------------------------


def row(*, drop: tuple[str, ...] = (), **changes: Any) -> dict[str, Any]:
    """A valid row with ``changes`` (``product_x`` sets product.x) and the keys in ``drop`` removed."""
    out: dict[str, Any] = {"product": {"sku": "haircut", "title": "Стрижка", "blackPrice": 1500}, "qty": 1}
    for key, value in changes.items():
        if key.startswith("product_"):
            out["product"][key.removeprefix("product_")] = value
        else:
            out[key] = value
    for key in drop:
        if key.startswith("product_"):
            del out["product"][key.removeprefix("product_")]
        else:
            del out[key]
    return out


@pytest.mark.parametrize(
    ("rows", "path"),
    [
        ([row(drop=("product_sku",))], "calculationQuery.rows[0].product.sku"),
        ([row(drop=("product_title",))], "calculationQuery.rows[0].product.title"),
        ([row(product_title=5)], "calculationQuery.rows[0].product.title"),
        ([row(drop=("product",))], "calculationQuery.rows[0].product"),
        ([row(drop=("product_blackPrice",))], "calculationQuery.rows[0].product.blackPrice"),
        ([row(), row(product_blackPrice=-1)], "calculationQuery.rows[1].product.blackPrice"),
        ([row(product_blackPrice=10.005)], "calculationQuery.rows[0].product.blackPrice"),
        ([row(product_blackPrice=0.1 + 0.2)], "calculationQuery.rows[0].product.blackPrice"),
        ([row(product_blackPrice="10.005")], "calculationQuery.rows[0].product.blackPrice"),
        ([row(product_blackPrice="1e3")], "calculationQuery.rows[0].product.blackPrice"),
        ([row(product_blackPrice="10,50")], "calculationQuery.rows[0].product.blackPrice"),
        ([row(product_blackPrice=True)], "calculationQuery.rows[0].product.blackPrice"),
        ([row(product_redPrice=1.001)], "calculationQuery.rows[0].product.redPrice"),
        ([row(qty=0)], "calculationQuery.rows[0].qty"),
        ([row(qty=-1)], "calculationQuery.rows[0].qty"),
        ([row(drop=("qty",))], "calculationQuery.rows[0].qty"),
        ([row(id=7)], "calculationQuery.rows[0].id"),
        ([row(id="a"), row(id="b"), row(id="a")], "calculationQuery.rows[2].id"),
        ("rows", "calculationQuery.rows"),
        ([5], "calculationQuery.rows[0]"),
    ],
)
async def test_invalid_order_row_is_2(env: Env, rows: Any, path: str) -> None:
    await env.new_client()
    r = await env.call("v2/set-order", order("o-1", rows=rows))
    assert error_code(r) == 2
    assert hint(r).startswith(path), hint(r)
    assert env.sandbox.orders == {}


async def test_rows_as_the_sdks_model_them_are_accepted(env: Env) -> None:
    await env.new_client()
    rows = [
        row(id="r1", product_blackPrice="1500.50", product_redPrice=1400),
        row(id="r2", product_sku="wax", product_title="Воск", product_blackPrice=10.1, qty=1.5),
        row(product_sku="gift", product_title="Подарок", product_blackPrice=0),
    ]
    r = await env.call("v2/set-order", order("o-1", rows=rows))
    assert error_code(r) is None, r.json()
    assert [x.get("id") for x in r.json()["calculationResult"]["rows"]] == ["r1", "r2", None]
    [stored] = await env.control("orders")
    assert stored["totalAmount"] == 1515.65


@pytest.mark.parametrize(
    ("order_id", "ok"), [("x" * 64, True), ("x" * 65, False), (42, False), (None, False)]
)
async def test_order_id_is_a_string_of_at_most_64(env: Env, order_id: Any, ok: bool) -> None:
    await env.new_client()
    r = await env.call("v2/set-order", {**order("o"), "orderId": order_id})
    assert error_code(r) == (None if ok else 2)
    if not ok:
        assert hint(r).startswith("orderId")
        assert error_code(await env.call("confirm-order", {"orderId": order_id})) == 2


GOOD_TIMES = [
    "2024-05-01T10:00:00+03:00",
    "2024-05-01T07:00:00Z",
    "2024-05-01T10:00:00.123456-05:30",
    "2024-05-01t07:00:00z",
]
BAD_TIMES: list[Any] = [
    "2024-05-01",
    "2024-05-01T10:00:00",
    "2024-05-01 10:00:00+03:00",
    "2024-05-01T10:00:00+0300",
    "2024-13-01T10:00:00Z",
    "01.05.2024 10:00",
    1714550400,
]


@pytest.mark.parametrize("method", ["v2/set-order", "confirm-order", "cancel-order"])
async def test_executed_at_is_rfc3339_with_an_offset(env: Env, method: str) -> None:
    await env.new_client()

    def body(order_id: str, executed_at: Any) -> dict[str, Any]:
        if method == "v2/set-order":
            return order(order_id, executedAt=executed_at)
        return {"orderId": order_id, "executedAt": executed_at}

    where = "calculationQuery.executedAt" if method == "v2/set-order" else "executedAt"
    for i, value in enumerate(GOOD_TIMES):
        assert error_code(await env.call("v2/set-order", order(f"o-{i}"))) is None
        r = await env.call(method, body(f"o-{i}", value))
        assert error_code(r) is None, (value, r.json())
    stored = await env.control("orders")
    key = {"v2/set-order": "executedAt", "confirm-order": "confirmedAt", "cancel-order": "cancelledAt"}[
        method
    ]
    assert [o[key] for o in stored] == GOOD_TIMES
    assert error_code(await env.call("v2/set-order", order("o-bad"))) is None
    for value in BAD_TIMES:
        r = await env.call(method, body("o-bad", value))
        assert (error_code(r), hint(r).startswith(where)) == (2, True), (value, r.json())
    assert env.sandbox.orders["o-bad"].status == "new"


async def test_bonus_requests_are_an_int_or_auto(env: Env) -> None:
    await env.new_client()
    for field in ("applyBonuses", "collectBonuses"):
        for value in (-1, 1.5, "all", True):
            body = order("o-1")
            body["calculationQuery"][field] = value
            r = await env.call("v2/set-order", body)
            assert (error_code(r), hint(r).startswith(f"calculationQuery.{field}")) == (2, True), value
    assert env.sandbox.orders == {}


# ---- order lifecycle ---------------------------------------------------------------------------


async def test_cancel_of_a_confirmed_order_is_a_refund(env: Env) -> None:
    await env.new_client()
    env.sandbox.find_client(phone_number=PHONE).bonuses = 300  # type: ignore[union-attr]
    await env.call("v2/set-order", order("o-1", applyBonuses=100, collectBonuses="auto"))
    confirmed = await env.call("confirm-order", {"orderId": "o-1"})
    assert confirmed.json()["clientBonuses"] == {"available": 200, "pending": 95, "reserved": 0}

    refund = await env.call("cancel-order", {"orderId": "o-1", "executedAt": "2024-05-02T12:00:00+03:00"})
    assert error_code(refund) is None, refund.json()
    # The applied bonuses come back and the pending ones the confirmation credited are taken back.
    assert refund.json()["clientBonuses"] == {"available": 300, "pending": 0, "reserved": 0}
    assert refund.json()["operationResult"]["appliedBonuses"] == 0
    client = env.sandbox.find_client(phone_number=PHONE)
    assert client is not None
    assert (client.bonuses, client.pending_bonuses, client.reserved_bonuses) == (300, 0, 0)

    for method, body in (
        ("cancel-order", {"orderId": "o-1"}),
        ("confirm-order", {"orderId": "o-1"}),
        ("v2/set-order", order("o-1")),
    ):
        assert error_code(await env.call(method, body)) == 32, method
    [stored] = await env.control("orders")
    assert (stored["status"], stored["confirmations"], stored["cancellations"]) == ("cancelled", 1, 1)
    assert stored["cancelledAt"] == "2024-05-02T12:00:00+03:00"
    assert (client.bonuses, client.pending_bonuses) == (300, 0)  # the refused repeats changed nothing


async def test_anonymous_order_confirms_and_cancels(env: Env) -> None:
    body = order("anon")
    del body["calculationQuery"]["client"]
    assert error_code(await env.call("v2/set-order", body)) is None
    confirmed = await env.call("confirm-order", {"orderId": "anon"})
    assert confirmed.json()["clientBonuses"] == {"available": 0, "pending": 0, "reserved": 0}
    assert error_code(await env.call("cancel-order", {"orderId": "anon"})) is None
    assert env.sandbox.orders["anon"].status == "cancelled"


# ---- update-client -----------------------------------------------------------------------------


async def test_update_client_with_no_changes_is_accepted(env: Env) -> None:
    created = (await env.new_client(externalId="ext-1", name="Анна")).json()["client"]
    same = {"phoneNumber": PHONE, "externalId": "ext-1", "name": "Анна"}
    for body in ({"externalId": "ext-1", "client": {}}, {"phoneNumber": PHONE, "client": same}):
        r = await env.call("update-client", body)
        assert error_code(r) is None, r.json()
        assert r.json()["client"] == created
    r = await env.call("update-client", {"externalId": "ext-1"})
    assert (error_code(r), hint(r)) == (2, "client must be an object")


async def test_update_client_cannot_take_anothers_external_id(env: Env) -> None:
    await env.new_client(externalId="a")
    await env.call("new-client", {"client": {"phoneNumber": OTHER_PHONE, "externalId": "b", "name": "Б"}})
    r = await env.call("update-client", {"externalId": "b", "client": {"externalId": "a", "name": "В"}})
    assert error_code(r) == 30
    b = env.sandbox.find_client(phone_number=OTHER_PHONE)
    assert b is not None
    assert (b.external_id, b.name) == ("b", "Б")
    assert env.sandbox.find_client(external_id="a").phone_number == PHONE  # type: ignore[union-attr]


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
    assert sorted(str(c.external_id) for c in sandbox.clients.values()) == ["A", "B"]
