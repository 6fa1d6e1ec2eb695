"""The Plarin postback sandbox over real HTTP: uvicorn on 127.0.0.1, httpx as the client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from services.sandbox.plarin import (
    MASK,
    MAX_QUERY_BYTES,
    POSTBACK_PATH,
    FaultSpec,
    PlarinSandbox,
    create_plarin_app,
)

TOKEN = "plarin-secret-token-0123456789"

ServeApp = Callable[[Any], AbstractAsyncContextManager[str]]


def conversion(**over: str | None) -> dict[str, str]:
    """A valid postback's parameters; a keyword replaces one, None removes it."""
    params = {
        "click_id": "yclid-8123456789",
        "event": "visit_paid",
        "value": "1500.50",
        "currency": "RUB",
        "event_id": "appt-77-paid",
        "client_id": "4242",
        "ts": "1700000000",
    }
    for name, value in over.items():
        if value is None:
            params.pop(name, None)
        else:
            params[name] = value
    return params


@dataclass
class Env:
    sandbox: PlarinSandbox
    http: httpx.AsyncClient

    async def send(self, params: dict[str, str] | None = None, /, **over: str | None) -> httpx.Response:
        """GET the postback with httpx's own URL encoding."""
        return await self.http.get(POSTBACK_PATH, params=params if params is not None else conversion(**over))

    async def raw(self, target: str | bytes, method: str = "GET") -> httpx.Response:
        """Send ``target`` (path and query) byte for byte, with no client-side normalization."""
        raw = target.encode() if isinstance(target, str) else target
        request = self.http.build_request(method, "/", extensions={"target": raw})
        return await self.http.send(request)

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
    # One server and client for the module (no token): reset per test.
    sandbox = PlarinSandbox()
    async with (
        app_server(create_plarin_app(state=sandbox)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield Env(sandbox, http)


@pytest.fixture(scope="module")
async def served_token(app_server: ServeApp) -> AsyncIterator[Env]:
    sandbox = PlarinSandbox()
    async with (
        app_server(create_plarin_app(TOKEN, sandbox)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=10) as http,
    ):
        yield Env(sandbox, http)


@pytest.fixture
def env(served: Env) -> Iterator[Env]:
    served.sandbox.reset()
    yield served
    served.sandbox.reset()


@pytest.fixture
def tenv(served_token: Env) -> Iterator[Env]:
    served_token.sandbox.reset()
    yield served_token
    served_token.sandbox.reset()


def ok(r: httpx.Response) -> int:
    """The postback id of an accepted postback."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["status"] == "ok", body
    assert set(body) == {"status", "id"}
    assert isinstance(body["id"], int)
    return body["id"]


def refused(r: httpx.Response, status: int = 400) -> str:
    """The message of a refusal."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"status", "message"}
    assert body["status"] == "error"
    assert isinstance(body["message"], str)
    assert body["message"]
    return body["message"]


# ---- accepted ----------------------------------------------------------------------------------


async def test_postback_is_recorded_with_decoded_values(env: Env) -> None:
    params = conversion(click_id="клик 42/α", event="Визит оплачен", client_id="a&b=c")
    assert ok(await env.send(params)) == 1
    [pb] = env.sandbox.postbacks
    assert (pb.id, pb.path) == (1, POSTBACK_PATH)
    assert pb.params == params
    assert list(pb.params) == list(params)  # in the order sent
    assert pb.received_at > 0
    assert "%D0%BA%D0%BB" in pb.raw_query  # Cyrillic arrived percent-encoded
    [listed] = await env.control("postbacks")
    assert listed["params"] == params
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.method, rec.path, rec.status, rec.postback_id, rec.message) == (
        "GET",
        POSTBACK_PATH,
        200,
        1,
        None,
    )
    assert rec.query == tuple(params.items())
    assert rec.raw_query == pb.raw_query
    assert rec.token_ok is None
    [logged] = await env.control("requests")
    assert logged["query"] == [list(p) for p in params.items()]


async def test_plus_and_percent20_both_decode_to_a_space(env: Env) -> None:
    ok(await env.raw(POSTBACK_PATH + "?click_id=a+b%20c&event=%D0%92%D0%B8%D0%B7%D0%B8%D1%82+%E2%84%962"))
    assert env.sandbox.postbacks[0].params == {"click_id": "a b c", "event": "Визит №2"}
    assert (
        env.sandbox.postbacks[0].raw_query
        == "click_id=a+b%20c&event=%D0%92%D0%B8%D0%B7%D0%B8%D1%82+%E2%84%962"
    )


@pytest.mark.parametrize(
    "over",
    [
        {"value": "0", "currency": "USD"},
        {"value": "1500"},
        {"value": "0.5"},
        {"value": "999999999999.99"},
        {"ts": "1700000000123"},  # milliseconds
        {"ts": "2024-01-31T10:00:00Z"},
        {"ts": "2024-01-31T10:00:00.123456+03:00"},  # httpx encodes + as %2B
        {"ts": "2024-02-29T23:59-05:00"},
        {"value": None, "currency": None, "ts": None, "event": None, "event_id": None, "client_id": None},
        {"utm_source": "klientiks", "sub": "x y"},  # the cabinet's own parameters
        {"click_id": "Ab-_.~!*'()[]:@/?;,$"},
    ],
)
async def test_valid_variants_are_accepted(env: Env, over: dict[str, str | None]) -> None:
    params = conversion(**over)
    ok(await env.send(params))
    assert env.sandbox.postbacks[0].params == params


@pytest.mark.parametrize("path", ["/postback/acc-42", "/postback/", "/postback/a/b%20c"])
async def test_paths_under_postback(env: Env, path: str) -> None:
    r = await env.http.get(path, params=conversion())
    ok(r)
    assert env.sandbox.postbacks[0].path == path.replace("%20", " ")


async def test_duplicates_are_accepted_and_all_recorded(env: Env) -> None:
    assert ok(await env.send()) == 1
    assert ok(await env.send()) == 2
    ok(await env.send(event_id="other"))
    assert [pb.params["event_id"] for pb in env.sandbox.postbacks] == ["appt-77-paid"] * 2 + ["other"]
    assert len(await env.control("postbacks")) == 3
    same = await env.control("postbacks?event_id=appt-77-paid")
    assert [p["id"] for p in same] == [1, 2]


async def test_required_is_configurable(app_server: ServeApp) -> None:
    for required, params, status in [
        (("click_id", "event_id"), conversion(event_id=None), 400),
        (("click_id", "event_id"), conversion(), 200),
        ((), {"event": "lead"}, 200),
        ((), {}, 200),
    ]:
        sandbox = PlarinSandbox()
        async with (
            app_server(create_plarin_app(state=sandbox, required=required)) as base_url,
            httpx.AsyncClient(base_url=base_url) as http,
        ):
            r = await http.get(POSTBACK_PATH, params=params)
        assert r.status_code == status, (required, r.text)
        if status == 400:
            assert refused(r) == "missing required parameter: event_id"
        assert len(sandbox.postbacks) == (status == 200)


# ---- refused -----------------------------------------------------------------------------------

_Q = "click_id=abc"  # a valid start for raw queries

_REFUSED: list[tuple[str, str]] = [
    # syntax
    (_Q + "&click_id=abc", "parameter given more than once: click_id"),
    (_Q + "&event=a&event=b", "more than once: event"),
    (_Q + "&&event=a", "malformed query string"),
    (_Q + "&", "malformed query string"),
    (_Q + "&event", "without '='"),
    (_Q + "&=x", "without a name"),
    (_Q + "&event=a=b", "unencoded '='"),
    (_Q + "&event=a%zz", "percent-encoding"),
    (_Q + "&event=a%4", "percent-encoding"),
    # empty values
    ("click_id=", "empty value of parameter: click_id"),
    (_Q + "&currency=", "empty value of parameter: currency"),
    # control and format characters, U+FFFD, lone surrogates
    ("click_id=a%00b", "invalid character"),
    ("click_id=a%0Ab", "invalid character"),
    ("click_id=a%7Fb", "invalid character"),
    ("click_id=a%E2%80%8Bb", "invalid character"),  # zero-width space (Cf)
    ("click_id=a%E2%80%A8b", "invalid character"),  # line separator (Zl)
    ("click_id=a%EF%BF%BD", "invalid character"),  # U+FFFD itself
    ("click_id=a%FF", "invalid character"),  # invalid UTF-8 -> lone surrogate
    ("click_id=%D0", "invalid character"),  # a cut UTF-8 sequence
    ("click_id=%ED%A0%80", "invalid character"),  # an encoded surrogate
    ("click_id=%C0%AF", "invalid character"),  # an overlong encoding
    ("click_id=abc&ev%FFent=x", "invalid character in parameter name"),
    # edge whitespace (a + is a space)
    ("click_id=%20abc", "whitespace"),
    ("click_id=abc+", "whitespace"),
    ("click_id=abc%09", "invalid character"),  # a tab is Cc
    ("click_id=abc%C2%A0", "whitespace"),  # no-break space
    # unrendered macros
    ("click_id={click_id}", "unrendered macro in the value of parameter click_id"),
    ("click_id=%7Bclick_id%7D", "unrendered macro"),
    ("click_id=%7bclick_id%7d", "unrendered macro"),
    ("click_id=x-{name}-y", "unrendered macro"),
    ("click_id={{click_id}}", "unrendered macro"),
    ("click_id={}", "unrendered macro"),
    ("click_id=%257Bclick_id%257D", "unrendered macro"),  # double-encoded
    (_Q + "&event={event}", "unrendered macro in the value of parameter event"),
    # required
    ("event=lead", "missing required parameter: click_id"),
    ("", "missing required parameter: click_id"),
    # value
    *(
        (f"{_Q}&value={v}", "invalid value")
        for v in [
            "-1",
            "1.505",
            "1%2C50",
            "abc",
            "1e3",
            "01",
            ".5",
            "1.",
            "%2B1",
            "%EF%BC%91",
            "1000000000000",
            "NaN",
            "1_000",
        ]
    ),
    # currency
    *(
        (f"{_Q}&currency={c}", "invalid currency")
        for c in ["rub", "RU", "RUBL", "R1B", "%D0%A0%D0%A3%D0%91", "Rub"]
    ),
    # ts
    *(
        (f"{_Q}&ts={t}", "invalid ts")
        for t in [
            "17000",
            "0700000000",
            "17000000001",  # 11 digits: neither seconds nor milliseconds
            "1700000000.5",
            "2024-01-01",
            "2024-01-01T10:00:00",  # no offset
            "2024-13-01T10:00:00Z",
            "2024-02-30T10:00Z",
            "2024-01-01T25:00:00Z",
            "2024-01-01T10:00:00+03:00",  # a raw + is a space
            "2024-01-01+10:00:00Z",
            "2024-01-01t10:00:00z",
            "20240101T100000Z",
            "2024-01-01T10:00:00%2B0300",
        ]
    ),
]


@pytest.mark.parametrize(("query", "expect"), _REFUSED, ids=[q for q, _ in _REFUSED])
async def test_invalid_postbacks_are_refused_and_not_stored(env: Env, query: str, expect: str) -> None:
    message = refused(await env.raw(POSTBACK_PATH + ("?" + query if query else "")))
    assert expect in message
    assert env.sandbox.postbacks == []
    assert await env.control("postbacks") == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.status, rec.message, rec.postback_id) == (400, message, None)


async def test_non_ascii_request_target_is_refused(env: Env) -> None:
    # httpx refuses to send raw non-ASCII in a request target, a plain socket does not; uvicorn answers it.
    url = httpx.URL(str(env.http.base_url))
    assert url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        target = "/postback?click_id=клик".encode()
        writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\n\r\n")
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert env.sandbox.postbacks == []
    # A direct caller (or a laxer server) reaches the sandbox's own rule.
    status, reply = env.sandbox.receive(POSTBACK_PATH, "click_id=клик".encode())
    assert status == 400
    assert "ASCII" in reply["message"]
    assert env.sandbox.postbacks == []


async def test_undecodable_values_are_logged_readably(env: Env) -> None:
    refused(await env.raw(POSTBACK_PATH + "?click_id=%D0%BA%FF&x=%ED%A0%80"))
    [logged] = await env.control("requests")  # JSON-serializable despite the bad bytes
    assert logged["query"] == [["click_id", "к\\xff"], ["x", "\\xed\\xa0\\x80"]]
    assert logged["raw_query"] == "click_id=%D0%BA%FF&x=%ED%A0%80"


@pytest.mark.parametrize(
    ("path", "expect"),
    [
        ("/postback/%7Baccount_id%7D", "unrendered macro in the path"),
        ("/postback/{account_id}", "unrendered macro in the path"),
        ("/postback/a%00b", "invalid character in the path"),
        ("/postback/a%FF", "invalid character in the path"),
    ],
)
async def test_invalid_path_is_refused(env: Env, path: str, expect: str) -> None:
    assert refused(await env.raw(f"{path}?{_Q}")) == expect
    assert env.sandbox.postbacks == []


async def test_get_with_a_body_is_refused(env: Env) -> None:
    r = await env.http.request("GET", POSTBACK_PATH, params=conversion(), content=b"click_id=abc")
    assert "no body" in refused(r)
    assert env.sandbox.postbacks == []


async def test_too_long_query_answers_414(env: Env) -> None:
    r = await env.send(conversion(click_id="x" * MAX_QUERY_BYTES))
    assert r.status_code == 414
    assert "414" in r.text
    assert env.sandbox.postbacks == []


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
async def test_other_methods_answer_405(env: Env, method: str) -> None:
    r = await env.http.request(method, POSTBACK_PATH, params=conversion())
    assert (r.status_code, r.headers["allow"]) == (405, "GET")
    if method != "HEAD":
        assert refused(r, 405) == "method not allowed"
    assert env.sandbox.postbacks == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.method, rec.status) == (method, 405)


async def test_wrong_path_is_recorded_as_404(env: Env) -> None:
    r = await env.http.get("/postbacks", params=conversion())
    assert r.status_code == 404
    assert (await env.http.get("/_sandbox/nope")).status_code == 404  # a control typo: not recorded
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.path, rec.status) == ("/postbacks", 404)
    assert env.sandbox.postbacks == []


# ---- token -------------------------------------------------------------------------------------


async def test_token_required_when_configured(tenv: Env) -> None:
    assert refused(await tenv.send(), 403) == "invalid token"
    assert refused(await tenv.send(token="wrong-token"), 403) == "invalid token"
    assert refused(await tenv.send(token=TOKEN + "x"), 403) == "invalid token"
    assert refused(await tenv.send(token=""), 403) == "invalid token"
    assert refused(await tenv.send(Token=TOKEN), 403) == "invalid token"  # names are case-sensitive
    assert tenv.sandbox.postbacks == []
    assert ok(await tenv.send(token=TOKEN)) == 1
    # The token is checked before the value rules, after the syntax and repeated names.
    assert refused(await tenv.send(token="wrong", value="-1"), 403) == "invalid token"
    assert "invalid value" in refused(await tenv.send(token=TOKEN, value="-1"))
    r = await tenv.raw(f"{POSTBACK_PATH}?{_Q}&token={TOKEN}&token={TOKEN}")
    assert refused(r) == "parameter given more than once: token"
    recs = await tenv.sandbox.wait_for_requests(9, timeout=5)
    assert [rec.token_ok for rec in recs] == [False] * 5 + [True, False, True, False]
    assert len(tenv.sandbox.postbacks) == 1


async def test_token_value_is_never_shown(tenv: Env) -> None:
    ok(await tenv.send(token=TOKEN))
    refused(await tenv.send(token="wrong-secret-value"), 403)
    refused(await tenv.raw(f"{POSTBACK_PATH}?{_Q}&token={TOKEN}&token={TOKEN}"))
    refused(await tenv.raw(f"{POSTBACK_PATH}?{_Q}&token={TOKEN}%FF"), 403)
    await tenv.sandbox.wait_for_requests(4, timeout=5)
    [pb] = tenv.sandbox.postbacks
    assert pb.params["token"] == MASK
    assert pb.raw_query.endswith(f"&token={MASK}")
    for rec in tenv.sandbox.requests:
        assert ("token", MASK) in rec.query
        assert TOKEN not in repr(rec)
        assert "wrong-secret-value" not in repr(rec)
    for what in ("requests", "postbacks"):
        text = (await tenv.http.get(f"/_sandbox/{what}")).text
        assert TOKEN not in text
        assert "wrong-secret-value" not in text
        assert MASK in text


async def test_token_param_is_masked_even_without_a_configured_token(env: Env) -> None:
    ok(await env.send(token="some-key", TOKEN="other-key"))
    [pb] = env.sandbox.postbacks
    assert (pb.params["token"], pb.params["TOKEN"]) == (MASK, MASK)
    assert "some-key" not in (await env.http.get("/_sandbox/requests")).text


@pytest.mark.parametrize("token", ["", " padded"])
def test_bad_token_configuration_is_refused(token: str) -> None:
    with pytest.raises(ValueError, match="token"):
        create_plarin_app(token)


# ---- faults ------------------------------------------------------------------------------------


async def test_429_fault_with_retry_after(env: Env) -> None:
    await env.fault(mode="http_status", status=429, retry_after=30, times=1)
    r = await env.send()
    assert (r.status_code, r.headers["retry-after"]) == (429, "30")
    assert env.sandbox.postbacks == []
    assert ok(await env.send()) == 1  # once only


async def test_503_fault_with_and_without_json_body(env: Env) -> None:
    await env.fault(mode="http_status", status=503, times=1)
    await env.fault(mode="http_status", status=503, body={"status": "error", "message": "maintenance"})
    r = await env.send()
    assert (r.status_code, r.headers["content-type"].split(";")[0]) == (503, "text/html")
    assert "nginx" in r.text
    r = await env.send()
    assert (r.status_code, r.json()) == (503, {"status": "error", "message": "maintenance"})
    assert env.sandbox.postbacks == []
    ok(await env.send())


async def test_drop_fault_closes_the_connection(env: Env) -> None:
    await env.fault(mode="drop", times=1)
    with pytest.raises(httpx.RemoteProtocolError):
        await env.send()
    assert env.sandbox.postbacks == []
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.outcome, rec.status) == ("dropped", None)
    ok(await env.send())


async def test_delay_fault_answers_late_and_stores_the_postback(env: Env) -> None:
    await env.fault(mode="delay", seconds=0.3, times=1)
    # The client gives up, yet the postback is stored: a retry will make a duplicate.
    with pytest.raises(httpx.ReadTimeout):
        await env.http.get(POSTBACK_PATH, params=conversion(), timeout=0.1)
    [rec] = await env.sandbox.wait_for_requests(1, timeout=5)
    assert (rec.status, rec.postback_id) == (200, 1)
    assert rec.duration_ms is not None
    assert rec.duration_ms >= 300
    started = time.perf_counter()
    assert ok(await env.send()) == 2
    assert time.perf_counter() - started < 0.3
    assert len(env.sandbox.postbacks) == 2


async def test_match_filter_aims_at_one_click(env: Env) -> None:
    await env.fault(mode="http_status", status=500, match={"click_id": "abc", "event": "visit_paid"})
    ok(await env.send(click_id="abd"))
    ok(await env.send(click_id="abc", event="lead"))
    assert (await env.send(click_id="abc")).status_code == 500
    assert await env.control("faults") == []
    ok(await env.send(click_id="abc"))
    assert [pb.params["click_id"] for pb in env.sandbox.postbacks] == ["abd", "abc", "abc"]


async def test_path_filter_aims_at_one_cabinet_path(env: Env) -> None:
    await env.fault(mode="http_status", status=502, path="/postback/acc-2", times=2)
    ok(await env.http.get("/postback/acc-1", params=conversion()))
    assert (await env.http.get("/postback/acc-2", params=conversion())).status_code == 502
    assert [r["path"] for r in await env.control("requests?path=/postback/acc-2")] == ["/postback/acc-2"]


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "http_status", "status": 500, "match": {"token": TOKEN}},
        {"mode": "http_status", "status": 500, "match": {"Token": "x"}},
        {"mode": "http_status"},
        {"mode": "drop", "status": 500},
        {"mode": "teapot"},
    ],
)
async def test_invalid_fault_specs_are_refused(env: Env, spec: dict[str, Any]) -> None:
    r = await env.http.post("/_sandbox/faults", json=spec)
    assert r.status_code == 422, r.text
    with pytest.raises(ValueError):  # noqa: PT011 - pydantic's ValidationError
        FaultSpec.model_validate(spec)


# ---- control -----------------------------------------------------------------------------------


async def test_reset_forgets_postbacks_requests_and_faults(env: Env) -> None:
    ok(await env.send())
    ok(await env.send())
    await env.fault(mode="http_status", status=500)
    assert (await env.http.post("/_sandbox/reset")).json() == {"ok": True}
    assert env.sandbox.postbacks == []
    assert await env.control("postbacks") == []
    assert await env.control("requests") == []
    assert await env.control("faults") == []
    assert ok(await env.send()) == 1  # the ids restart
