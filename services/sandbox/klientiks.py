"""In-memory fake of the Klientiks REST API (the reads enrichment needs), served over real HTTP with FastAPI.

Paths are ``GET /clientix/Restapi/{action}/a/{account_id}/u/{user_id}/t/{access_token}/{rest}``:

* ``getAppointment/../id/{id}``: the visit as a bare JSON object with ``appointment_client_links``;
* ``list/../m/getClientByPhone/phone/{digits}``: ``{"offset", "items", "count", "limit"}``;
* ``list/../m/clients/date/{YYYY-MM-DD}?offset=&limit=``: clients changed since that day, same shape.

Field names and formats follow S-GOCX and S-ALI (see ``services.ingest.klientiks``): phones are digits
without ``+``; ``start_datetime``, ``created`` and ``modified`` are Moscow local time in PostgreSQL's text
form ``YYYY-MM-DD HH:MM:SS(.ffffff)``. Assumptions, kept here so nobody mistakes them for facts:

* Wrong credentials get the HTML login page with HTTP 200 (``auth_failure="login_page"``, the default),
  as a web application without a session would; ``auth_failure="401"`` answers 401 instead.
* An unknown appointment is HTTP 200 with ``[]``; a link carries ``client_id`` and the nested ``client``
  (``embed_clients=False`` leaves the latter out); booking a visit touches the client's ``modified``.
* ``limit`` is capped at 100; the answer's ``offset`` is the request's offset plus ``limit``, as in S-ALI's
  ``response.json``.
* The rate limit (off unless set) is a token bucket per account answering 429 with ``Retry-After``.

Everything under ``/_sandbox/`` is a control API for tests and demos; Klientiks has no such paths.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Literal
from zoneinfo import ZoneInfo

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from services.sandbox import kit

__all__ = [
    "ACTIONS",
    "DEFAULT_ACCOUNT",
    "FaultSpec",
    "KlientiksSandbox",
    "RecordedRequest",
    "SandboxAccount",
    "create_klientiks_sandbox",
]

MSK = ZoneInfo("Europe/Moscow")
#: Request labels of the implemented reads (``action`` in the request log and in fault filters).
ACTIONS = ("getAppointment", "getClientByPhone", "clients")
STATUSES_PAST = ("finished", "finished", "finished", "missed", "cancelled", "cancelled_by_sms")
STATUSES_FUTURE = ("scheduled", "confirmed", "sms_confirmation_sent", "scheduled")
MAX_LIMIT = 100
DEFAULT_LIMIT = 50
# Seeded records are laid out around this day so that a seed always gives the same data.
DEFAULT_TODAY = date(2024, 6, 3)


@dataclass(frozen=True)
class SandboxAccount:
    account_id: str
    user_id: str
    access_token: str


DEFAULT_ACCOUNT = SandboxAccount("21947", "113421", "sandbox-klientiks-access-token-0123")

_FEMALE = ("Анна", "Мария", "Екатерина", "Ольга", "Татьяна", "Наталья", "Дарья", "Елена", "Ирина", "Алина")
_MALE = ("Александр", "Дмитрий", "Сергей", "Андрей", "Алексей", "Иван", "Михаил", "Николай")
_LAST = ("Иванов", "Смирнов", "Кузнецов", "Попов", "Васильев", "Петров", "Соколов", "Морозов", "Волков")
_FATHERS = (
    ("Александрович", "Александровна"),
    ("Сергеевич", "Сергеевна"),
    ("Иванович", "Ивановна"),
    ("Дмитриевич", "Дмитриевна"),
    ("Андреевич", "Андреевна"),
    ("Николаевич", "Николаевна"),
)
_SERVICES = (
    (101, "Стрижка женская", "1800.00"),
    (102, "Стрижка мужская", "1200.00"),
    (103, "Окрашивание волос", "4500.00"),
    (104, "Маникюр с покрытием", "2200.00"),
    (105, "Педикюр", "2800.00"),
    (106, "Укладка", "1500.00"),
    (107, "Массаж спины", "2500.00"),
    (108, "Чистка лица", "3200.00"),
)
_EXECUTORS = (113421, 113422, 113423, 113424)
_MOBILE = ("916", "903", "925", "926", "985", "999", "977", "905", "915", "967")
_LATIN = (
    "a", "b", "v", "g", "d", "e", "e", "zh", "z", "i", "y", "k", "l", "m", "n", "o", "p",
    "r", "s", "t", "u", "f", "kh", "ts", "ch", "sh", "sch", "", "y", "", "e", "yu", "ya",
)  # fmt: skip
_TRANSLIT = dict(zip("абвгдеёжзийклмнопрстуфхцчшщъыьэюя", _LATIN, strict=True))
_LOGIN_PAGE = (
    '<!DOCTYPE html>\n<html lang="ru">\n<head><meta charset="utf-8"><title>Вход — Клиентикс</title></head>\n'
    '<body>\n<form id="login-form" method="post" action="/clientix/login">\n'
    '<input type="text" name="LoginForm[username]" placeholder="Логин">\n'
    '<input type="password" name="LoginForm[password]" placeholder="Пароль">\n'
    '<button type="submit">Войти</button>\n</form>\n</body>\n</html>\n'
)


def klientiks_time(dt: datetime) -> str:
    """PostgreSQL's text form of a local timestamp: the fraction only when there is one."""
    text = dt.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{dt.microsecond:06d}" if dt.microsecond else text


def _now_msk() -> datetime:
    return datetime.now(MSK).replace(tzinfo=None)


def _digits(phone: str) -> str:
    d = re.sub(r"\D", "", phone)
    return "7" + d[1:] if len(d) == 11 and d.startswith("8") else d


def _latin(text: str) -> str:
    return "".join(_TRANSLIT.get(ch, ch) for ch in text.lower())


# ------------------------------------------------------------------------------------------------ control


class FaultSpec(kit.FaultSpec):
    """Body of ``POST /_sandbox/faults``: the kit's modes (see :mod:`services.sandbox.kit`).

    ``action`` and ``account`` narrow a fault down to one read or one account.
    """

    FILTERS: ClassVar[tuple[str, ...]] = ("action", "account")

    action: Literal["getAppointment", "getClientByPhone", "clients"] | None = None
    account: str | None = None


class RateLimitSpec(BaseModel):
    """Body of ``POST /_sandbox/rate-limit``; ``per_s: null`` turns the limit off."""

    model_config = ConfigDict(extra="forbid")

    per_s: float | None = Field(default=None, gt=0)
    burst: int = Field(default=1, ge=1)


class NewClient(BaseModel):
    """Body of ``POST /_sandbox/clients``: Klientiks field names; ``phone`` in any format."""

    model_config = ConfigDict(extra="forbid")

    account_id: str | None = None
    phone: str
    first_name: str
    second_name: str = ""
    patron_name: str = ""
    email: str = ""
    deleted: bool = False


class NewAppointment(BaseModel):
    """Body of ``POST /_sandbox/appointments``; ``start_datetime`` is Moscow local time."""

    model_config = ConfigDict(extra="forbid")

    account_id: str | None = None
    client_id: int
    start_datetime: datetime
    duration_min: int = Field(default=60, ge=5)
    status: str = "scheduled"
    services: list[str] = Field(default_factory=lambda: ["Стрижка женская"])
    executor_id: int = _EXECUTORS[0]
    paid: bool = False
    # Not confirmed by a source (seed 004 reads them): who booked it, and the subscription that pays it.
    author_id: int | None = None
    abonement_id: int | None = None


@dataclass(kw_only=True)
class RecordedRequest(kit.RecordedRequest):
    """One request to a Restapi path; never holds the access token."""

    account: str | None
    action: str
    params: dict[str, str]
    auth_ok: bool
    throttled: bool = False


@dataclass
class _Bucket:
    tokens: float
    at: float


# ------------------------------------------------------------------------------------------------ state


@dataclass
class KlientiksSandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
    """Clients and appointments per account, seeded from ``seed``; request log, faults, latency, rate limit."""

    fault_spec = FaultSpec

    accounts: tuple[SandboxAccount, ...] = (DEFAULT_ACCOUNT,)
    seed: int = 1
    clients_per_account: int = 12
    appointments_per_account: int = 24
    today: date = DEFAULT_TODAY
    embed_clients: bool = True
    auth_failure: Literal["login_page", "401"] = "login_page"
    clients: dict[int, dict[str, Any]] = field(default_factory=dict)
    appointments: dict[int, dict[str, Any]] = field(default_factory=dict)
    rate_limit: RateLimitSpec = field(default_factory=RateLimitSpec)

    def __post_init__(self) -> None:
        super().__init__()
        self.accounts = tuple(self.accounts)
        if not self.accounts:
            raise ValueError("the sandbox needs at least one account")
        self.reset()

    # ---- control ---------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the seeded records; forget requests, faults, latency and the rate limit."""
        with self.lock:
            self.clients.clear()
            self.appointments.clear()
            self.rate_limit = RateLimitSpec()
            self._buckets: dict[str, _Bucket] = {}
            self._next_client = 6439301
            self._next_appointment = 5833264
            self._next_link = 9100001
            for account in self.accounts:
                self._seed_account(account.account_id)
            super().reset()

    def set_rate_limit(self, per_s: float | None, burst: int = 1) -> None:
        """At most ``per_s`` requests per second per account (bucket of ``burst``); None turns it off."""
        self.rate_limit = RateLimitSpec(per_s=per_s, burst=burst)
        self._buckets.clear()

    def add_client(self, spec: NewClient | Mapping[str, Any]) -> dict[str, Any]:
        """Create a client now (Moscow time); return its record."""
        if not isinstance(spec, NewClient):
            spec = NewClient.model_validate(spec)
        account = self._account_id(spec.account_id)
        now = _now_msk()
        return self._new_client(
            account,
            first=spec.first_name,
            last=spec.second_name,
            patronymic=spec.patron_name,
            phone=_digits(spec.phone),
            email=spec.email,
            created=now,
            modified=now,
            deleted=spec.deleted,
        )

    def add_appointment(self, spec: NewAppointment | Mapping[str, Any]) -> dict[str, Any]:
        """Book a visit for an existing client of the account; return the record as the API shows it."""
        if not isinstance(spec, NewAppointment):
            spec = NewAppointment.model_validate(spec)
        account = self._account_id(spec.account_id)
        client = self.clients.get(spec.client_id)
        if client is None or str(client["account_id"]) != account:
            raise ValueError(f"account {account} has no client {spec.client_id}")
        catalog = {name: (sid, price) for sid, name, price in _SERVICES}
        services = [
            (catalog.get(n, (100, "1000.00"))[0], n, catalog.get(n, (100, "1000.00"))[1])
            for n in spec.services
        ]
        start = spec.start_datetime
        if start.tzinfo is not None:
            start = start.astimezone(MSK).replace(tzinfo=None)
        now = _now_msk()
        record = self._new_appointment(
            account,
            client_id=spec.client_id,
            executor_id=spec.executor_id,
            start=start,
            minutes=spec.duration_min,
            status=spec.status,
            services=services,
            created=now,
            paid=spec.paid,
        )
        record["author_id"] = spec.author_id if spec.author_id is not None else spec.executor_id
        record["abonement_id"] = spec.abonement_id
        client["modified"] = klientiks_time(now)
        return self.render_appointment(record)

    # ---- the API's reads -------------------------------------------------------------------------------

    def credentials_ok(self, account_id: str | None, user_id: str | None, token: str | None) -> bool:
        return any(
            (a.account_id, a.user_id, a.access_token) == (account_id, user_id, token) for a in self.accounts
        )

    def find_appointment(self, account_id: str, appointment_id: str) -> dict[str, Any] | None:
        record = self.appointments.get(int(appointment_id)) if appointment_id.isdigit() else None
        if record is None or str(record["account_id"]) != account_id:
            return None
        return self.render_appointment(record)

    def render_appointment(self, record: Mapping[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in record.items() if k != "_link_id"}
        link: dict[str, Any] = {
            "id": record["_link_id"],
            "appointment_id": record["id"],
            "client_id": record["client_id"],
            "status": record["status"],
        }
        client = self.clients.get(record["client_id"])
        if self.embed_clients and client is not None:
            link["client"] = dict(client)
        out["appointment_client_links"] = [link]
        return out

    def clients_by_phone(self, account_id: str, phone: str) -> list[dict[str, Any]]:
        wanted = _digits(phone)
        return [
            dict(c)
            for c in self.clients.values()
            if str(c["account_id"]) == account_id and c["phone"] == wanted
        ]

    def clients_changed_since(self, account_id: str, since: date) -> list[dict[str, Any]]:
        floor = klientiks_time(datetime.combine(since, datetime.min.time()))
        found = [
            c for c in self.clients.values() if str(c["account_id"]) == account_id and c["modified"] >= floor
        ]
        return [dict(c) for c in sorted(found, key=lambda c: (c["modified"], c["id"]))]

    # ---- internals -------------------------------------------------------------------------------------

    def _account_id(self, account_id: str | None) -> str:
        if account_id is None:
            return self.accounts[0].account_id
        if all(a.account_id != account_id for a in self.accounts):
            raise ValueError(f"unknown account {account_id!r}")
        return account_id

    def _new_client(
        self,
        account: str,
        *,
        first: str,
        last: str,
        patronymic: str,
        phone: str,
        email: str,
        created: datetime,
        modified: datetime,
        deleted: bool = False,
    ) -> dict[str, Any]:
        cid = self._next_client
        self._next_client += 1
        record: dict[str, Any] = {
            "id": cid,
            "name": " ".join(p for p in (last, first, patronymic) if p),
            "phone": phone,
            "first_name": first,
            "patron_name": patronymic,
            "second_name": last,
            "email": email,
            "birth_date": "",
            "created": klientiks_time(created),
            "modified": klientiks_time(modified),
            "client_groups": "",
            "lead_source": "",
            "external_id": None,
            "number": 10000 + cid % 10000,
            "deleted": deleted,
            "blocked": False,
            "country_code": "RU",
            "account_id": int(account) if account.isdigit() else account,
        }
        self.clients[cid] = record
        return dict(record)

    def _new_appointment(
        self,
        account: str,
        *,
        client_id: int,
        executor_id: int,
        start: datetime,
        minutes: int,
        status: str,
        services: list[tuple[int, str, str]],
        created: datetime,
        paid: bool,
    ) -> dict[str, Any]:
        aid, link = self._next_appointment, self._next_link
        self._next_appointment += 1
        self._next_link += 1
        record: dict[str, Any] = {
            "id": aid,
            "account_id": int(account) if account.isdigit() else account,
            "client_id": client_id,
            "executor_id": executor_id,
            "start_datetime": klientiks_time(start),
            "finish_datetime": klientiks_time(start + timedelta(minutes=minutes)),
            "status": status,
            "appointed_services": [
                {"id": aid * 10 + i, "service_id": sid, "name": name, "type": "service", "price": price}
                for i, (sid, name, price) in enumerate(services)
            ],
            "total_cost": f"{sum((Decimal(price) for _, _, price in services), Decimal(0)):.2f}",
            "created": klientiks_time(created),
            "modified": klientiks_time(max(created, min(start, created + timedelta(hours=3)))),
            "paid": paid,
            "author_id": executor_id,
            "abonement_id": None,
            "urgent": False,
            "is_sale": False,
            "_link_id": link,
        }
        self.appointments[aid] = record
        return record

    def _seed_account(self, account: str) -> None:
        rng = random.Random(f"{self.seed}:{account}")
        noon = datetime.combine(self.today, datetime.min.time()).replace(hour=12)
        ids: list[int] = []
        phones: set[str] = set()
        for _ in range(self.clients_per_account):
            female = rng.random() < 0.7
            first = rng.choice(_FEMALE if female else _MALE)
            last = rng.choice(_LAST) + ("а" if female else "")
            patronymic = rng.choice(_FATHERS)[1 if female else 0]
            phone = ""
            while not phone or phone in phones:
                phone = "7" + rng.choice(_MOBILE) + f"{rng.randrange(10**7):07d}"
            phones.add(phone)
            created = noon - timedelta(days=rng.randint(30, 400), seconds=rng.randrange(86400))
            created = created.replace(microsecond=rng.randrange(1, 10**6))
            modified = created + timedelta(days=rng.randint(0, 29), seconds=rng.randrange(86400))
            email = (
                f"{_latin(first)}.{_latin(last)}{rng.randint(1, 99)}@mail.ru" if rng.random() < 0.5 else ""
            )
            record = self._new_client(
                account,
                first=first,
                last=last,
                patronymic=patronymic,
                phone=phone,
                email=email,
                created=created,
                modified=modified,
                deleted=rng.random() < 0.08,
            )
            ids.append(record["id"])
        for _ in range(self.appointments_per_account if ids else 0):
            day = noon + timedelta(days=rng.randint(-30, 30))
            start = day.replace(hour=rng.randint(9, 20), minute=rng.choice((0, 30)))
            status = rng.choice(STATUSES_PAST if start < noon else STATUSES_FUTURE)
            created = start - timedelta(days=rng.randint(1, 14), seconds=rng.randrange(86400))
            created = created.replace(microsecond=rng.randrange(1, 10**6))
            self._new_appointment(
                account,
                client_id=rng.choice(ids),
                executor_id=rng.choice(_EXECUTORS),
                start=start,
                minutes=rng.choice((30, 60, 90, 120)),
                status=status,
                services=rng.sample(_SERVICES, rng.choice((1, 1, 2))),
                created=created,
                paid=status == "finished" and rng.random() < 0.9,
            )

    def _throttle(self, account: str | None) -> float | None:
        """None if the request may pass, else the seconds until it could have (for Retry-After)."""
        per_s = self.rate_limit.per_s
        if per_s is None:
            return None
        burst = float(self.rate_limit.burst)
        now = time.monotonic()
        key = account or ""
        bucket = self._buckets.setdefault(key, _Bucket(burst, now))
        bucket.tokens = min(burst, bucket.tokens + (now - bucket.at) * per_s)
        bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return None
        return (1.0 - bucket.tokens) / per_s


# ------------------------------------------------------------------------------------------------ HTTP


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": "error", "messages": [message]}, status_code=status, headers=headers)


def _parse_path(path: str) -> tuple[str, dict[str, str]]:
    parts = [p for p in path.split("/") if p]
    action = parts[0] if parts else ""
    rest = parts[1:]
    return action, {rest[i]: rest[i + 1] for i in range(0, len(rest) - 1, 2)}


def _label(action: str, pairs: Mapping[str, str]) -> str:
    model = pairs.get("m", "")
    if action == "list" and model.lower() == "clients":
        return "clients"
    if action == "list" and model == "getClientByPhone":
        return "getClientByPhone"
    if action == "getAppointment":
        return action
    return f"{action}/{model}" if model else action


def _list_answer(items: list[dict[str, Any]], offset: int, limit: int) -> dict[str, Any]:
    page = items[offset : offset + limit]
    return {"offset": offset + limit, "items": page, "count": len(page), "limit": limit}


def create_klientiks_sandbox(
    accounts: Iterable[SandboxAccount] | None = None,
    *,
    seed: int = 1,
    state: KlientiksSandbox | None = None,
    **options: Any,
) -> FastAPI:
    """Build the sandbox app; ``options`` are :class:`KlientiksSandbox` fields (today, embed_clients, ...).

    The state is ``app.state.sandbox``. Nothing happens at import or until the app is served.
    """
    sandbox = (
        state
        if state is not None
        else KlientiksSandbox(tuple(accounts) if accounts else (DEFAULT_ACCOUNT,), seed=seed, **options)
    )
    app = FastAPI(title="Klientiks sandbox", version="1")
    app.state.sandbox = sandbox
    kit.add_control_routes(app, sandbox)

    @app.get("/clientix/Restapi/{path:path}", tags=["klientiks"])
    async def restapi(path: str, request: Request) -> Response:
        action, pairs = _parse_path(path)
        label = _label(action, pairs)
        account = pairs.get("a")
        params = {k: v for k, v in pairs.items() if k not in ("a", "u", "t")}
        params.update({k: v for k, v in request.query_params.items() if k not in ("a", "u", "t")})
        auth_ok = sandbox.credentials_ok(account, pairs.get("u"), pairs.get("t"))
        # Decided on arrival, before any sleep: the rate limit follows arrival order. A throttled
        # request takes no fault, so it does not use up "the next N requests".
        wait = sandbox._throttle(account)
        rec = RecordedRequest(
            account=account, action=label, params=params, auth_ok=auth_ok, throttled=wait is not None
        )
        return await sandbox.serve(
            request,
            rec,
            lambda: _answer(request, label, pairs, wait, auth_ok, account),
            may_fault=wait is None,
        )

    async def _answer(
        request: Request,
        label: str,
        pairs: Mapping[str, str],
        wait: float | None,
        auth_ok: bool,
        account: str | None,
    ) -> Response:
        if wait is not None:
            return _error(429, "Too many requests", {"Retry-After": str(max(1, math.ceil(wait)))})
        if not auth_ok or account is None:
            if sandbox.auth_failure == "401":
                return _error(401, "Access denied")
            return HTMLResponse(_LOGIN_PAGE)
        if label == "getAppointment":
            found = sandbox.find_appointment(account, pairs.get("id", ""))
            return JSONResponse(found if found is not None else [])
        if label == "getClientByPhone":
            items = sandbox.clients_by_phone(account, pairs.get("phone", ""))
            return JSONResponse(_list_answer(items, 0, DEFAULT_LIMIT))
        if label == "clients":
            try:
                since = date.fromisoformat(pairs.get("date", ""))
                offset = max(0, int(request.query_params.get("offset", "0")))
                limit = min(MAX_LIMIT, max(1, int(request.query_params.get("limit", str(DEFAULT_LIMIT)))))
            except ValueError:
                return _error(400, "Bad parameters: date is YYYY-MM-DD, offset and limit are numbers")
            items = sandbox.clients_changed_since(account, since)
            return JSONResponse(_list_answer(items, offset, limit))
        return _error(404, "Unknown API method")

    # ---- Klientiks's own control routes (the kit adds requests, faults, reset and latency) -----------------

    @app.get("/_sandbox/clients", tags=["sandbox"])
    async def list_clients(account: str | None = None) -> JSONResponse:
        return JSONResponse(
            [c for c in sandbox.clients.values() if account is None or str(c["account_id"]) == account]
        )

    @app.post("/_sandbox/clients", status_code=201, tags=["sandbox"])
    async def add_client(spec: NewClient) -> JSONResponse:
        try:
            return JSONResponse(sandbox.add_client(spec), status_code=201)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/_sandbox/appointments", tags=["sandbox"])
    async def list_appointments(account: str | None = None) -> JSONResponse:
        return JSONResponse(
            [
                sandbox.render_appointment(a)
                for a in sandbox.appointments.values()
                if account is None or str(a["account_id"]) == account
            ]
        )

    @app.post("/_sandbox/appointments", status_code=201, tags=["sandbox"])
    async def add_appointment(spec: NewAppointment) -> JSONResponse:
        try:
            return JSONResponse(sandbox.add_appointment(spec), status_code=201)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None

    @app.get("/_sandbox/rate-limit", tags=["sandbox"])
    async def get_rate_limit() -> dict[str, Any]:
        return sandbox.rate_limit.model_dump()

    @app.post("/_sandbox/rate-limit", tags=["sandbox"])
    async def set_rate_limit(spec: RateLimitSpec) -> dict[str, Any]:
        """Per account: at most ``per_s`` requests a second (bucket of ``burst``), else 429 + Retry-After."""
        sandbox.set_rate_limit(spec.per_s, spec.burst)
        return sandbox.rate_limit.model_dump()

    return app
