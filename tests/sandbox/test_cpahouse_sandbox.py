"""The CPA.House sandbox over real HTTP: uvicorn on 127.0.0.1, httpx as the client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.sandbox.cpahouse import (
    REQUIRED_FIELDS,
    SEND_ORDER_PATH,
    CpaHouseSandbox,
    FaultSpec,
    create_cpahouse_app,
)

KEY = "cpa-secret-key-0123456789"
OTHER_KEY = "cpa-other-secret-key-987"
WEBMASTER = "1001"
PHONE = "+79161234567"
FORM_TYPE = "application/x-www-form-urlencoded"

ServeApp = Callable[[Any], AbstractAsyncContextManager[str]]


def lead_form(**over: str | None) -> dict[str, str]:
    """A valid send_order form; a keyword replaces a field, None removes it."""
    form = {
        "api_key": KEY,
        "id_webmaster": WEBMASTER,
        "name": "Анна Иванова",
        "phone": PHONE,
        "id_offer": "42",
        "id_source": "7",
        "id_stream": "3",
        "user_agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0",
        "ip_address": "203.0.113.10",
        "county_code": "RU",
    }
    for name, value in over.items():
        if value is None:
            form.pop(name, None)
        else:
            form[name] = value
    return form


@dataclass
class Env:
    sandbox: CpaHouseSandbox
    http: httpx.AsyncClient

    async def send(self, form: dict[str, Any] | None = None, /, **over: str | None) -> httpx.Response:
        """POST send_order as a form, the way the public integrations do."""
        return await self.http.post(SEND_ORDER_PATH, data=form if form is not None else lead_form(**over))

    async def raw(self, body: bytes | str, content_type: str = FORM_TYPE, path: str = SEND_ORDER_PATH) -> Any:
        r = await self.http.post(path, content=body, headers={"Content-Type": content_type})
        assert r.status_code == 200, r.text
        return r.json()

    async def fault(self, **spec: Any) -> dict[str, Any]:
        r = await self.http.post("/_sandbox/faults", json=spec)
        assert r.status_code == 201, r.text
        return r.json()  # type: ignore[no-any-return]

    async def control(self, what: str) -> Any:
        r = await self.http.get(f"/_sandbox/{what}")
        assert r.status_code == 200
        return r.json()


@pytest.fixture(scope="module")
def app_server() -> ServeApp:
    """The conftest's fixture at module scope, so one server can serve the whole module."""
    from tests.support import serve_app

    return serve_app


@pytest.fixture(scope="module")
async def served(app_server: ServeApp) -> AsyncIterator[Env]:
    # One server and client for the module (a fresh pair per test costs more than the tests): reset per test.
    sandbox = CpaHouseSandbox()
    async with (
        app_server(create_cpahouse_app({KEY: WEBMASTER, OTHER_KEY: "2002"}, sandbox)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield Env(sandbox, http)


@pytest.fixture
def env(served: Env) -> Iterator[Env]:
    served.sandbox.reset()
    yield served
    served.sandbox.reset()


def ok(r: httpx.Response) -> int:
    """The lead id of a successful answer."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == "success", body
    assert set(body) == {"status", "id"}
    assert isinstance(body["id"], int)
    return body["id"]


def refused(r: httpx.Response | dict[str, Any]) -> str:
    """The msg of an error answer (HTTP 200 JSON)."""
    if isinstance(r, httpx.Response):
        assert r.status_code == 200, r.text
        body = r.json()
    else:
        body = r
    assert body["status"] != "success", body
    assert set(body) == {"status", "msg"}
    assert isinstance(body["msg"], str)
    assert body["msg"]
    return body["msg"]


# ---- success -----------------------------------------------------------------------------------


async def test_valid_lead_is_accepted_and_stored(env: Env) -> None:
    assert ok(await env.send()) == 1
    [lead] = env.sandbox.leads
    assert (lead.id, lead.name, lead.phone, lead.county_code) == (1, "Анна Иванова", PHONE, "RU")
    assert (lead.id_webmaster, lead.id_offer, lead.id_source, lead.id_stream) == ("1001", "42", "7", "3")
    assert lead.sub_id_1 is None
    assert lead.created_at > 0
    [listed] = await env.control("leads")
    assert listed["name"] == "Анна Иванова"
    assert "api_key" not in listed
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.status, rec.status_field, rec.msg, rec.lead_id, rec.key_valid) == (
        200,
        "success",
        None,
        1,
        True,
    )
    assert "api_key" not in rec.fields
    assert rec.fields["phone"] == PHONE


@pytest.mark.parametrize(
    ("over", "country"),
    [
        ({"sub_id_1": "klientiks-42", "sub_id_2": "visit-7", "sub_id_3": "a b", "sub_id_4": "x"}, "RU"),
        ({"phone": "+380501234567", "county_code": "UA"}, "UA"),
        ({"phone": "+375291234567", "county_code": "BY", "ip_address": "2001:db8::1"}, "BY"),
        ({"phone": "89161234567", "name": "O'Brien-Smith Jr."}, "RU"),  # national format of the region
        ({"user_agent": "u" * 512, "name": "я" * 255, "sub_id_1": "s" * 255}, "RU"),  # the limits
    ],
)
async def test_valid_variants_are_accepted(env: Env, over: dict[str, str], country: str) -> None:
    ok(await env.send(**over))
    [lead] = env.sandbox.leads
    assert lead.county_code == country
    for name, value in over.items():
        assert getattr(lead, name) == value


async def test_utf8_percent_encoding_is_decoded(env: Env) -> None:
    body = httpx.QueryParams(lead_form(name="Ёлка Ω")).__str__()
    assert "%D0%81" in body
    assert (await env.raw(body))["status"] == "success"
    assert env.sandbox.leads[0].name == "Ёлка Ω"


async def test_duplicates_are_accepted_and_both_stored(env: Env) -> None:
    # A retry after a lost answer must not turn into a failure: both copies are kept.
    first = ok(await env.send(sub_id_1="42"))
    second = ok(await env.send(sub_id_1="42"))
    assert (first, second) == (1, 2)
    assert [(lead.id, lead.phone) for lead in env.sandbox.leads] == [(1, PHONE), (2, PHONE)]
    assert [lead["id"] for lead in await env.control("leads")] == [1, 2]


async def test_any_key_and_webmaster_without_accounts(app_server: ServeApp) -> None:
    sandbox = CpaHouseSandbox()
    async with (
        app_server(create_cpahouse_app(None, sandbox)) as base_url,
        httpx.AsyncClient(base_url=base_url) as http,
    ):
        r = await http.post(SEND_ORDER_PATH, data=lead_form(api_key="whatever", id_webmaster="77"))
        assert ok(r) == 1
        # Still strict on everything else, the key included.
        assert "api_key" in refused(await http.post(SEND_ORDER_PATH, data=lead_form(api_key=None)))
        assert "api_key" in refused(await http.post(SEND_ORDER_PATH, data=lead_form(api_key="k ")))
    assert sandbox.requests[0].key_valid is True
    assert sandbox.requests[1].key_valid is False


# ---- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REQUIRED_FIELDS)
async def test_missing_or_empty_required_field_is_named(env: Env, name: str) -> None:
    missing = refused(await env.send(**{name: None}))
    assert missing == f"Не передан обязательный параметр: {name}"
    assert refused(await env.send(**{name: ""})) == missing
    assert env.sandbox.leads == []


_REFUSED: list[tuple[dict[str, str], str]] = [
    # unknown and empty optional fields
    ({"country_code": "RU"}, "Неизвестный параметр: country_code"),
    ({"sub_id_5": "1"}, "Неизвестный параметр: sub_id_5"),
    ({"sub_id_1": ""}, "sub_id_1"),
    # ids: positive integers in ASCII digits
    ({"id_offer": "0"}, "id_offer"),
    ({"id_offer": "-1"}, "id_offer"),
    ({"id_source": "12a"}, "id_source"),
    ({"id_stream": "1.0"}, "id_stream"),
    ({"id_stream": "007"}, "id_stream"),
    ({"id_offer": "٣"}, "id_offer"),  # an Arabic-Indic digit is a digit, not an ASCII one
    ({"id_webmaster": "abc"}, "id_webmaster"),
    # county_code: a real region in two uppercase letters
    ({"county_code": "ru"}, "Неверный код страны"),
    ({"county_code": "RUS"}, "Неверный код страны"),
    ({"county_code": "UK"}, "Неверный код страны"),
    ({"county_code": "XX"}, "Неверный код страны"),
    ({"county_code": "R1"}, "Неверный код страны"),
    # phone: digits and a leading +, a valid number of that region
    ({"phone": "+7 916 123-45-67"}, "phone"),
    ({"phone": "+7(916)1234567"}, "phone"),
    ({"phone": "tel:+79161234567"}, "phone"),
    ({"phone": "+7916"}, "phone"),
    ({"phone": "+380501234567"}, "phone"),  # Ukrainian number, county_code RU
    ({"phone": "+77012345678"}, "phone"),  # +7 of Kazakhstan is not RU
    ({"phone": "+7916123456７"}, "phone"),  # a fullwidth digit
    # ip_address
    ({"ip_address": "1.2.3"}, "ip_address"),
    ({"ip_address": "256.1.1.1"}, "ip_address"),
    ({"ip_address": "01.2.3.4"}, "ip_address"),
    ({"ip_address": "localhost"}, "ip_address"),
    ({"ip_address": "fe80::1%eth0"}, "ip_address"),
    # lengths
    ({"user_agent": "u" * 513}, "user_agent"),
    ({"name": "я" * 256}, "name"),
    ({"sub_id_2": "s" * 256}, "sub_id_2"),
    # value hygiene: control and format characters, U+FFFD, edge whitespace, placeholders
    ({"name": "Анна\n"}, "name"),
    ({"name": "Ан\x00на"}, "name"),
    ({"name": "Анна\u200b"}, "name"),  # zero-width space (Cf)
    ({"user_agent": "Mozilla\u2028"}, "user_agent"),
    ({"sub_id_1": "id-\ufffd"}, "sub_id_1"),
    ({"name": " Анна"}, "name"),
    ({"name": "Анна\u00a0"}, "name"),
    ({"ip_address": "203.0.113.10 "}, "ip_address"),
    ({"name": "{{client_name}}"}, "Неподставленный шаблон в значении параметра: name"),
    ({"sub_id_3": "visit-{{visit_id}}"}, "sub_id_3"),
    ({"phone": "{{phone}}"}, "phone"),
]


@pytest.mark.parametrize(("over", "expect"), _REFUSED, ids=[str(i) for i in range(len(_REFUSED))])
async def test_invalid_values_are_refused_with_the_field_named(
    env: Env, over: dict[str, str], expect: str
) -> None:
    msg = refused(await env.send(**over))
    assert expect in msg
    assert env.sandbox.leads == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.status, rec.status_field, rec.msg, rec.lead_id) == (200, "error", msg, None)


async def test_wrong_api_key(env: Env) -> None:
    assert refused(await env.send(api_key="not-the-key")) == "Неверный api_key"
    assert env.sandbox.leads == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert rec.key_valid is False


async def test_wrong_webmaster_for_the_key(env: Env) -> None:
    assert "id_webmaster" in refused(await env.send(id_webmaster="2002"))
    # The other account's own pair is fine.
    ok(await env.send(api_key=OTHER_KEY, id_webmaster="2002"))
    assert [lead.id_webmaster for lead in env.sandbox.leads] == ["2002"]


async def test_json_body_is_refused(env: Env) -> None:
    r = await env.http.post(SEND_ORDER_PATH, json=lead_form())
    assert "Content-Type" in refused(r)
    assert env.sandbox.leads == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert rec.fields == {}
    assert rec.content_type == "application/json"


@pytest.mark.parametrize(
    ("body", "content_type", "expect"),
    [
        (None, "multipart/form-data; boundary=x", "Content-Type"),
        (None, "text/plain", "Content-Type"),
        (None, FORM_TYPE + "; charset=windows-1251", "UTF-8"),
        ("phone=" + PHONE + "&", FORM_TYPE, "формат"),  # trailing &
        ("a&b", FORM_TYPE, "формат"),
        ("name=Анна", FORM_TYPE, "ASCII"),  # raw UTF-8, not percent-encoded
        ("name=%FF", FORM_TYPE, "name"),  # invalid UTF-8 decodes to U+FFFD
        ("", FORM_TYPE, "api_key"),
    ],
)
async def test_malformed_bodies_are_refused(
    env: Env, body: str | None, content_type: str, expect: str
) -> None:
    if body is None:
        text = str(httpx.QueryParams(lead_form()))
    elif body == "name=%FF":
        text = str(httpx.QueryParams(lead_form(name=None))) + "&" + body
    else:
        text = body
    assert expect in refused(await env.raw(text.encode(), content_type))
    assert env.sandbox.leads == []


async def test_charset_utf8_is_accepted(env: Env) -> None:
    body = str(httpx.QueryParams(lead_form()))
    assert (await env.raw(body, FORM_TYPE + "; charset=UTF-8"))["status"] == "success"


async def test_unencoded_plus_in_phone_is_a_space(env: Env) -> None:
    # A form body's "+" means a space: a relay that does not percent-encode the phone is caught.
    body = str(httpx.QueryParams(lead_form(phone=None))) + "&phone=+79161234567"
    assert "phone" in refused(await env.raw(body))


async def test_field_given_twice_is_refused(env: Env) -> None:
    form: dict[str, Any] = lead_form()
    form["phone"] = [PHONE, PHONE]
    assert refused(await env.send(form)) == "Параметр передан несколько раз: phone"
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert rec.repeated == ["phone"]
    assert rec.fields["phone"] == PHONE


async def test_fields_in_query_string_are_refused(env: Env) -> None:
    r = await env.http.post(SEND_ORDER_PATH, params={"sub_id_1": "1"}, data=lead_form())
    assert "теле запроса" in refused(r)


async def test_wrong_path_and_method_are_recorded(env: Env) -> None:
    r = await env.http.post("/method/sendOrder", data=lead_form())
    assert r.status_code == 404
    r = await env.http.get(SEND_ORDER_PATH, params={"api_key": KEY})
    assert (r.status_code, r.headers["allow"]) == (405, "POST")
    recs = await env.sandbox.wait_for_requests(2, timeout=5)
    assert [(rec.method, rec.path, rec.status) for rec in recs] == [
        ("POST", "/method/sendOrder", 404),
        ("GET", SEND_ORDER_PATH, 405),
    ]
    assert env.sandbox.leads == []


# ---- faults ------------------------------------------------------------------------------------


async def test_http_status_fault_with_retry_after(env: Env) -> None:
    await env.fault(mode="http_status", status=429, retry_after=30, times=1)
    r = await env.send()
    assert (r.status_code, r.headers["retry-after"]) == (429, "30")
    assert env.sandbox.leads == []
    ok(await env.send())  # once only


async def test_http_status_fault_with_json_body(env: Env) -> None:
    await env.fault(mode="http_status", status=503, body={"status": "error", "msg": "maintenance"})
    r = await env.send()
    assert (r.status_code, r.json()) == (503, {"status": "error", "msg": "maintenance"})


async def test_error_msg_fault_answers_200_without_storing(env: Env) -> None:
    await env.fault(mode="error_msg", msg="Сервис временно недоступен", times=2)
    for _ in range(2):
        assert refused(await env.send()) == "Сервис временно недоступен"
    assert env.sandbox.leads == []
    recs = await env.sandbox.wait_for_requests(2, timeout=5)
    assert [(r.status_field, r.msg, r.fault and r.fault["mode"]) for r in recs] == [
        ("error", "Сервис временно недоступен", "error_msg")
    ] * 2
    assert ok(await env.send()) == 1


async def test_drop_fault_closes_connection_without_answer(env: Env) -> None:
    await env.fault(mode="drop", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await env.send()
    assert env.sandbox.leads == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.outcome, rec.status) == ("dropped", None)
    ok(await env.send())


async def test_delay_fault_answers_late_and_stores_the_lead(env: Env) -> None:
    await env.fault(mode="delay", seconds=0.3, times=1)
    # The client gives up, yet the lead is stored: the ambiguous outcome a relay must survive.
    with pytest.raises(httpx.ReadTimeout):
        await env.http.post(SEND_ORDER_PATH, data=lead_form(), timeout=0.1)
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.status, rec.status_field, rec.lead_id) == (200, "success", 1)
    assert rec.duration_ms is not None
    assert rec.duration_ms >= 300
    assert len(env.sandbox.leads) == 1
    started = time.perf_counter()
    ok(await env.send())
    assert time.perf_counter() - started < 0.3


async def test_match_filter_aims_at_one_lead(env: Env) -> None:
    await env.fault(mode="error_msg", msg="Лид отклонён", match={"sub_id_1": "42"})
    ok(await env.send(sub_id_1="41"))
    ok(await env.send())
    assert refused(await env.send(sub_id_1="42")) == "Лид отклонён"
    assert await env.control("faults") == []
    ok(await env.send(sub_id_1="42"))
    assert [lead.sub_id_1 for lead in env.sandbox.leads] == ["41", None, "42"]


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "error_msg"},
        {"mode": "error_msg", "msg": ""},
        {"mode": "drop", "msg": "x"},
        {"mode": "error_msg", "msg": "x", "match": {"api_key": KEY}},
        {"mode": "error_msg", "msg": "x", "match": {"sub_id1": "42"}},
        {"mode": "teapot"},
    ],
)
async def test_invalid_fault_specs_are_refused(env: Env, spec: dict[str, Any]) -> None:
    r = await env.http.post("/_sandbox/faults", json=spec)
    assert r.status_code == 422, r.text
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError
        FaultSpec.model_validate(spec)


# ---- control -----------------------------------------------------------------------------------


async def test_api_key_never_appears_in_control_routes(env: Env) -> None:
    ok(await env.send())
    refused(await env.send(api_key=OTHER_KEY))  # wrong webmaster for that key
    refused(await env.send(api_key="wrong-key-secret"))
    form: dict[str, Any] = lead_form()
    form["api_key"] = [KEY, KEY]
    refused(await env.send(form))
    await env.sandbox.wait_for_requests(4, timeout=5)
    for what in ("requests", "leads"):
        text = (await env.http.get(f"/_sandbox/{what}")).text
        for secret in (KEY, OTHER_KEY, "wrong-key-secret"):
            assert secret not in text
    requests = await env.control("requests")
    assert [r["key_valid"] for r in requests] == [True, True, False, True]
    assert all("api_key" not in r["fields"] for r in requests)
    assert requests[3]["repeated"] == ["api_key"]


async def test_reset_forgets_leads_requests_and_faults(env: Env) -> None:
    ok(await env.send())
    ok(await env.send())
    await env.fault(mode="http_status", status=500)
    assert (await env.http.post("/_sandbox/reset")).json() == {"ok": True}
    assert await env.control("leads") == []
    assert await env.control("requests") == []
    assert await env.control("faults") == []
    assert ok(await env.send()) == 1  # the lead ids restart
