"""In-memory fake of the CPA.House lead API (``send_order``), served over real HTTP with FastAPI.

What is known of the real API (from public integrations, nothing more):

* ``POST {base}/method/send_order`` with an ``application/x-www-form-urlencoded`` body.
* Required fields ``api_key, id_webmaster, name, phone, id_offer, id_source, id_stream, user_agent,
  ip_address, county_code`` (spelled ``county_code``: an ISO 3166-1 alpha-2 code such as RU, UA, BY);
  optional ``sub_id_1`` .. ``sub_id_4``.
* The answer is JSON with ``"status": "success"`` on success; otherwise ``status`` is something else and the
  message is in ``msg``.

Everything else here is the sandbox's own assumption, chosen to be at least as strict as the real API can
plausibly be, so nobody mistakes these rules for facts:

* Every answer of ``send_order`` is HTTP 200 JSON. Success is ``{"status": "success", "id": <int>}``; the
  ``id`` (a lead id, sequential from 1) is an assumption, the real answer may carry no id at all.
  An error is ``{"status": "error", "msg": "<Russian text>"}``; the texts are the sandbox's own.
* The body must be ``application/x-www-form-urlencoded`` (a ``charset`` parameter, if any, must be UTF-8),
  nothing may come in the query string, the body must be ASCII (non-ASCII text percent-encoded as UTF-8)
  and well formed (no empty ``&&`` pairs, no trailing ``&``, every pair has ``=``).
* A field given twice, an unknown field name, a missing or empty required field, and an empty optional
  ``sub_id_*`` (omit it instead) are errors.
* ``api_key`` must be one of the configured keys (any non-empty key without configuration), and
  ``id_webmaster`` must be the one of that key.
* ``id_webmaster``, ``id_offer``, ``id_source``, ``id_stream``: positive integers in ASCII digits without a
  leading zero, at most 18 digits.
* ``county_code``: two uppercase ASCII letters naming a region in ``phonenumbers.SUPPORTED_REGIONS``.
* ``phone``: ASCII digits with an optional leading ``+``, and a valid number of the ``county_code`` region
  (``phonenumbers``: ``is_valid_number`` and ``region_code_for_number == county_code``).
* ``ip_address``: an IPv4 or IPv6 address as :func:`ipaddress.ip_address` reads it, without a zone
  (``%eth0``); private and loopback addresses are accepted.
* ``user_agent``: at most 512 characters; ``name`` and ``sub_id_*``: at most 255.
* No value may contain a control or format character (Unicode Cc, Cf, Cs, Zl, Zp), a U+FFFD replacement
  character (what invalid UTF-8 decodes to), leading or trailing whitespace, or a leftover Klientiks
  placeholder (any ``{{`` or ``}}``).
* Duplicates are accepted: the real behaviour is unknown, and refusing a repeated lead would turn the retry
  of a lost answer into a false failure. Every accepted lead is stored (without ``api_key``).
* A wrong path answers 404 and another method on ``/method/send_order`` 405 (nginx-like HTML pages).

Everything under ``/_sandbox/`` is a control API for tests, the demo and benchmarks (the kit's routes and
``GET /_sandbox/leads``); the real CPA.House has no such paths. The log and the leads never hold the api_key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import phonenumbers
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator

from services.sandbox import kit
from services.sandbox.kit import ActiveFault, SandboxConnectionDroppedError

__all__ = [
    "FIELD_MAX_LENGTH",
    "OPTIONAL_FIELDS",
    "REQUIRED_FIELDS",
    "SEND_ORDER_PATH",
    "ActiveFault",
    "CpaHouseError",
    "CpaHouseSandbox",
    "FaultSpec",
    "Lead",
    "RecordedRequest",
    "SandboxConnectionDroppedError",
    "create_cpahouse_app",
    "validate_order",
]

#: The one CPA.House method the sandbox implements, relative to the base URL.
SEND_ORDER_PATH = "/method/send_order"

REQUIRED_FIELDS: tuple[str, ...] = (
    "api_key",
    "id_webmaster",
    "name",
    "phone",
    "id_offer",
    "id_source",
    "id_stream",
    "user_agent",
    "ip_address",
    "county_code",
)
OPTIONAL_FIELDS: tuple[str, ...] = ("sub_id_1", "sub_id_2", "sub_id_3", "sub_id_4")
_ALL_FIELDS = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)
_LEAD_FIELDS = _ALL_FIELDS - {"api_key"}  # what a lead, a record and a fault's match hold
_ID_FIELDS = ("id_webmaster", "id_offer", "id_source", "id_stream")

#: Longest value accepted per field (sandbox assumption).
FIELD_MAX_LENGTH: dict[str, int] = {
    "name": 255,
    "user_agent": 512,
    **dict.fromkeys(OPTIONAL_FIELDS, 255),
}

_FORM_TYPE = "application/x-www-form-urlencoded"
_MAX_FIELDS = 64  # more pairs than that is a malformed body, not a lead
_POSITIVE_INT_RE = re.compile(r"[1-9][0-9]{0,17}")
_COUNTY_RE = re.compile(r"[A-Z]{2}")
_PHONE_RE = re.compile(r"\+?[0-9]+")
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
_SUPPORTED_REGIONS: frozenset[str] = frozenset(phonenumbers.SUPPORTED_REGIONS)


class CpaHouseError(Exception):
    """A refused lead, answered as HTTP 200 ``{"status": "error", "msg": msg}``."""

    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.msg = msg


def _error_body(msg: str) -> dict[str, Any]:
    return {"status": "error", "msg": msg}


# --------------------------------------------------------------------------------------------
# State records
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RecordedRequest(kit.RecordedRequest):
    """One request, recorded on arrival and completed when answered; never holds the api_key."""

    method: str
    path: str
    content_type: str | None
    fields: dict[str, str]  # form fields but api_key; a repeated field keeps its first value
    repeated: list[str]  # names given more than once (api_key included: a name is no secret)
    key_valid: bool  # api_key present and accepted
    status_field: str | None = None  # "status" of the JSON answer; None for a fault or a wrong path
    msg: str | None = None  # "msg" of an error answer
    lead_id: int | None = None  # id of the stored lead on success


@dataclass
class Lead:
    """An accepted lead with the fields as they were sent (but api_key)."""

    id: int
    id_webmaster: str
    name: str
    phone: str
    id_offer: str
    id_source: str
    id_stream: str
    user_agent: str
    ip_address: str
    county_code: str
    sub_id_1: str | None = None
    sub_id_2: str | None = None
    sub_id_3: str | None = None
    sub_id_4: str | None = None
    created_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by ``GET /_sandbox/leads``."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


class FaultSpec(kit.FaultSpec):
    """Body of ``POST /_sandbox/faults``: the kit's modes (:mod:`services.sandbox.kit`) and ``error_msg``.

    ``error_msg`` answers HTTP 200 ``{"status": "error", "msg": msg}`` without storing a lead. ``match``
    narrows a fault to requests whose form fields have these values, e.g. ``{"sub_id_1": "42"}``.
    Only ``delay`` lets the request reach the lead logic, so the others never store a lead.
    """

    MODES: ClassVar[dict[str, tuple[str, ...]]] = {**kit.FaultSpec.MODES, "error_msg": ("msg",)}
    REQUIRED: ClassVar[dict[str, str]] = {**kit.FaultSpec.REQUIRED, "error_msg": "msg"}

    msg: str | None = Field(default=None, min_length=1)  # error_msg
    match: dict[str, str] | None = None

    @model_validator(mode="after")
    def _check_match(self) -> FaultSpec:
        if self.match is not None:
            # A typo would otherwise make the fault silently never fire; api_key is never recorded.
            unknown = sorted(set(self.match) - _LEAD_FIELDS)
            if unknown:
                raise ValueError(f"match takes form fields but api_key, not {unknown}")
        return self


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _parse_form(content_type: str | None, query: str, body: bytes) -> list[tuple[str, str]]:
    """The form pairs of a ``send_order`` request in the order sent; raises :class:`CpaHouseError`."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != _FORM_TYPE:
        raise CpaHouseError(f"Неверный Content-Type: ожидается {_FORM_TYPE}")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise CpaHouseError("Неверная кодировка: ожидается UTF-8")
    if query:
        raise CpaHouseError("Параметры нужно передавать в теле запроса, а не в строке адреса")
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise CpaHouseError(
            "Неверный формат тела запроса: символы вне ASCII должны быть закодированы"
        ) from None
    try:
        return parse_qsl(
            text,
            keep_blank_values=True,
            strict_parsing=True,
            encoding="utf-8",
            errors="replace",  # invalid UTF-8 becomes U+FFFD, refused by the value check
            max_num_fields=_MAX_FIELDS,
            separator="&",
        )
    except ValueError:
        raise CpaHouseError("Неверный формат тела запроса") from None


def _check_value(name: str, value: str) -> None:
    """The rules every value obeys: no control characters, no edge whitespace, no placeholder, a length."""
    if any(ch == "\ufffd" or unicodedata.category(ch) in _BAD_CATEGORIES for ch in value):
        raise CpaHouseError(f"Недопустимый символ в параметре: {name}")
    if value != value.strip():
        raise CpaHouseError(f"Пробелы в начале или в конце значения параметра: {name}")
    if "{{" in value or "}}" in value:
        raise CpaHouseError(f"Неподставленный шаблон в значении параметра: {name}")
    limit = FIELD_MAX_LENGTH.get(name)
    if limit is not None and len(value) > limit:
        raise CpaHouseError(f"Слишком длинное значение параметра: {name} (не более {limit} символов)")


def _check_positive_int(name: str, value: str) -> None:
    if not _POSITIVE_INT_RE.fullmatch(value):
        raise CpaHouseError(f"Неверное значение параметра {name}: ожидается целое положительное число")


def _check_phone(phone: str, county_code: str) -> None:
    if not _PHONE_RE.fullmatch(phone):
        raise CpaHouseError("Неверный формат параметра phone: допустимы только цифры и + в начале")
    try:
        number = phonenumbers.parse(phone, county_code)
    except phonenumbers.NumberParseException:
        number = None
    if (
        number is None
        or not phonenumbers.is_valid_number(number)
        or phonenumbers.region_code_for_number(number) != county_code
    ):
        raise CpaHouseError(f"Неверный номер телефона (phone) для страны {county_code}")


def _check_ip(value: str) -> None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise CpaHouseError("Неверный IP-адрес (ip_address)") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise CpaHouseError("Неверный IP-адрес (ip_address)")


def validate_order(pairs: Sequence[tuple[str, str]], accounts: Mapping[str, str] | None) -> dict[str, str]:
    """Check a ``send_order`` form; return its fields but api_key, or raise :class:`CpaHouseError`.

    ``accounts`` maps api_key -> id_webmaster; ``None`` accepts any non-empty key with any webmaster id.
    """
    counts = Counter(name for name, _ in pairs)
    for name, _ in pairs:
        if counts[name] > 1:
            raise CpaHouseError(f"Параметр передан несколько раз: {name[:64]}")
    for name, _ in pairs:
        if name not in _ALL_FIELDS:
            raise CpaHouseError(f"Неизвестный параметр: {name[:64]}")
    form = dict(pairs)
    for name in REQUIRED_FIELDS:
        if not form.get(name):
            raise CpaHouseError(f"Не передан обязательный параметр: {name}")
    for name in OPTIONAL_FIELDS:
        if form.get(name) == "":
            raise CpaHouseError(f"Пустое значение параметра: {name} (не передавайте пустые параметры)")

    api_key = form["api_key"]
    _check_value("api_key", api_key)
    if accounts is not None and api_key not in accounts:
        raise CpaHouseError("Неверный api_key")
    _check_value("id_webmaster", form["id_webmaster"])
    _check_positive_int("id_webmaster", form["id_webmaster"])
    if accounts is not None and form["id_webmaster"] != accounts[api_key]:
        raise CpaHouseError("id_webmaster не соответствует api_key")

    for name in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
        if name in form:
            _check_value(name, form[name])
    for name in _ID_FIELDS:
        _check_positive_int(name, form[name])
    county_code = form["county_code"]
    if not _COUNTY_RE.fullmatch(county_code) or county_code not in _SUPPORTED_REGIONS:
        raise CpaHouseError("Неверный код страны")
    _check_phone(form["phone"], county_code)
    _check_ip(form["ip_address"])
    return {k: v for k, v in form.items() if k != "api_key"}


# --------------------------------------------------------------------------------------------
# The sandbox state
# --------------------------------------------------------------------------------------------


def _matches(fields: Mapping[str, str], want: Mapping[str, str]) -> bool:
    return all(fields.get(k) == v for k, v in want.items())


class CpaHouseSandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
    """In-memory CPA.House: accepted leads, recorded requests and injected faults.

    Usable directly in tests (``sandbox.leads``, ``sandbox.add_fault(...)``,
    ``await sandbox.wait_for_requests(...)``) and over HTTP via :func:`create_cpahouse_app`.
    """

    fault_spec = FaultSpec

    def __init__(self) -> None:
        super().__init__()
        self.leads: list[Lead] = []
        self._next_lead_id = 1

    def reset(self) -> None:
        """Forget leads, recorded requests, faults and latency; restart the counters."""
        with self.lock:
            self.leads.clear()
            self._next_lead_id = 1
            super().reset()

    def add_lead(self, fields: Mapping[str, str]) -> Lead:
        """Store a validated lead (fields as returned by :func:`validate_order`) with the next id."""
        with self.lock:
            values: dict[str, Any] = {k: v for k, v in fields.items() if k in _LEAD_FIELDS}
            lead = Lead(id=self._next_lead_id, **values)
            self._next_lead_id += 1
            self.leads.append(lead)
        return lead

    def send_order(
        self, pairs: Sequence[tuple[str, str]], accounts: Mapping[str, str] | None
    ) -> dict[str, Any]:
        """Execute ``send_order`` on the state; return the answer body (success or error)."""
        try:
            fields = validate_order(pairs, accounts)
        except CpaHouseError as exc:
            return _error_body(exc.msg)
        return {"status": "success", "id": self.add_lead(fields).id}

    def fault_applies(self, spec: FaultSpec, rec: RecordedRequest) -> bool:
        return super().fault_applies(spec, rec) and (spec.match is None or _matches(rec.fields, spec.match))

    def fault_response(self, spec: FaultSpec, rec: RecordedRequest) -> Response:
        assert spec.msg is not None  # error_msg, the one mode the kit does not answer
        rec.status_field, rec.msg = "error", spec.msg
        return JSONResponse(_error_body(spec.msg))


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


def create_cpahouse_app(
    accounts: dict[str, str] | None = None, state: CpaHouseSandbox | None = None
) -> FastAPI:
    """Build the sandbox app; ``accounts`` maps api_key -> id_webmaster, ``None`` accepts any key.

    The state is reachable as ``app.state.sandbox``.
    """
    sandbox = state if state is not None else CpaHouseSandbox()
    known = {str(k): str(v) for k, v in accounts.items()} if accounts is not None else None
    app = FastAPI(title="CPA.House sandbox", version="1")
    app.state.sandbox = sandbox
    kit.add_control_routes(app, sandbox)

    @app.post(SEND_ORDER_PATH, tags=["cpahouse"])
    async def send_order(request: Request) -> Response:
        content_type = request.headers.get("content-type")
        body = await request.body()
        try:
            pairs = _parse_form(content_type, request.url.query, body)
            refused: str | None = None
        except CpaHouseError as exc:
            pairs, refused = [], exc.msg
        first: dict[str, str] = {}
        for name, value in pairs:
            first.setdefault(name, value)
        key = first.pop("api_key", "")
        rec = RecordedRequest(
            method=request.method,
            path=SEND_ORDER_PATH,
            content_type=content_type,
            fields=first,
            repeated=sorted(n for n, c in Counter(n for n, _ in pairs).items() if c > 1),
            key_valid=bool(key) and (known is None or key in known),
        )

        async def answer() -> Response:
            with sandbox.lock:
                reply = _error_body(refused) if refused is not None else sandbox.send_order(pairs, known)
            rec.status_field = reply["status"]
            rec.msg = reply.get("msg")
            rec.lead_id = reply.get("id")
            return JSONResponse(reply)

        return await sandbox.serve(request, rec, answer)

    @app.get("/_sandbox/leads", tags=["sandbox"])
    async def list_leads() -> JSONResponse:
        """All accepted leads in creation order (never with the api_key)."""
        with sandbox.lock:
            return JSONResponse([lead.to_dict() for lead in sandbox.leads])

    # Registered last, so every route above wins: a wrong path or method is recorded, not silently lost.
    @app.api_route(
        "/{path:path}",
        methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
        include_in_schema=False,
    )
    async def elsewhere(request: Request, path: str) -> Response:
        full = "/" + path
        if full.startswith("/_sandbox/"):
            return JSONResponse({"detail": "Not Found"}, status_code=404)  # a control typo, not traffic
        status = 405 if full == SEND_ORDER_PATH else 404
        rec = RecordedRequest(
            method=request.method,
            path=full,
            content_type=request.headers.get("content-type"),
            fields={},
            repeated=[],
            key_valid=False,
        )
        headers = {"Allow": "POST"} if status == 405 else None

        async def answer() -> Response:
            return Response(
                kit.nginx_page(status), status_code=status, headers=headers, media_type="text/html"
            )

        return await sandbox.serve(request, rec, answer, may_fault=False)

    return app
