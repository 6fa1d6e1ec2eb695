"""The Klientiks API client against the Klientiks sandbox served over real HTTP (uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import traceback
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import structlog
from pydantic import SecretStr

from services.common.config import KlientiksApi, Settings
from services.common.events import Appointment, CloudEvent, EventData, EventName, source_uri
from services.common.logging import configure_logging
from services.common.metrics import KLIENTIKS_REQUESTS
from services.ingest.enrichment import enrich, enriched_key, needs_enrichment
from services.ingest.klientiks import (
    KlientiksApiClient,
    KlientiksApis,
    KlientiksError,
    RateLimiter,
    classify,
)
from services.sandbox.klientiks import KlientiksSandbox, SandboxAccount, create_klientiks_sandbox
from tests.support import free_port, serve_app

MSK = ZoneInfo("Europe/Moscow")
TOKEN = "kl-access-token-7f3a9c1e5b2d"
# Arrival times are taken by the server in the same event loop as the client: allow some scheduling noise.
JITTER = 0.03
_accounts = itertools.count(int(time.time()) % 100000 * 100)


@dataclass
class Env:
    sandbox: KlientiksSandbox
    base_url: str
    account: SandboxAccount
    http: httpx.AsyncClient
    clients: list[KlientiksApiClient] = field(default_factory=list)

    def api(
        self, *, rate: float = 50.0, token: str | None = None, account: str | None = None
    ) -> KlientiksApi:
        return KlientiksApi(
            account_id=account or self.account.account_id,
            user_id=self.account.user_id,
            access_token=SecretStr(token or self.account.access_token),
            base_url=f"{self.base_url}/clientix/Restapi",
            rate_limit_per_s=rate,
        )

    def client(self, *, rate: float = 50.0, token: str | None = None, **options: Any) -> KlientiksApiClient:
        options = {"backoff_s": 0.01, "timeout_s": 2.0, **options}
        c = KlientiksApiClient(self.api(rate=rate, token=token), **options)
        self.clients.append(c)
        return c

    async def fault(self, **spec: Any) -> None:
        r = await self.http.post("/_sandbox/faults", json=spec)
        assert r.status_code == 201, r.text

    async def log(self, account: str | None = None) -> list[dict[str, Any]]:
        """The sandbox's request log of the account, from its control endpoint."""
        r = await self.http.get("/_sandbox/requests", params={"account": account or self.account.account_id})
        return r.json()  # type: ignore[no-any-return]

    def first(self) -> tuple[dict[str, Any], dict[str, Any]]:
        appt = next(iter(self.sandbox.appointments.values()))
        return appt, self.sandbox.clients[appt["client_id"]]


def new_account() -> SandboxAccount:
    # The rate limiter is per account and process-wide: every test gets an account of its own.
    return SandboxAccount(str(next(_accounts)), "113421", TOKEN)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    account = new_account()
    app = create_klientiks_sandbox([account], seed=5)
    async with serve_app(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        e = Env(app.state.sandbox, url, account, http)
        try:
            yield e
        finally:
            for c in e.clients:
                await c.aclose()


def gaps(log: list[dict[str, Any]]) -> list[float]:
    times = sorted(r["time"] for r in log)
    return [b - a for a, b in itertools.pairwise(times)]


def counted(action: str, outcome: str) -> float:
    return KLIENTIKS_REQUESTS.labels(action, outcome)._value.get()  # type: ignore[no-any-return]


# ---- reads ---------------------------------------------------------------------------------------------


async def test_fetches_an_appointment_and_its_client(env: Env) -> None:
    appt, client = env.first()
    api = env.client()
    found = await api.get_appointment(str(appt["id"]))
    assert found is not None
    assert found["id"] == appt["id"]
    assert found["start_datetime"] == appt["start_datetime"]
    assert found["appointment_client_links"][0]["client"]["phone"] == client["phone"]
    by_phone = await api.get_client(phone="+" + client["phone"])
    assert by_phone is not None
    assert by_phone["id"] == client["id"]
    both = await api.get_client(phone=client["phone"], client_id=str(client["id"]))
    assert both == by_phone


async def test_client_by_id_is_found_among_recent_changes(env: Env) -> None:
    api = env.client()
    added = env.sandbox.add_client(
        {"phone": "+7 916 555-44-33", "first_name": "Дарья", "second_name": "Попова"}
    )
    found = await api.get_client(client_id=str(added["id"]))
    assert found is not None
    assert found["phone"] == "79165554433"
    _, old = env.first()
    # An old client is outside the default window (since yesterday) ...
    assert await api.get_client(client_id=str(old["id"])) is None
    # ... and inside a wider one.
    wide = await api.get_client(client_id=str(old["id"]), changed_since=date(2000, 1, 1))
    assert wide is not None
    assert wide["id"] == old["id"]


async def test_client_id_scan_pages_and_stops(env: Env) -> None:
    api = env.client(page_size=5, max_scan_pages=2)
    last = max(env.sandbox.clients.values(), key=lambda c: (c["modified"], c["id"]))
    assert await api.get_client(client_id=str(last["id"]), changed_since=date(2000, 1, 1)) is None
    log = await env.log()
    assert [(r["action"], r["params"]["offset"]) for r in log] == [("clients", "0"), ("clients", "5")]


async def test_not_found_is_none(env: Env) -> None:
    api = env.client()
    assert await api.get_appointment("1") is None
    assert await api.get_client(phone="+79990000000") is None
    appt, _ = env.first()
    await env.fault(mode="http_status", status=404, body={"status": "error", "messages": ["Not found"]})
    assert await api.get_appointment(str(appt["id"])) is None
    assert len(await env.log()) == 3  # nothing retried


async def test_invalid_arguments_never_reach_the_network(env: Env) -> None:
    api = env.client()
    for bad in ("../../list", "12 34", ""):
        with pytest.raises(KlientiksError) as e:
            await api.get_appointment(bad)
        assert (e.value.reason, e.value.retryable) == ("invalid_argument", False)
    with pytest.raises(KlientiksError):
        await api.get_client(phone="12")
    with pytest.raises(ValueError, match="client_id, phone"):
        await api.get_client()
    assert await env.log() == []


# ---- retries -------------------------------------------------------------------------------------------


async def test_5xx_then_success_is_retried(env: Env) -> None:
    appt, _ = env.first()
    await env.fault(mode="http_status", status=502, times=2)
    found = await env.client().get_appointment(str(appt["id"]))
    assert found is not None
    assert found["id"] == appt["id"]
    assert [r["status"] for r in await env.log()] == [502, 502, 200]


async def test_persistent_5xx_is_retryable_after_max_attempts(env: Env) -> None:
    await env.fault(mode="http_status", status=503, probability=1.0)
    with pytest.raises(KlientiksError) as e:
        await env.client(max_attempts=3).get_appointment("5833264")
    assert (e.value.reason, e.value.retryable, e.value.status) == ("server_error", True, 503)
    assert len(await env.log()) == 3


async def test_timeout_is_retried(env: Env) -> None:
    appt, _ = env.first()
    await env.fault(mode="delay", seconds=1.0)
    started = time.monotonic()
    found = await env.client(timeout_s=0.2).get_appointment(str(appt["id"]))
    assert found is not None
    assert time.monotonic() - started < 1.0
    assert len(await env.log()) == 2


async def test_network_error_is_retryable_after_max_attempts() -> None:
    api = KlientiksApi(
        account_id=new_account().account_id,
        user_id="1",
        access_token=SecretStr(TOKEN),
        base_url=f"http://127.0.0.1:{free_port()}/clientix/Restapi",
        rate_limit_per_s=50,
    )
    before = counted("getAppointment", "network") + counted("getAppointment", "timeout")
    client = KlientiksApiClient(api, max_attempts=2, backoff_s=0.01, timeout_s=1)
    try:
        with pytest.raises(KlientiksError) as e:
            await client.get_appointment("5833264")
    finally:
        await client.aclose()
    assert e.value.retryable
    assert e.value.reason in ("network", "timeout")
    assert counted("getAppointment", "network") + counted("getAppointment", "timeout") == before + 2


async def test_429_retry_after_is_honoured(env: Env) -> None:
    appt, _ = env.first()
    await env.fault(mode="http_status", status=429, retry_after=1)
    found = await env.client().get_appointment(str(appt["id"]))
    assert found is not None
    log = await env.log()
    assert [r["status"] for r in log] == [429, 200]
    assert log[1]["time"] - log[0]["time"] >= 1.0 - JITTER


async def test_server_rate_limit_is_waited_out_by_every_client_of_the_account(env: Env) -> None:
    # The sandbox allows 2/s; the clients believe 20/s. Without honouring Retry-After (and sharing it
    # across the account) six attempts 50 ms apart could never get three requests through.
    r = await env.http.post("/_sandbox/rate-limit", json={"per_s": 2, "burst": 1})
    assert r.status_code == 200
    ids = [str(a) for a in list(env.sandbox.appointments)[:3]]
    one, two = env.client(rate=20, max_attempts=6), env.client(rate=20, max_attempts=6)
    found = await asyncio.gather(*(c.get_appointment(i) for c, i in zip([one, two, one], ids, strict=True)))
    assert [f["id"] if f else None for f in found] == [int(i) for i in ids]
    log = await env.log()
    assert any(r["status"] == 429 for r in log)
    assert sum(r["status"] == 200 for r in log) == 3


@pytest.mark.parametrize("failure", ["login_page", "401"])
async def test_bad_credentials_are_permanent_without_retries(env: Env, failure: Any) -> None:
    env.sandbox.auth_failure = failure
    with pytest.raises(KlientiksError) as e:
        await env.client(token="not-the-token-0000").get_appointment("5833264")
    assert (e.value.reason, e.value.retryable) == ("unauthorized", False)
    assert e.value.status == (200 if failure == "login_page" else 401)
    assert len(await env.log()) == 1


# ---- rate limit ------------------------------------------------------------------------------------------


async def test_one_client_stays_under_its_rate(env: Env) -> None:
    appt, _ = env.first()
    api = env.client(rate=10)
    started = time.monotonic()
    for _ in range(6):
        await api.get_appointment(str(appt["id"]))
    assert time.monotonic() - started >= 0.5 - JITTER
    assert min(gaps(await env.log())) >= 0.1 - JITTER


async def test_two_clients_of_one_account_share_the_rate(env: Env) -> None:
    appt, _ = env.first()
    one, two = env.client(rate=10), env.client(rate=10)
    # A third client of another account is not held back by them.
    other_account = new_account()
    env.sandbox.accounts = (*env.sandbox.accounts, other_account)
    other = KlientiksApiClient(env.api(rate=10, account=other_account.account_id), backoff_s=0.01)
    env.clients.append(other)

    async def burst(c: KlientiksApiClient, n: int) -> float:
        for _ in range(n):
            await c.get_appointment(str(appt["id"]))
        return time.monotonic()

    started = time.monotonic()
    done = await asyncio.gather(burst(one, 5), burst(two, 5), burst(other, 2))
    log = await env.log()
    assert len(log) == 10
    assert min(gaps(log)) >= 0.1 - JITTER
    assert max(done[:2]) - started >= 0.9 - JITTER
    assert done[2] - started < 0.5
    assert len(await env.log(other_account.account_id)) == 2


async def test_retries_count_against_the_rate(env: Env) -> None:
    appt, _ = env.first()
    await env.fault(mode="http_status", status=500, times=3)
    assert await env.client(rate=10, backoff_s=0.001).get_appointment(str(appt["id"])) is not None
    log = await env.log()
    assert [r["status"] for r in log] == [500, 500, 500, 200]
    assert min(gaps(log)) >= 0.1 - JITTER


async def test_rate_limiter_gives_distinct_slots() -> None:
    limiter = RateLimiter(20)
    # What each caller waited from (almost) the same start: its slot, free of wake-up jitter.
    waited = sorted(await asyncio.gather(*(limiter.acquire() for _ in range(6))))
    assert waited[0] < 0.005
    assert min(b - a for a, b in itertools.pairwise(waited)) >= 0.05 - 0.005
    limiter.hold(0.2)
    held = time.monotonic()
    await limiter.acquire()
    assert time.monotonic() - held >= 0.2 - 0.005


# ---- secrets ---------------------------------------------------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[None]:
    """configure_logging(DEBUG, json) for one test, undone afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    configure_logging("DEBUG", "json")
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


async def test_the_token_never_leaks(
    env: Env, json_logs: None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[KlientiksError] = []

    async def failing(client: KlientiksApiClient, **fault: Any) -> None:
        await env.http.delete("/_sandbox/faults")
        if fault:
            await env.fault(**fault)
        try:
            await client.get_appointment("5833264")
        except KlientiksError as e:
            errors.append(e)

    await failing(env.client(token=TOKEN + "-wrong"))
    await failing(env.client(max_attempts=2), mode="http_status", status=500, probability=1.0)
    await failing(env.client(max_attempts=2, timeout_s=0.1), mode="delay", seconds=0.5, probability=1.0)
    dead = KlientiksApi(
        account_id=new_account().account_id,
        user_id="1",
        access_token=SecretStr(TOKEN),
        base_url=f"http://127.0.0.1:{free_port()}/clientix/Restapi",
    )
    dead_client = KlientiksApiClient(dead, max_attempts=2, backoff_s=0.01, timeout_s=1)
    env.clients.append(dead_client)
    await failing(dead_client)

    assert [e.reason for e in errors] == ["unauthorized", "server_error", "timeout", errors[3].reason]
    for e in errors:
        assert e.__cause__ is None
        assert e.__context__ is None
        text = "".join(traceback.format_exception(e)) + repr(e) + str(e.args)
        assert TOKEN not in text
        assert "/t/" not in text
    out = capsys.readouterr()
    logged = out.err + out.out + caplog.text
    assert "klientiks request failed" in logged
    assert "getAppointment" in logged
    assert TOKEN not in logged
    assert TOKEN not in repr(dead_client)


# ---- the registry --------------------------------------------------------------------------------------


async def test_registry_from_settings_shares_the_account_limit() -> None:
    account = new_account().account_id
    creds = {"account_id": account, "user_id": "1", "access_token": TOKEN}
    settings = Settings.model_validate(
        {
            "sources": [
                {
                    "name": "center",
                    "token": "center-token-0123456789",
                    "klientiks": {**creds, "rate_limit_per_s": 2},
                },
                {
                    "name": "north",
                    "token": "north-token-0123456789a",
                    "klientiks": {**creds, "rate_limit_per_s": 1},
                },
                {"name": "plain", "token": "plain-token-0123456789a"},
            ]
        }
    )
    apis = KlientiksApis.from_settings(settings, max_attempts=2)
    center, north = apis.for_source("center"), apis.for_source("north")
    assert center is not None
    assert north is not None
    assert apis.for_source("plain") is None
    assert apis.for_source("unknown") is None
    assert center._limiter is north._limiter
    assert center._limiter.rate_per_s == 1
    await apis.aclose()


async def test_registry_closes(env: Env) -> None:
    settings = Settings.model_validate(
        {"sources": [{"name": "center", "token": "center-token-0123456789", "klientiks": {
            "account_id": env.account.account_id, "user_id": env.account.user_id, "access_token": TOKEN,
            "base_url": f"{env.base_url}/clientix/Restapi", "rate_limit_per_s": 50,
        }}]}
    )  # fmt: skip
    apis = KlientiksApis.from_settings(settings, backoff_s=0.01)
    client = apis.for_source("center")
    assert client is not None
    appt, _ = env.first()
    assert await client.get_appointment(str(appt["id"])) is not None
    await apis.aclose()


# ---- enrichment end to end -----------------------------------------------------------------------------


def thin_event(appointment_id: Any, status: str = "cancelled") -> CloudEvent:
    now = datetime.now(UTC)
    return CloudEvent(
        id="e-thin",
        source=source_uri("salon"),
        type=EventName.APPOINTMENT_CHANGED.ce_type,
        time=now,
        subject=f"appointment/{appointment_id}",
        relayreceivedat=now,
        data=EventData(appointment=Appointment(id=str(appointment_id), status=status)),
    )


async def test_a_thin_webhook_is_completed(env: Env) -> None:
    appt, client = env.first()
    event = thin_event(appt["id"])
    assert needs_enrichment(event)
    appointment, record = await env.client().fetch_for(event, zone=MSK)
    full = enrich(event, appointment, record, zone=MSK, phone_region="RU")
    assert full.data.client is not None
    assert full.data.client.phone == "+" + client["phone"]
    assert full.data.appointment is not None
    assert full.data.appointment.status == "cancelled"
    assert full.data.appointment.start is not None
    assert enriched_key("salon", full) == f"salon:{client['id']}"
    assert [r["action"] for r in await env.log()] == ["getAppointment"]


async def test_without_clients_in_links_the_client_is_looked_up(env: Env) -> None:
    env.sandbox.embed_clients = False
    client = env.sandbox.add_client({"phone": "79031234567", "first_name": "Ирина", "second_name": "Волкова"})
    appt = env.sandbox.add_appointment({"client_id": client["id"], "start_datetime": "2024-06-20T15:00:00"})
    event = thin_event(appt["id"], status="confirmed")
    appointment, record = await env.client().fetch_for(event, zone=MSK)
    full = enrich(event, appointment, record, zone=MSK, phone_region="RU")
    assert full.data.client is not None
    assert (full.data.client.id, full.data.client.phone) == (str(client["id"]), "+79031234567")
    assert full.data.client.full_name == "Волкова Ирина"
    assert [r["action"] for r in await env.log()] == ["getAppointment", "clients"]


# ---- classification ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "headers", "body", "reason", "retryable"),
    [
        (200, {"content-type": "text/html"}, b"<html><form>login</form></html>", "unauthorized", False),
        (200, {}, b"  <!DOCTYPE html>", "unauthorized", False),
        (302, {"location": "/clientix/login"}, b"", "unauthorized", False),
        (403, {}, b"{}", "unauthorized", False),
        (200, {"content-type": "application/json"}, b'{"id": 1', "bad_response", True),
        (200, {}, b'{"status": "error", "messages": ["API disabled"]}', "api_error", False),
        (200, {}, b'{"status": false, "errors": {"phone": ["bad"]}}', "api_error", False),
        (400, {}, b"{}", "bad_request", False),
        (408, {}, b"", "timeout", True),
        (429, {"retry-after": "7"}, b"", "rate_limited", True),
        (500, {}, b"oops", "server_error", True),
    ],
)
def test_classify_errors(
    status: int, headers: dict[str, str], body: bytes, reason: str, retryable: bool
) -> None:
    answer = classify("getAppointment", status, httpx.Headers(headers), body)
    assert isinstance(answer, KlientiksError)
    assert (answer.reason, answer.retryable, answer.status) == (reason, retryable, status)
    assert answer.retry_after == (7.0 if status == 429 else None)


@pytest.mark.parametrize(
    ("status", "retry_after"), [(429, 3.0), (503, 3.0), (408, None), (401, None), (400, None)]
)
def test_classify_keeps_retry_after_for_429_and_5xx_only(status: int, retry_after: float | None) -> None:
    answer = classify("clients", status, httpx.Headers({"retry-after": "3"}), b"")
    assert isinstance(answer, KlientiksError)
    assert answer.retry_after == retry_after
    assert type(answer.reason) is str


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b"{}", b'""'])
def test_classify_empty_answers_are_not_found(body: bytes) -> None:
    answer = classify("getAppointment", 200, httpx.Headers({}), body)
    assert not isinstance(answer, KlientiksError)
    assert answer.data is None


def test_classify_appointment_with_a_status_is_data() -> None:
    answer = classify("getAppointment", 200, httpx.Headers({}), b'{"id": 1, "status": "cancelled"}')
    assert not isinstance(answer, KlientiksError)
    assert answer.data == {"id": 1, "status": "cancelled"}
