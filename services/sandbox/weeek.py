"""In-memory fake of the Weeek CRM public API (v1), served over real HTTP with FastAPI.

The API lives under :data:`API_PREFIX` (``/public/v1``), so a connection's base URL is
``{sandbox}/public/v1``, as ``https://api.weeek.net/public/v1`` is for the real one. Requests carry
``Authorization: Bearer <token>``; answers are JSON ``{"success": true, "<entity>": {...}}``.

What is known of the real API (``/work/shared/reference/targets.md`` section 3, from the vendor's pages and
public integration code): the paths below but ``move``; a deal is created in a status by
``POST /crm/statuses/{statusId}/deals`` with ``title`` (not ``name``), ``amount``, ``description``,
``assignees[]`` and ``customFields{}``; ``PATCH /crm/deals/{id}`` takes ``title`` (<= 255), ``amount``,
``winStatus`` (``won|lost|archived``), ``description``, ``assignees[]``, ``contacts[]`` and ``customFields{}``
and answers ``{"success": true}``; ``POST /crm/deals/{dealId}/contacts`` with ``{"contactId"}`` links a
contact; ``POST /crm/contacts`` answers ``{"success": true, "contact": {"id": uuid, ...}}``;
``customFields`` is keyed by the custom field's id and its values are typed.

Everything else is the sandbox's own assumption, chosen to be at least as strict as the real API can
plausibly be, so nobody mistakes it for a fact:

* **Moving a deal** (the real path is not known): ``POST /crm/deals/{dealId}/move`` with
  ``{"statusId": "..."}`` answers ``{"success": true}``; the status may belong to another funnel (the deal
  moves with it) or be the deal's own (a no-op that still succeeds and is kept in the deal's history).
* **Errors**: a missing, malformed (anything but ``Bearer <token>``) or unknown token is 401
  ``{"success": false, "message": "Unauthenticated."}``; an unknown funnel, status, deal or contact is 404
  ``{"success": false, "message": "<Entity> not found"}``; invalid input is 422
  ``{"success": false, "message": "The given data was invalid.", "errors": {"<field>": ["..."]}}`` with
  Laravel's dot paths (``customFields.<id>``, ``emails.0``); an unknown path is 404 and a known path with
  another method 405 with ``Allow``. Successful answers are HTTP 200 (creation included).
* **Order of checks**: path (404/405), token (401), query string and a body on GET/DELETE (422), the entity
  of the path (404), the body (422), then an entity the body names (404: ``contactId`` of a link and
  ``statusId`` of a move, so a stale status id in a config is a 404). Entities named in lists
  (``assignees``, ``contacts``) that do not exist are 422.
* **Bodies**: ``Content-Type: application/json`` (a ``charset`` parameter must be UTF-8), strict JSON (UTF-8
  without BOM, no NaN/Infinity, no key given twice), a JSON object; unknown fields are 422 (also
  ``name`` for a deal, and ``organizations``/``tags``, which the sandbox does not model); ``null`` is refused
  for every field (leave a field out instead); an empty ``PATCH`` is 422. GET and DELETE take no body.
* **Every string** of a body, keys and values at any depth, must be non-empty and free of control and
  format characters (Unicode Cc, Cf, Zl, Zp: newlines and tabs included, also in ``description``), U+FFFD,
  lone surrogates, a leftover placeholder (any ``{{`` or ``}}``) and leading or trailing whitespace.
* **Deals**: ``title`` required on create, at most 255 characters; ``description`` at most 10000;
  ``amount`` a JSON number (not a string, not a boolean) >= 0 with at most 2 decimals and below 10^12
  (default 0); ``assignees`` known workspace user ids and ``contacts`` known contact ids, without
  repeats (a PATCH replaces either list); ``customFields`` keyed by known deal custom field ids, values by
  type: text a string of at most 1000 characters, number a JSON number, datetime an ISO 8601 date
  (``YYYY-MM-DD``) or date-time (``T``, optional seconds and fraction, optional ``Z`` or ``±HH:MM``), link
  an ``http(s)`` URL of at most 2048 characters; a PATCH merges custom fields key by key. ``winStatus``
  only on PATCH. DELETE marks the deal deleted: the API answers 404 for it afterwards.
* **Linking** a contact that is already linked is a success and changes nothing.
* **Contacts**: ``firstName`` required on POST and PUT, at most 255 characters, as ``lastName`` and
  ``middleName``; ``emails`` strings that look like an email (at most 254 characters), ``phones`` strings
  of an optional ``+`` and 10-15 ASCII digits; no repeats in either list. PUT replaces the contact (a
  field left out is cleared), PATCH changes the fields given. Duplicates across contacts are accepted.
  ``GET /crm/contacts/{id}`` answers ``{"success": true, "contact": {...}}``.
* **Lists**: ``GET /crm/contacts`` and ``GET /crm/statuses/{statusId}/deals`` take ``limit`` (1-100,
  default 50) and ``offset`` (>= 0, default 0), in creation order; other routes take no query string.
* **Shapes**: ids are uuid strings (deals and the ``emails``/``phones`` entries too); times are
  Laravel's ``2024-06-03T10:00:00.000000Z``; ``currencyId`` is ``"RUB"``; a deal is ``{id, title, amount,
  description, statusId, funnelId, winStatus, assignees, contacts, customFields, createdAt, updatedAt}``.

The seeded workspace is deterministic (ids are uuid5 of names, see :func:`funnel_id`, :func:`status_id`,
:func:`user_id`, :func:`custom_field_id`): funnel :data:`SEED_FUNNEL_NAME` with :data:`SEED_STATUS_NAMES`,
the users :data:`SEED_USERS` and the deal custom fields :data:`SEED_CUSTOM_FIELDS`. Contact and deal ids are
uuid5 of a counter, so they repeat after a reset.

Everything under ``/_sandbox/`` is a control API for tests, the demo and benchmarks; Weeek has no such
paths. Besides the kit's routes: ``GET /_sandbox/workspace`` (funnels with statuses, users, custom
fields), ``POST /_sandbox/funnels``, ``POST /_sandbox/custom-fields``, ``GET /_sandbox/contacts`` and
``GET /_sandbox/deals`` (deleted deals included, with their history). The log never holds the token.
"""

from __future__ import annotations

import contextlib
import json
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Literal, NoReturn
from urllib.parse import parse_qsl, urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.sandbox import kit
from services.sandbox.kit import ActiveFault, SandboxConnectionDroppedError

__all__ = [
    "API_PREFIX",
    "CUSTOM_FIELD_TYPES",
    "ROUTES",
    "SEED_CUSTOM_FIELDS",
    "SEED_FUNNEL_NAME",
    "SEED_STATUS_NAMES",
    "SEED_USERS",
    "ActiveFault",
    "Contact",
    "CustomField",
    "Deal",
    "FaultSpec",
    "Funnel",
    "NewCustomField",
    "NewFunnel",
    "RecordedRequest",
    "SandboxConnectionDroppedError",
    "Status",
    "User",
    "WeeekError",
    "WeeekSandbox",
    "contact_id",
    "create_weeek_app",
    "custom_field_id",
    "deal_id",
    "funnel_id",
    "status_id",
    "user_id",
]

#: Where the API is served: a connection's base URL is ``{sandbox}/public/v1``.
API_PREFIX = "/public/v1"

#: The implemented routes (relative to :data:`API_PREFIX`) and their methods.
ROUTES: dict[str, tuple[str, ...]] = {
    "/crm/funnels": ("GET",),
    "/crm/funnels/{funnelId}/statuses": ("GET",),
    "/crm/statuses/{statusId}/deals": ("GET", "POST"),
    "/crm/deals/{dealId}": ("GET", "PATCH", "DELETE"),
    "/crm/deals/{dealId}/move": ("POST",),
    "/crm/deals/{dealId}/contacts": ("POST",),
    "/crm/contacts": ("GET", "POST"),
    "/crm/contacts/{contactId}": ("GET", "PUT", "PATCH"),
}
_ROUTE_RES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (template, re.compile(re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", template))) for template in ROUTES
)
_PAGED = {("GET", "/crm/contacts"), ("GET", "/crm/statuses/{statusId}/deals")}
_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

SEED_FUNNEL_NAME = "Продажи"
SEED_STATUS_NAMES: tuple[str, ...] = ("Новая заявка", "Записан", "Пришёл", "Оплачен", "Отказ")
#: (name, email) of the workspace users; their ids are :func:`user_id` of the email.
SEED_USERS: tuple[tuple[str, str], ...] = (
    ("Анна Администратор", "admin@salon.example"),
    ("Ирина Мастер", "master@salon.example"),
)
CUSTOM_FIELD_TYPES: tuple[str, ...] = ("text", "number", "datetime", "link")
#: (name, type) of the deal custom fields; their ids are :func:`custom_field_id` of the name.
SEED_CUSTOM_FIELDS: tuple[tuple[str, str], ...] = (
    ("Klientiks visit id", "text"),
    ("Сумма визита", "number"),
)
_SEED_TIME = "2024-01-15T09:00:00.000000Z"
_CURRENCY = "RUB"

_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://api.weeek.net/public/v1#sandbox")


def _sid(*parts: str) -> str:
    return str(uuid.uuid5(_NAMESPACE, "/".join(parts)))


def funnel_id(name: str) -> str:
    """The id the sandbox gives a funnel of this name."""
    return _sid("funnel", name)


def status_id(funnel_name: str, status_name: str) -> str:
    """The id the sandbox gives a status of this name in the funnel of that name."""
    return _sid("status", funnel_name, status_name)


def user_id(email: str) -> str:
    """The id of the workspace user with this email (see :data:`SEED_USERS`)."""
    return _sid("user", email)


def custom_field_id(name: str) -> str:
    """The id the sandbox gives a deal custom field of this name."""
    return _sid("custom-field", name)


def contact_id(n: int) -> str:
    """The id of the ``n``-th contact created since the last reset (from 1)."""
    return _sid("contact", str(n))


def deal_id(n: int) -> str:
    """The id of the ``n``-th deal created since the last reset (from 1)."""
    return _sid("deal", str(n))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

_INVALID = "The given data was invalid."


class WeeekError(Exception):
    """An error answer: ``{"success": false, "message": ..., "errors"?: {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, errors: dict[str, list[str]] | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.errors = errors

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"success": False, "message": self.message}
        if self.errors is not None:
            out["errors"] = self.errors
        return out


def _invalid(name: str, message: str) -> NoReturn:
    raise WeeekError(422, _INVALID, {name: [message]})


def _not_found(what: str) -> NoReturn:
    raise WeeekError(404, f"{what} not found")


class _Errors:
    """Validation errors by field, in the order found; :meth:`check` raises them as a 422."""

    def __init__(self) -> None:
        self.by_field: dict[str, list[str]] = {}

    def add(self, name: str, message: str) -> None:
        self.by_field.setdefault(name, []).append(message)

    def check(self) -> None:
        if self.by_field:
            raise WeeekError(422, _INVALID, self.by_field)


def _safe(text: str) -> str:
    """``text`` with lone surrogates escaped, since a JSON answer (UTF-8) cannot carry them."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return text


def _printable(value: Any) -> Any:
    """``value`` with every string made :func:`_safe`, for the request log."""
    if isinstance(value, str):
        return _safe(value)
    if isinstance(value, dict):
        return {_safe(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# State records
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RecordedRequest(kit.RecordedRequest):
    """One request, recorded on arrival and completed when answered; never holds the token."""

    method: str
    path: str  # the full path, e.g. /public/v1/crm/deals/<id>/contacts
    route: str | None  # the route template relative to /public/v1, e.g. /crm/deals/{dealId}/contacts
    query: dict[str, str]  # the first value of each query parameter
    content_type: str | None
    body: Any  # parsed JSON (leniently, for the log), or None when there was none or it was not JSON
    malformed: bool  # a body was sent that is not JSON at all
    token_present: bool  # an Authorization header was sent
    token_valid: bool  # it was "Bearer <token>" with an accepted token
    message: str | None = None  # "message" of an error answer
    errors: dict[str, list[str]] | None = None  # "errors" of a 422 answer

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; lone surrogates in the body are shown as ``\\udXXX`` escapes."""
        out = super().to_dict()
        with contextlib.suppress(RecursionError):  # a very deep body is shown as it came
            out["body"] = _printable(self.body)
        out["errors"] = _printable(self.errors)
        return out


@dataclass
class Funnel:
    id: str
    name: str
    currency_id: str = _CURRENCY
    is_private: bool = False
    created_at: str = _SEED_TIME


@dataclass
class Status:
    id: str
    funnel_id: str
    name: str
    created_at: str = _SEED_TIME


@dataclass
class User:
    id: str
    name: str
    email: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "email": self.email}


@dataclass
class CustomField:
    id: str
    name: str
    type: str

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "type": self.type}


@dataclass
class Contact:
    id: str
    first_name: str
    last_name: str | None = None
    middle_name: str | None = None
    emails: list[dict[str, str]] = field(default_factory=list)  # [{"id", "email"}]
    phones: list[dict[str, str]] = field(default_factory=list)  # [{"id", "phone"}]
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_weeek(self) -> dict[str, Any]:
        """The ``contact`` object of the API's answers."""
        return {
            "id": self.id,
            "firstName": self.first_name,
            "lastName": self.last_name,
            "middleName": self.middle_name,
            "emails": [dict(e) for e in self.emails],
            "phones": [dict(p) for p in self.phones],
            "tags": [],
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }

    def to_dict(self) -> dict[str, Any]:
        """The API shape plus the history, used by ``GET /_sandbox/contacts``."""
        return {**self.to_weeek(), "history": [dict(h) for h in self.history]}


@dataclass
class Deal:
    """A deal; ``history`` lists every change: created, patched, moved, contact_linked, deleted."""

    id: str
    status_id: str
    funnel_id: str
    title: str
    amount: int | float = 0
    description: str | None = None
    assignees: list[str] = field(default_factory=list)
    contacts: list[str] = field(default_factory=list)
    custom_fields: dict[str, Any] = field(default_factory=dict)
    win_status: str | None = None
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    deleted_at: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_weeek(self) -> dict[str, Any]:
        """The ``deal`` object of the API's answers."""
        return {
            "id": self.id,
            "title": self.title,
            "amount": self.amount,
            "description": self.description,
            "statusId": self.status_id,
            "funnelId": self.funnel_id,
            "winStatus": self.win_status,
            "assignees": list(self.assignees),
            "contacts": list(self.contacts),
            "customFields": dict(self.custom_fields),
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }

    def to_dict(self) -> dict[str, Any]:
        """The API shape plus deletion and history, used by ``GET /_sandbox/deals``."""
        return {
            **self.to_weeek(),
            "deleted": self.deleted_at is not None,
            "deletedAt": self.deleted_at,
            "history": [dict(h) for h in self.history],
        }


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


class FaultSpec(kit.FaultSpec):
    """Body of ``POST /_sandbox/faults``: the kit's modes (:mod:`services.sandbox.kit`) and ``error``.

    ``error`` answers ``{"success": false, "message": message}`` with HTTP ``status`` (default 200: a
    refusal inside a 200 answer). Only ``delay`` lets the request reach the API logic, so the others
    change nothing. Filters, all optional and combined: ``method`` (``"POST"``), ``route`` (a template
    of :data:`ROUTES`, e.g. ``"/crm/deals/{dealId}/contacts"``), ``path`` (the full path, exact),
    ``path_prefix`` (the full path starts with it, e.g. ``"/public/v1/crm/contacts"``), ``path_regex``
    (``re.search`` in the full path) and ``match`` (top-level body fields with these JSON values).
    Faults never hit an unknown path or a wrong method.
    """

    MODES: ClassVar[dict[str, tuple[str, ...]]] = {**kit.FaultSpec.MODES, "error": ("status", "message")}
    REQUIRED: ClassVar[dict[str, str]] = {**kit.FaultSpec.REQUIRED, "error": "message"}
    FILTERS: ClassVar[tuple[str, ...]] = ("method", "route", "path")

    message: str | None = Field(default=None, min_length=1)  # error
    method: str | None = None
    route: str | None = None
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    match: dict[str, Any] | None = None

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str | None) -> str | None:
        if method is None:
            return None
        if method.upper() not in _HTTP_METHODS:
            raise ValueError(f"method must be one of {list(_HTTP_METHODS)}")
        return method.upper()

    @field_validator("route")
    @classmethod
    def _known_route(cls, route: str | None) -> str | None:
        # A typo would otherwise make the fault silently never fire.
        if route is not None and route not in ROUTES:
            raise ValueError(f"route must be one of {list(ROUTES)} (relative to {API_PREFIX})")
        return route

    @field_validator("path", "path_prefix")
    @classmethod
    def _absolute(cls, path: str | None) -> str | None:
        if path is not None and not path.startswith("/"):
            raise ValueError(f"a full path, starting with / (the API is under {API_PREFIX})")
        return path

    @field_validator("path_regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
        return pattern

    @model_validator(mode="after")
    def _route_takes_method(self) -> FaultSpec:
        if self.route is not None and self.method is not None and self.method not in ROUTES[self.route]:
            raise ValueError(f"{self.route} takes {list(ROUTES[self.route])}, not {self.method}")
        return self


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------

_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_TITLE_MAX = 255
_NAME_MAX = 255
_DESCRIPTION_MAX = 10000
_TEXT_FIELD_MAX = 1000
_EMAIL_MAX = 254
_LINK_MAX = 2048
_AMOUNT_LIMIT = Decimal(10) ** 12
_NUMBER_LIMIT = Decimal(10) ** 15
_CENTS = Decimal("0.01")
_MAX_LIMIT = 100
_DEFAULT_LIMIT = 50
_WIN_STATUSES = ("won", "lost", "archived")
_JSON_TYPE = "application/json"
_PHONE_RE = re.compile(r"\+?[0-9]{10,15}")
_EMAIL_RE = re.compile(r"[^@\s.]+(\.[^@\s.]+)*@[^@\s.]+(\.[^@\s.]+)*\.[^\W\d_]{2,}")
_INT_RE = re.compile(r"[0-9]{1,9}")
_ISO_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:[0-9]{2})?)?"
)

_DEAL_CREATE_FIELDS = ("title", "amount", "description", "assignees", "customFields", "contacts")
_DEAL_PATCH_FIELDS = ("title", "amount", "winStatus", "description", "assignees", "contacts", "customFields")
_CONTACT_FIELDS = ("firstName", "lastName", "middleName", "emails", "phones")


def _string_problem(text: str) -> str | None:
    """Why ``text`` is not clean text a real client would send, or None when it is."""
    if not text:
        return "must not be empty"
    for char in text:
        if char == "\ufffd":
            return "must not contain U+FFFD, the mark of text decoded from invalid bytes"
        category = unicodedata.category(char)
        if category == "Cs":
            return "must not contain a lone surrogate"
        if category in _BAD_CATEGORIES:
            return f"must not contain the control or format character U+{ord(char):04X}"
    if "{{" in text or "}}" in text:
        return "must not contain a template placeholder {{...}}"
    if text != text.strip():
        return "must not start or end with whitespace"
    return None


def _join(where: str, key: str | int) -> str:
    return f"{where}.{key}" if where else str(key)


def _check_strings(body: Any) -> None:
    """A 422 naming every string (a key or a value, at any depth) that is not clean text."""
    errs = _Errors()
    # Depth first in document order, without recursion: JSON may nest deeper than Python's stack.
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if problem := _string_problem(value):
                errs.add(_safe(where or "body"), f"The value {problem}.")
        elif isinstance(value, dict):
            for key in value:
                if problem := _string_problem(key):
                    errs.add(_safe(_join(where, key)), f"The field name {problem}.")
            stack.extend((value[key], _join(where, key)) for key in reversed(list(value)))
        elif isinstance(value, list):
            stack.extend((value[i], _join(where, i)) for i in reversed(range(len(value))))
    errs.check()


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _lenient_json(raw: bytes) -> Any:
    """The body as JSON for the request log (a repeated key keeps its last value); ValueError if not JSON."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _parse_body(content_type: str | None, raw: bytes) -> dict[str, Any]:
    """The strict JSON object of a POST/PUT/PATCH body, or a 422 naming ``body``."""
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != _JSON_TYPE:
        _invalid("body", f"The request body must be JSON sent as Content-Type: {_JSON_TYPE}.")
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            _invalid("body", "The request body must be UTF-8.")
    if not raw.strip():
        _invalid("body", "The request body is empty; send a JSON object.")
    try:
        body = json.loads(
            raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_no_duplicates
        )
    except _DuplicateKeyError as e:
        _invalid("body", f"The field {_safe(e.key)} is given more than once.")
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        _invalid("body", "The request body is not valid JSON (UTF-8 without a byte order mark).")
    if not isinstance(body, dict):
        _invalid("body", "The request body must be a JSON object.")
    return body


def _unknown_fields(body: Mapping[str, Any], allowed: Iterable[str], errs: _Errors) -> None:
    known = set(allowed)
    for key in body:
        if key not in known:
            errs.add(_safe(key), f"The {_safe(key)} field is not allowed.")


def _text(body: Mapping[str, Any], name: str, errs: _Errors, *, max_len: int, required: bool = False) -> None:
    if name not in body:
        if required:
            errs.add(name, f"The {name} field is required.")
        return
    value = body[name]
    if not isinstance(value, str):
        errs.add(name, f"The {name} must be a string.")
    elif len(value) > max_len:
        errs.add(name, f"The {name} may not be greater than {max_len} characters.")


def _decimal(value: Any) -> Decimal | None:
    """A JSON number as a Decimal; None for anything else (a boolean or a numeric string included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _amount(body: Mapping[str, Any], errs: _Errors) -> None:
    if "amount" not in body:
        return
    number = _decimal(body["amount"])
    if number is None:
        errs.add("amount", "The amount must be a number.")
    elif number < 0:
        errs.add("amount", "The amount must be at least 0.")
    elif number >= _AMOUNT_LIMIT:
        errs.add("amount", f"The amount must be less than {_AMOUNT_LIMIT}.")
    elif number != number.quantize(_CENTS):
        errs.add("amount", "The amount may have at most 2 decimal places.")


def _id_list(body: Mapping[str, Any], name: str, known: Mapping[str, Any], errs: _Errors) -> None:
    if name not in body:
        return
    value = body[name]
    if not isinstance(value, list):
        errs.add(name, f"The {name} must be an array.")
        return
    seen: set[str] = set()
    for i, item in enumerate(value):
        at = f"{name}.{i}"
        if not isinstance(item, str):
            errs.add(at, f"The {at} must be a string.")
        elif item not in known:
            errs.add(at, f"The selected {at} is invalid.")
        elif item in seen:
            errs.add(at, f"The {at} field has a duplicate value.")
        else:
            seen.add(item)


def _custom_value_problem(kind: str, value: Any) -> str | None:
    if kind == "text":
        if not isinstance(value, str):
            return "must be a string"
        return (
            f"may not be greater than {_TEXT_FIELD_MAX} characters" if len(value) > _TEXT_FIELD_MAX else None
        )
    if kind == "number":
        number = _decimal(value)
        if number is None:
            return "must be a number"
        return f"must be less than {_NUMBER_LIMIT} in magnitude" if abs(number) >= _NUMBER_LIMIT else None
    if kind == "datetime":
        if isinstance(value, str) and _ISO_RE.fullmatch(value):
            try:
                datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:  # e.g. month 13
                pass
            else:
                return None
        return "must be an ISO 8601 date or date-time, e.g. 2024-06-03T10:00:00+03:00"
    # link
    if not isinstance(value, str):
        return "must be a URL"
    parts = urlsplit(value)
    if (
        len(value) > _LINK_MAX
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or any(ch.isspace() for ch in value)
    ):
        return "must be an http(s) URL"
    return None


def _looks_like_email(value: str) -> bool:
    return len(value) <= _EMAIL_MAX and _EMAIL_RE.fullmatch(value) is not None


def _looks_like_phone(value: str) -> bool:
    return _PHONE_RE.fullmatch(value) is not None


def _paging(query: Mapping[str, str]) -> tuple[int, int]:
    errs = _Errors()
    limit, offset = _DEFAULT_LIMIT, 0
    if "limit" in query:
        text = query["limit"]
        if not _INT_RE.fullmatch(text) or not 1 <= int(text) <= _MAX_LIMIT:
            errs.add("limit", f"The limit must be an integer between 1 and {_MAX_LIMIT}.")
        else:
            limit = int(text)
    if "offset" in query:
        text = query["offset"]
        if not _INT_RE.fullmatch(text):
            errs.add("offset", "The offset must be an integer of at least 0.")
        else:
            offset = int(text)
    errs.check()
    return limit, offset


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


# --------------------------------------------------------------------------------------------
# Control route bodies
# --------------------------------------------------------------------------------------------


def _clean_name(text: str) -> str:
    if problem := _string_problem(text):
        raise ValueError(f"a name {problem}")
    if len(text) > _NAME_MAX:
        raise ValueError(f"a name may not be longer than {_NAME_MAX} characters")
    return text


class NewFunnel(BaseModel):
    """Body of ``POST /_sandbox/funnels``: a funnel and its statuses in order."""

    model_config = ConfigDict(extra="forbid")

    name: str
    statuses: list[str] = Field(min_length=1)
    currencyId: str = _CURRENCY  # Weeek's spelling

    @field_validator("name", "currencyId")
    @classmethod
    def _clean(cls, text: str) -> str:
        return _clean_name(text)

    @field_validator("statuses")
    @classmethod
    def _clean_statuses(cls, names: list[str]) -> list[str]:
        for name in names:
            _clean_name(name)
        if len(set(names)) != len(names):
            raise ValueError("status names repeat")
        return names


class NewCustomField(BaseModel):
    """Body of ``POST /_sandbox/custom-fields``: one more deal custom field."""

    model_config = ConfigDict(extra="forbid")

    name: str
    type: Literal["text", "number", "datetime", "link"]

    @field_validator("name")
    @classmethod
    def _clean(cls, text: str) -> str:
        return _clean_name(text)


# --------------------------------------------------------------------------------------------
# The sandbox state
# --------------------------------------------------------------------------------------------


@dataclass
class _Call:
    """One API request as a handler sees it."""

    params: dict[str, str]
    query: dict[str, str]
    content_type: str | None
    raw: bytes

    def json(self) -> dict[str, Any]:
        """The body: a strict JSON object of clean strings, else a 422."""
        body = _parse_body(self.content_type, self.raw)
        _check_strings(body)
        return body


Handler = Callable[[_Call], dict[str, Any]]


class WeeekSandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
    """In-memory Weeek CRM: the workspace (funnels, statuses, users, custom fields), contacts and deals.

    Seeded deterministically (see the module docstring); :meth:`reset` brings back exactly that seed,
    dropping funnels and custom fields added since. Usable directly in tests (``sandbox.deals``,
    ``sandbox.add_fault(...)``, ``await sandbox.wait_for_requests(...)``) and over HTTP via
    :func:`create_weeek_app`.
    """

    fault_spec = FaultSpec

    def __init__(self) -> None:
        super().__init__()
        self.funnels: dict[str, Funnel] = {}
        self.statuses: dict[str, Status] = {}
        self.users: dict[str, User] = {}
        self.custom_fields: dict[str, CustomField] = {}
        self.contacts: dict[str, Contact] = {}
        self.deals: dict[str, Deal] = {}
        self._seed()
        self._handlers: dict[tuple[str, str], Handler] = {
            ("GET", "/crm/funnels"): self._list_funnels,
            ("GET", "/crm/funnels/{funnelId}/statuses"): self._list_statuses,
            ("GET", "/crm/statuses/{statusId}/deals"): self._list_deals,
            ("POST", "/crm/statuses/{statusId}/deals"): self._create_deal,
            ("GET", "/crm/deals/{dealId}"): self._get_deal,
            ("PATCH", "/crm/deals/{dealId}"): self._patch_deal,
            ("DELETE", "/crm/deals/{dealId}"): self._delete_deal,
            ("POST", "/crm/deals/{dealId}/move"): self._move_deal,
            ("POST", "/crm/deals/{dealId}/contacts"): self._link_contact,
            ("GET", "/crm/contacts"): self._list_contacts,
            ("POST", "/crm/contacts"): self._create_contact,
            ("GET", "/crm/contacts/{contactId}"): self._get_contact,
            ("PUT", "/crm/contacts/{contactId}"): self._put_contact,
            ("PATCH", "/crm/contacts/{contactId}"): self._patch_contact,
        }

    def _seed(self) -> None:
        self.funnels.clear()
        self.statuses.clear()
        self.users.clear()
        self.custom_fields.clear()
        self.contacts.clear()
        self.deals.clear()
        self._next_contact = 1
        self._next_deal = 1
        self._next_entry = 1
        self.add_funnel(SEED_FUNNEL_NAME, SEED_STATUS_NAMES)
        for name, email in SEED_USERS:
            self.users[user_id(email)] = User(user_id(email), name, email)
        for name, kind in SEED_CUSTOM_FIELDS:
            self.add_custom_field(name, kind)

    # ---- control ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the seeded workspace without contacts or deals; forget requests, faults and latency."""
        with self.lock:
            self._seed()
            super().reset()

    def add_funnel(self, name: str, statuses: Iterable[str], currency_id: str = _CURRENCY) -> Funnel:
        """Add a funnel with its statuses in order; ids are :func:`funnel_id` and :func:`status_id`."""
        names = list(statuses)
        with self.lock:
            fid = funnel_id(name)
            if fid in self.funnels:
                raise ValueError(f"the workspace already has a funnel named {name!r}")
            if not names or len(set(names)) != len(names):
                raise ValueError("a funnel needs statuses with distinct names")
            funnel = Funnel(fid, name, currency_id)
            self.funnels[fid] = funnel
            for status_name in names:
                sid = status_id(name, status_name)
                self.statuses[sid] = Status(sid, fid, status_name)
        return funnel

    def add_custom_field(self, name: str, kind: str) -> CustomField:
        """Add a deal custom field of a type in :data:`CUSTOM_FIELD_TYPES`; its id is :func:`custom_field_id`."""
        if kind not in CUSTOM_FIELD_TYPES:
            raise ValueError(f"type must be one of {list(CUSTOM_FIELD_TYPES)}")
        with self.lock:
            fid = custom_field_id(name)
            if fid in self.custom_fields:
                raise ValueError(f"the workspace already has a custom field named {name!r}")
            self.custom_fields[fid] = CustomField(fid, name, kind)
            return self.custom_fields[fid]

    def workspace(self) -> dict[str, Any]:
        """What a test needs to build a config: funnels with statuses, users and deal custom fields."""
        with self.lock:
            return {
                "funnels": [
                    {
                        "id": f.id,
                        "name": f.name,
                        "currencyId": f.currency_id,
                        "isPrivate": f.is_private,
                        "statuses": [self._status_ref(s) for s in self._statuses_of(f.id)],
                    }
                    for f in self.funnels.values()
                ],
                "users": [u.to_dict() for u in self.users.values()],
                "customFields": [c.to_dict() for c in self.custom_fields.values()],
            }

    def fault_applies(self, spec: FaultSpec, rec: RecordedRequest) -> bool:
        if not super().fault_applies(spec, rec):
            return False
        if spec.path_prefix is not None and not rec.path.startswith(spec.path_prefix):
            return False
        if spec.path_regex is not None and re.search(spec.path_regex, rec.path) is None:
            return False
        if spec.match is not None:
            body = rec.body
            return isinstance(body, dict) and all(k in body and body[k] == v for k, v in spec.match.items())
        return True

    def fault_response(self, spec: FaultSpec, rec: RecordedRequest) -> Response:
        assert spec.message is not None  # error, the one mode the kit does not answer
        rec.message = spec.message
        return JSONResponse({"success": False, "message": spec.message}, status_code=spec.status or 200)

    # ---- the API ---------------------------------------------------------------------------

    def call(
        self,
        method: str,
        route: str,
        params: Mapping[str, str],
        query: Iterable[tuple[str, str]] = (),
        content_type: str | None = _JSON_TYPE,
        raw: bytes = b"",
    ) -> tuple[int, dict[str, Any]]:
        """Run one authenticated API request on the state; return the HTTP status and the answer body.

        ``route`` is a template of :data:`ROUTES` and ``method`` one of its methods. Either the whole
        request applies or, on an error, nothing changes.
        """
        with self.lock:
            try:
                call = _Call(dict(params), self._query(method, route, list(query)), content_type, raw)
                if method not in _BODY_METHODS and raw:
                    _invalid("body", f"A {method} request takes no body.")
                return 200, self._handlers[(method, route)](call)
            except WeeekError as e:
                return e.status, e.body()

    @staticmethod
    def _query(method: str, route: str, pairs: list[tuple[str, str]]) -> dict[str, str]:
        allowed = ("limit", "offset") if (method, route) in _PAGED else ()
        errs = _Errors()
        seen: dict[str, str] = {}
        for name, value in pairs:
            if name not in allowed:
                errs.add(_safe(name), f"The query parameter {_safe(name)} is not allowed.")
            elif name in seen:
                errs.add(name, f"The query parameter {name} is given more than once.")
            seen.setdefault(name, value)
        errs.check()
        return seen

    # ---- look-ups --------------------------------------------------------------------------

    def _funnel(self, fid: str) -> Funnel:
        return self.funnels.get(fid) or _not_found("Funnel")

    def _status(self, sid: str) -> Status:
        return self.statuses.get(sid) or _not_found("Status")

    def _deal(self, did: str) -> Deal:
        deal = self.deals.get(did)
        if deal is None or deal.deleted_at is not None:
            _not_found("Deal")
        return deal

    def _contact(self, cid: str) -> Contact:
        return self.contacts.get(cid) or _not_found("Contact")

    def _statuses_of(self, fid: str) -> list[Status]:
        return [s for s in self.statuses.values() if s.funnel_id == fid]

    def _live_deals(self) -> list[Deal]:
        return [d for d in self.deals.values() if d.deleted_at is None]

    @staticmethod
    def _status_ref(status: Status) -> dict[str, Any]:
        return {"id": status.id, "name": status.name}

    @staticmethod
    def _totals(deals: list[Deal]) -> dict[str, Any]:
        total = sum((Decimal(str(d.amount)) for d in deals), Decimal(0))
        return {"dealsCount": len(deals), "dealsAmount": _number(total)}

    # ---- funnels and statuses --------------------------------------------------------------

    def _list_funnels(self, call: _Call) -> dict[str, Any]:
        funnels = []
        for f in self.funnels.values():
            deals = [d for d in self._live_deals() if d.funnel_id == f.id]
            funnels.append(
                {
                    "id": f.id,
                    "name": f.name,
                    "currencyId": f.currency_id,
                    **self._totals(deals),
                    "isPrivate": f.is_private,
                    "team": [],
                }
            )
        return {"success": True, "funnels": funnels}

    def _list_statuses(self, call: _Call) -> dict[str, Any]:
        funnel = self._funnel(call.params["funnelId"])
        statuses = []
        for s in self._statuses_of(funnel.id):
            deals = [d for d in self._live_deals() if d.status_id == s.id]
            statuses.append({"id": s.id, "name": s.name, **self._totals(deals), "createdAt": s.created_at})
        return {"success": True, "statuses": statuses}

    # ---- deals -----------------------------------------------------------------------------

    def _list_deals(self, call: _Call) -> dict[str, Any]:
        status = self._status(call.params["statusId"])
        limit, offset = _paging(call.query)
        deals = [d for d in self._live_deals() if d.status_id == status.id]
        return {"success": True, "deals": [d.to_weeek() for d in deals[offset : offset + limit]]}

    def _check_deal_body(self, body: Mapping[str, Any], *, create: bool) -> None:
        errs = _Errors()
        _unknown_fields(body, _DEAL_CREATE_FIELDS if create else _DEAL_PATCH_FIELDS, errs)
        if not create and not body:
            errs.add("body", "Send at least one field to change.")
        _text(body, "title", errs, max_len=_TITLE_MAX, required=create)
        _text(body, "description", errs, max_len=_DESCRIPTION_MAX)
        _amount(body, errs)
        if "winStatus" in body and not create and body["winStatus"] not in _WIN_STATUSES:
            errs.add("winStatus", f"The winStatus must be one of: {', '.join(_WIN_STATUSES)}.")
        _id_list(body, "assignees", self.users, errs)
        _id_list(body, "contacts", self.contacts, errs)
        if "customFields" in body:
            values = body["customFields"]
            if not isinstance(values, dict):
                errs.add("customFields", "The customFields must be an object keyed by custom field id.")
            else:
                for key, value in values.items():
                    at = _safe(f"customFields.{key}")
                    custom = self.custom_fields.get(key)
                    if custom is None:
                        errs.add(at, f"The deal custom field {_safe(key)} does not exist.")
                    elif problem := _custom_value_problem(custom.type, value):
                        errs.add(at, f"The {custom.type} custom field {problem}.")
        errs.check()

    def _create_deal(self, call: _Call) -> dict[str, Any]:
        status = self._status(call.params["statusId"])
        body = call.json()
        self._check_deal_body(body, create=True)
        deal = Deal(
            id=deal_id(self._next_deal),
            status_id=status.id,
            funnel_id=status.funnel_id,
            title=body["title"],
            amount=body.get("amount", 0),
            description=body.get("description"),
            assignees=list(body.get("assignees", [])),
            contacts=list(body.get("contacts", [])),
            custom_fields=dict(body.get("customFields", {})),
        )
        deal.updated_at = deal.created_at
        self._next_deal += 1
        deal.history.append({"at": deal.created_at, "action": "created", "statusId": status.id})
        self.deals[deal.id] = deal
        return {"success": True, "deal": deal.to_weeek()}

    def _get_deal(self, call: _Call) -> dict[str, Any]:
        return {"success": True, "deal": self._deal(call.params["dealId"]).to_weeek()}

    def _patch_deal(self, call: _Call) -> dict[str, Any]:
        deal = self._deal(call.params["dealId"])
        body = call.json()
        self._check_deal_body(body, create=False)
        for key, value in body.items():
            if key == "customFields":
                deal.custom_fields.update(value)
            else:
                attr = "win_status" if key == "winStatus" else key
                setattr(deal, attr, list(value) if isinstance(value, list) else value)
        deal.updated_at = _now()
        deal.history.append({"at": deal.updated_at, "action": "patched", "changes": dict(body)})
        return {"success": True}

    def _delete_deal(self, call: _Call) -> dict[str, Any]:
        deal = self._deal(call.params["dealId"])
        deal.deleted_at = deal.updated_at = _now()
        deal.history.append({"at": deal.deleted_at, "action": "deleted"})
        return {"success": True}

    def _move_deal(self, call: _Call) -> dict[str, Any]:
        deal = self._deal(call.params["dealId"])
        body = call.json()
        errs = _Errors()
        _unknown_fields(body, ("statusId",), errs)
        if "statusId" not in body:
            errs.add("statusId", "The statusId field is required.")
        elif not isinstance(body["statusId"], str):
            errs.add("statusId", "The statusId must be a string.")
        errs.check()
        status = self._status(body["statusId"])
        before = deal.status_id
        deal.status_id, deal.funnel_id = status.id, status.funnel_id
        deal.updated_at = _now()
        deal.history.append({"at": deal.updated_at, "action": "moved", "from": before, "to": status.id})
        return {"success": True}

    def _link_contact(self, call: _Call) -> dict[str, Any]:
        deal = self._deal(call.params["dealId"])
        body = call.json()
        errs = _Errors()
        _unknown_fields(body, ("contactId",), errs)
        if "contactId" not in body:
            errs.add("contactId", "The contactId field is required.")
        elif not isinstance(body["contactId"], str):
            errs.add("contactId", "The contactId must be a string.")
        errs.check()
        contact = self._contact(body["contactId"])
        already = contact.id in deal.contacts
        if not already:
            deal.contacts.append(contact.id)
            deal.updated_at = _now()
        deal.history.append(
            {"at": _now(), "action": "contact_linked", "contactId": contact.id, "alreadyLinked": already}
        )
        return {"success": True}

    # ---- contacts --------------------------------------------------------------------------

    def _list_contacts(self, call: _Call) -> dict[str, Any]:
        limit, offset = _paging(call.query)
        contacts = list(self.contacts.values())[offset : offset + limit]
        return {"success": True, "contacts": [c.to_weeek() for c in contacts]}

    @staticmethod
    def _check_contact_body(body: Mapping[str, Any], *, need_first_name: bool) -> None:
        errs = _Errors()
        _unknown_fields(body, _CONTACT_FIELDS, errs)
        if not body:
            errs.add("body", "Send at least one field.")
        _text(body, "firstName", errs, max_len=_NAME_MAX, required=need_first_name)
        _text(body, "lastName", errs, max_len=_NAME_MAX)
        _text(body, "middleName", errs, max_len=_NAME_MAX)
        checks: tuple[tuple[str, Callable[[str], bool], str], ...] = (
            ("emails", _looks_like_email, "a valid email address"),
            ("phones", _looks_like_phone, "an optional + and 10 to 15 digits"),
        )
        for name, valid, what in checks:
            if name not in body:
                continue
            values = body[name]
            if not isinstance(values, list):
                errs.add(name, f"The {name} must be an array.")
                continue
            seen: set[str] = set()
            for i, value in enumerate(values):
                at = f"{name}.{i}"
                if not isinstance(value, str):
                    errs.add(at, f"The {at} must be a string.")
                elif not valid(value):
                    errs.add(at, f"The {at} must be {what}.")
                elif value.lower() in seen:
                    errs.add(at, f"The {at} field has a duplicate value.")
                else:
                    seen.add(value.lower())
        errs.check()

    def _entries(self, kind: str, values: list[str], old: list[dict[str, str]]) -> list[dict[str, str]]:
        """``emails``/``phones`` entries: an unchanged value keeps its entry id."""
        ids = {e[kind]: e["id"] for e in old}
        out = []
        for value in values:
            if value not in ids:
                ids[value] = _sid(kind, str(self._next_entry))
                self._next_entry += 1
            out.append({"id": ids[value], kind: value})
        return out

    def _apply_contact(self, contact: Contact, body: Mapping[str, Any], *, replace: bool) -> None:
        if "firstName" in body:
            contact.first_name = body["firstName"]
        for key, attr in (("lastName", "last_name"), ("middleName", "middle_name")):
            if key in body or replace:
                setattr(contact, attr, body.get(key))
        if "emails" in body or replace:
            contact.emails = self._entries("email", body.get("emails", []), contact.emails)
        if "phones" in body or replace:
            contact.phones = self._entries("phone", body.get("phones", []), contact.phones)

    def _create_contact(self, call: _Call) -> dict[str, Any]:
        body = call.json()
        self._check_contact_body(body, need_first_name=True)
        contact = Contact(id=contact_id(self._next_contact), first_name=body["firstName"])
        contact.updated_at = contact.created_at
        self._next_contact += 1
        self._apply_contact(contact, body, replace=True)
        contact.history.append({"at": contact.created_at, "action": "created"})
        self.contacts[contact.id] = contact
        return {"success": True, "contact": contact.to_weeek()}

    def _get_contact(self, call: _Call) -> dict[str, Any]:
        return {"success": True, "contact": self._contact(call.params["contactId"]).to_weeek()}

    def _update_contact(self, call: _Call, *, replace: bool) -> dict[str, Any]:
        contact = self._contact(call.params["contactId"])
        body = call.json()
        self._check_contact_body(body, need_first_name=replace)
        self._apply_contact(contact, body, replace=replace)
        contact.updated_at = _now()
        contact.history.append(
            {"at": contact.updated_at, "action": "replaced" if replace else "patched", "changes": dict(body)}
        )
        return {"success": True, "contact": contact.to_weeek()}

    def _put_contact(self, call: _Call) -> dict[str, Any]:
        return self._update_contact(call, replace=True)

    def _patch_contact(self, call: _Call) -> dict[str, Any]:
        return self._update_contact(call, replace=False)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------

_BEARER_RE = re.compile(r"Bearer ([!-~]+)")


def _resolve(path: str) -> tuple[str, dict[str, str]] | None:
    """The route template and path parameters of a full path, or None outside the API."""
    if not path.startswith(API_PREFIX + "/"):
        return None
    rel = path[len(API_PREFIX) :]
    for template, pattern in _ROUTE_RES:
        if m := pattern.fullmatch(rel):
            return template, m.groupdict()
    return None


def create_weeek_app(tokens: set[str] | None = None, state: WeeekSandbox | None = None) -> FastAPI:
    """Build the sandbox app; ``tokens`` are the accepted Bearer tokens, ``None`` accepts any non-empty one.

    The state is reachable as ``app.state.sandbox``; the API is under :data:`API_PREFIX`.
    """
    if tokens is not None and any(not _BEARER_RE.fullmatch(f"Bearer {t}") for t in tokens):
        raise ValueError("a token is non-empty printable ASCII without spaces")
    sandbox = state if state is not None else WeeekSandbox()
    accepted = frozenset(tokens) if tokens is not None else None
    app = FastAPI(title="Weeek sandbox", version="1")
    app.state.sandbox = sandbox
    kit.add_control_routes(app, sandbox)

    # ---- Weeek's own control routes (the kit adds requests, faults, reset and latency) -------

    @app.get("/_sandbox/workspace", tags=["sandbox"])
    async def get_workspace() -> JSONResponse:
        """Funnels with their statuses, workspace users and deal custom fields, with their ids."""
        return JSONResponse(sandbox.workspace())

    @app.post("/_sandbox/funnels", status_code=201, tags=["sandbox"])
    async def add_funnel(spec: NewFunnel) -> JSONResponse:
        """Add a funnel with statuses (409 if the name is taken); answers it as ``/_sandbox/workspace`` does."""
        try:
            funnel = sandbox.add_funnel(spec.name, spec.statuses, spec.currencyId)
        except ValueError as e:
            return JSONResponse({"detail": str(e)}, status_code=409)
        [listed] = [f for f in sandbox.workspace()["funnels"] if f["id"] == funnel.id]
        return JSONResponse(listed, status_code=201)

    @app.post("/_sandbox/custom-fields", status_code=201, tags=["sandbox"])
    async def add_custom_field(spec: NewCustomField) -> JSONResponse:
        """Add a deal custom field (409 if the name is taken)."""
        try:
            custom = sandbox.add_custom_field(spec.name, spec.type)
        except ValueError as e:
            return JSONResponse({"detail": str(e)}, status_code=409)
        return JSONResponse(custom.to_dict(), status_code=201)

    @app.get("/_sandbox/contacts", tags=["sandbox"])
    async def list_contacts() -> JSONResponse:
        """All contacts in creation order, with their history."""
        with sandbox.lock:
            return JSONResponse([c.to_dict() for c in sandbox.contacts.values()])

    @app.get("/_sandbox/deals", tags=["sandbox"])
    async def list_deals() -> JSONResponse:
        """All deals in creation order, deleted ones included, with their history."""
        with sandbox.lock:
            return JSONResponse([d.to_dict() for d in sandbox.deals.values()])

    # ---- the API: one route, so an unknown path or method is answered (and recorded) like Weeek ----

    @app.api_route("/{path:path}", methods=list(_HTTP_METHODS), include_in_schema=False)
    async def weeek(request: Request, path: str) -> Response:
        full = request.url.path
        if full == "/_sandbox" or full.startswith("/_sandbox/"):
            return JSONResponse({"detail": "Not Found"}, status_code=404)  # a control typo, not traffic
        raw = await request.body()
        method = request.method
        resolved = _resolve(full)
        route, params = resolved if resolved is not None else (None, {})
        query_pairs = parse_qsl(request.url.query, keep_blank_values=True)
        first_values: dict[str, str] = {}
        for name, value in query_pairs:
            first_values.setdefault(name, value)
        auth = request.headers.getlist("authorization")
        match = _BEARER_RE.fullmatch(auth[0]) if len(auth) == 1 else None
        try:
            logged: Any = _lenient_json(raw) if raw else None
            malformed = False
        except ValueError:  # UnicodeDecodeError included
            logged, malformed = None, True
        rec = RecordedRequest(
            method=method,
            path=full,
            route=route,
            query=first_values,
            content_type=request.headers.get("content-type"),
            body=logged,
            malformed=malformed,
            token_present=bool(auth),
            token_valid=match is not None and (accepted is None or match.group(1) in accepted),
        )

        if route is None or method not in ROUTES[route]:
            allowed = ROUTES[route] if route is not None else ()
            error = (
                WeeekError(
                    405,
                    f"The {method} method is not supported for this route. "
                    f"Supported methods: {', '.join(allowed)}.",
                )
                if route is not None
                else WeeekError(404, "Route not found")
            )

            async def refuse() -> Response:
                rec.message = error.message
                headers = {"Allow": ", ".join(allowed)} if allowed else None
                return JSONResponse(error.body(), status_code=error.status, headers=headers)

            return await sandbox.serve(request, rec, refuse, may_fault=False)

        async def answer() -> Response:
            if not rec.token_valid:
                rec.message = "Unauthenticated."
                return JSONResponse({"success": False, "message": rec.message}, status_code=401)
            assert route is not None
            status, body = sandbox.call(
                method, route, params, query_pairs, request.headers.get("content-type"), raw
            )
            if not body.get("success"):
                rec.message, rec.errors = body.get("message"), body.get("errors")
            return JSONResponse(body, status_code=status)

        return await sandbox.serve(request, rec, answer)

    return app
