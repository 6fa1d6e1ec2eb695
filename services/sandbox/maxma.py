"""In-memory fake of the Maxma (CloudLoyalty) processing API, served over real HTTP with FastAPI.

Maxma methods are ``POST {base}/{method}`` with a JSON body and an ``X-Processing-Key`` header.
Business errors come back as HTTP 200 with ``{"errorCode", "description", "hint"?}``, which is
what the official PHP and Go SDKs expect. Shapes follow those SDKs (e.g. the reply ``card`` is an
integer and ``cardString`` a string, as in both SDKs' client models). Input is checked strictly
(the rules below), so the relay meets a fake at least as picky as the real API is taken to be.

Assumptions that are not confirmed by the SDKs, kept here so nobody mistakes them for facts:

* A missing or unknown ``X-Processing-Key`` is answered with HTTP 401 and errorCode 22.
* The bonus arithmetic of ``v2/set-order`` is a sandbox rule (see ``_BONUS_*``), not Maxma's.
* The account has the shops given to :class:`MaxmaSandbox` (default just ``"main"``); a shop code
  it does not know is errorCode 5. ``v2/set-order`` needs ``calculationQuery.shop`` with a
  non-empty ``code`` and ``name``; ``new-client``'s optional ``shop`` is checked the same way.
* ``cancel-order`` of a confirmed order is a refund: allowed, it takes back the pending bonuses the
  confirmation credited and returns the applied ones. A second ``confirm-order``, a confirm of a
  cancelled order and a second ``cancel-order`` answer 32; ``v2/set-order`` of a confirmed or
  cancelled order answers 32 too.
* Every string in a request body, keys included, must be clean text: no control or format character
  (Unicode categories Cc, Cf), no U+FFFD, no lone surrogate, no leftover ``{{placeholder}}``, and not
  empty or only whitespace (a real client leaves an unset field out, or sends null). Anything else is
  errorCode 2 with a hint naming the JSON path, checked before anything changes. JSON that is not
  strict (NaN, Infinity, invalid UTF-8, a byte order mark) is errorCode 2 as well.
* Order rows follow the SDK models: ``product.sku`` and ``product.title`` are required,
  ``product.blackPrice`` (and ``redPrice`` if given) is a number >= 0 with at most 2 decimal places
  (a JSON number or a decimal string), ``qty`` > 0, a row ``id`` is a string unique in the order;
  ``orderId`` is a string of at most 64 characters; ``executedAt`` is an RFC 3339 date-time with an
  offset.

Everything under ``/_sandbox/`` is a control API for tests, the demo and benchmarks; the real
Maxma has no such paths. Besides the kit's routes there are ``GET /_sandbox/clients``,
``GET /_sandbox/orders`` and ``GET``/``POST /_sandbox/shops``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import ROUND_DOWN, Decimal, InvalidOperation
from typing import Any, ClassVar, Literal, NoReturn

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.sandbox import kit
from services.sandbox.kit import ActiveFault, SandboxConnectionDroppedError

__all__ = [
    "DEFAULT_SHOPS",
    "ERROR_DESCRIPTIONS",
    "MAXMA_PATHS",
    "ActiveFault",
    "FaultSpec",
    "MaxmaSandbox",
    "RecordedRequest",
    "SandboxClient",
    "SandboxConnectionDroppedError",
    "SandboxOrder",
    "ShopSpec",
    "create_maxma_app",
]

#: The Maxma methods the sandbox implements, as paths relative to the base URL.
MAXMA_PATHS: tuple[str, ...] = (
    "/new-client",
    "/update-client",
    "/get-balance",
    "/v2/set-order",
    "/confirm-order",
    "/cancel-order",
)

#: Descriptions in Russian as the real API sends them (texts from the Go SDK where it has them).
ERROR_DESCRIPTIONS: dict[int, str] = {
    1: "Чек не обработан процессингом или обработан с ошибкой",
    2: "В запросе к процессингу обнаружена ошибка или неверный вид JSON",
    3: "Клиент не найден",
    4: "Аккаунт клиента заблокирован",
    5: "Магазин не найден",
    17: "Операция уже обработана",
    18: "Не переданы позиции заказа",
    20: "Номер телефона клиента не валиден",
    21: "Продажа не найдена",
    22: "Не передан ключ аутентификации",
    23: "Клиент не аутентифицирован",
    24: "Клиент с таким номером телефона уже существует",
    25: "Карта уже привязана к другому клиенту",
    29: "У клиента не задан номер телефона",
    30: "Клиент с таким внешним идентификатором уже существует",
    31: "Заказ не найден",
    32: "Заказ уже обработан",
    48: "Клиент с таким email уже существует",
    49: "Сервис временно недоступен",
}

#: The shop codes of a sandbox account unless it is given its own.
DEFAULT_SHOPS: tuple[str, ...] = ("main",)

_PHONE_RE = re.compile(r"\+[0-9]{10,15}")
# RFC 3339 date-time with a mandatory offset; the ranges are checked by datetime.fromisoformat.
_RFC3339_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})"
)
_DECIMAL_TEXT_RE = re.compile(r"[0-9]+(\.[0-9]+)?")
_PLACEHOLDER_RE = re.compile(r"\{\{.*?\}\}", re.DOTALL)
_ORDER_ID_MAX = 64
_MONEY_PLACES = Decimal("0.01")
_CARD_PREFIX = "2222000"
_KEY_HEADER = "x-processing-key"
# The sandbox's own bonus rule: up to half of an order may be paid with bonuses, 5 % is accrued.
_BONUS_MAX_APPLY_SHARE = Decimal("0.5")
_BONUS_COLLECT_SHARE = Decimal("0.05")


def _describe(code: int) -> str:
    return ERROR_DESCRIPTIONS.get(code, f"Ошибка, код #{code}")


class _MaxmaError(Exception):
    """A business error answered as HTTP 200 with errorCode, like the real API."""

    def __init__(self, code: int, hint: str | None = None) -> None:
        super().__init__(code, hint)
        self.code = code
        self.hint = hint

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"errorCode": self.code, "description": _describe(self.code)}
        if self.hint:
            out["hint"] = self.hint
        return out


# --------------------------------------------------------------------------------------------
# State records
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RecordedRequest(kit.RecordedRequest):
    """One request to a Maxma path, recorded on arrival and completed when answered."""

    method: str
    path: str
    headers: dict[str, str]  # lower-case names; X-Processing-Key removed
    body: Any  # parsed JSON, or None when the body was not JSON
    malformed: bool  # body was not valid JSON
    key_present: bool
    key_valid: bool
    error_code: int | None = None  # errorCode in the answer, if any

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; a lone surrogate in the body is shown as its ``\\udXXX`` escape."""
        out = super().to_dict()
        with contextlib.suppress(RecursionError):  # a very deep body is shown as it came
            out["body"] = _printable(self.body)
        return out


def _printable(value: Any) -> Any:
    """``value`` with lone surrogates escaped, since a JSON answer (UTF-8) cannot carry them."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()
        return value
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable(v) for v in value]
    return value


# camelCase Maxma field -> SandboxClient attribute, for fields a client may send.
_CLIENT_FIELDS: dict[str, str] = {
    "phoneNumber": "phone_number",
    "email": "email",
    "surname": "surname",
    "name": "name",
    "patronymicName": "patronymic_name",
    "fullName": "full_name",
    "gender": "gender",
    "birthdate": "birthdate",
    "card": "card",
    "externalId": "external_id",
    "isEmailSubscribed": "is_email_subscribed",
    "isPhoneSubscribed": "is_phone_subscribed",
    "extraFields": "extra_fields",
    "level": "level",
}


@dataclass
class SandboxClient:
    """A loyalty client; ``bonuses`` may be set directly by tests to fund orders."""

    id: int
    phone_number: str
    card: str
    external_id: str | None = None
    email: str | None = None
    surname: str | None = None
    name: str | None = None
    patronymic_name: str | None = None
    full_name: str | None = None
    gender: int = 0
    birthdate: str | None = None
    level: int = 1
    is_email_subscribed: bool = False
    is_phone_subscribed: bool = False
    extra_fields: dict[str, Any] = field(default_factory=dict)
    bonuses: int = 0
    pending_bonuses: int = 0
    reserved_bonuses: int = 0
    shop: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_maxma(self) -> dict[str, Any]:
        """The ``client`` object of new-client/update-client/get-balance replies."""
        out: dict[str, Any] = {"phoneNumber": self.phone_number}
        # Both SDKs model the reply card as an integer and cardString as its text.
        if self.card.isascii() and self.card.isdigit():
            out["card"] = int(self.card)
        out["cardString"] = self.card
        optional = {
            "externalId": self.external_id,
            "surname": self.surname,
            "name": self.name,
            "patronymicName": self.patronymic_name,
            "fullName": self.full_name or self._composed_full_name(),
            "birthdate": self.birthdate,
            "email": self.email,
        }
        out.update({k: v for k, v in optional.items() if v})
        out.update(
            {
                "gender": self.gender,
                "level": self.level,
                "isEmailSubscribed": self.is_email_subscribed,
                "isPhoneSubscribed": self.is_phone_subscribed,
                "bonuses": self.bonuses - self.reserved_bonuses,
                "pendingBonuses": self.pending_bonuses,
            }
        )
        if self.extra_fields:
            out["extraFields"] = dict(self.extra_fields)
        return out

    def client_bonuses(self) -> dict[str, int]:
        """The ``clientBonuses`` object of order replies."""
        return {
            "available": self.bonuses - self.reserved_bonuses,
            "pending": self.pending_bonuses,
            "reserved": self.reserved_bonuses,
        }

    def to_dict(self) -> dict[str, Any]:
        """Maxma shape plus sandbox bookkeeping, used by ``GET /_sandbox/clients``."""
        return {
            "id": self.id,
            **self.to_maxma(),
            "reservedBonuses": self.reserved_bonuses,
            "shop": self.shop,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }

    def _composed_full_name(self) -> str | None:
        parts = [p for p in (self.surname, self.name, self.patronymic_name) if p]
        return " ".join(parts) or None


@dataclass
class SandboxOrder:
    """An order placed by ``v2/set-order``; status moves new -> confirmed | cancelled, confirmed -> cancelled.

    ``confirmations`` and ``cancellations`` count the successful ``confirm-order`` and ``cancel-order``
    calls (a repeat answered 32 does not count), so a test can tell "confirmed once, then refunded".
    """

    order_id: str
    client_id: int | None
    shop: dict[str, Any]
    rows: list[dict[str, Any]]
    total: Decimal
    applied_bonuses: int
    collected_bonuses: int
    executed_at: str | None = None  # calculationQuery.executedAt of the set-order, as sent
    status: Literal["new", "confirmed", "cancelled"] = "new"
    confirmations: int = 0
    cancellations: int = 0
    confirmed_at: str | None = None  # executedAt of the confirm-order, as sent
    cancelled_at: str | None = None  # executedAt of the cancel-order, as sent
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form used by ``GET /_sandbox/orders``."""
        return {
            "orderId": self.order_id,
            "clientId": self.client_id,
            "status": self.status,
            "shop": self.shop,
            "rows": self.rows,
            "totalAmount": float(self.total),
            "appliedBonuses": self.applied_bonuses,
            "collectedBonuses": self.collected_bonuses,
            "executedAt": self.executed_at,
            "confirmations": self.confirmations,
            "cancellations": self.cancellations,
            "confirmedAt": self.confirmed_at,
            "cancelledAt": self.cancelled_at,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


class FaultSpec(kit.FaultSpec):
    """Body of ``POST /_sandbox/faults``: the kit's modes (:mod:`services.sandbox.kit`) and ``error_code``.

    ``error_code`` answers HTTP 200 ``{"errorCode": code, ...}``. Only ``delay`` lets the request reach
    the business logic, so the others never create data.
    """

    MODES: ClassVar[dict[str, tuple[str, ...]]] = {
        **kit.FaultSpec.MODES,
        "error_code": ("code", "description"),
    }
    REQUIRED: ClassVar[dict[str, str]] = {**kit.FaultSpec.REQUIRED, "error_code": "code"}
    FILTERS: ClassVar[tuple[str, ...]] = ("path",)

    code: int | None = Field(default=None, ge=1)  # error_code
    description: str | None = None  # error_code: overrides the standard description
    path: str | None = None  # only requests to this Maxma path, e.g. "/new-client"
    # Only requests whose JSON body has these values, at the top level or inside "client",
    # e.g. {"externalId": "42"}: a fault aimed at one client.
    match: dict[str, str] | None = None

    @model_validator(mode="after")
    def _check_path(self) -> FaultSpec:
        if self.path is not None:
            self.path = "/" + self.path.lstrip("/")
            # A typo would otherwise make the fault silently never fire.
            if self.path not in MAXMA_PATHS:
                raise ValueError(f"path must be one of {list(MAXMA_PATHS)}")
        return self


def _matches(body: Any, want: Mapping[str, str]) -> bool:
    if not isinstance(body, dict):
        return False
    inner = body.get("client")
    client: dict[str, Any] = inner if isinstance(inner, dict) else {}
    return all(str(body.get(k, client.get(k))) == v for k, v in want.items())


# --------------------------------------------------------------------------------------------
# Input validation helpers (all raise errorCode 2 with a hint naming the field's JSON path)
# --------------------------------------------------------------------------------------------


def _path(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _string_problem(text: str) -> str | None:
    """Why ``text`` is not clean text a real client would send, or None when it is."""
    for char in text:
        if char == "\ufffd":
            return "holds U+FFFD, the mark of text decoded from invalid bytes"
        category = unicodedata.category(char)
        if category == "Cs":
            return "holds a lone surrogate"
        if category in ("Cc", "Cf"):
            return f"holds the control or format character U+{ord(char):04X}"
    if _PLACEHOLDER_RE.search(text):
        return "holds a template placeholder {{...}} that was never filled in"
    if not text.strip():
        return "is empty or only whitespace"
    return None


def _check_strings(body: Any) -> None:
    """Answer 2 for the first string (a key or a value, at any depth) that is not clean text."""
    # Depth first in document order, without recursion: JSON may nest deeper than Python's stack.
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if problem := _string_problem(value):
                raise _MaxmaError(2, f"{where or 'request body'} {problem}")
        elif isinstance(value, dict):
            for key in value:
                if problem := _string_problem(key):
                    # !a: the key itself may not survive a UTF-8 answer (a lone surrogate).
                    raise _MaxmaError(2, f"the key {key!a} in {where or 'the request body'} {problem}")
            stack.extend((value[key], _path(where, key)) for key in reversed(list(value)))
        elif isinstance(value, list):
            stack.extend((value[i], _path(where, i)) for i in reversed(range(len(value))))


def _as_object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _MaxmaError(2, f"{name} must be an object")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, where: str = "") -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise _MaxmaError(2, f"{_path(where, key)} must be a string")
    return value or None


def _required_str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _MaxmaError(2, f"{_path(where, key)} is required (a non-empty string)")
    return value


def _opt_card(obj: Mapping[str, Any], key: str = "card", where: str = "") -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    # Some integrations send the card as a JSON number; the SDKs send a string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise _MaxmaError(2, f"{_path(where, key)} must be a string")
    return value.strip() or None


def _check_phone(phone: str) -> str:
    if not _PHONE_RE.fullmatch(phone):
        raise _MaxmaError(20, "phoneNumber must be '+' followed by 10-15 digits, e.g. +79998887766")
    return phone


def _normalize_birthdate(value: str, where: str) -> str:
    # Replies carry RFC 3339 date-times (the PHP SDK parses "Y-m-d\TH:i:sP").
    try:
        if len(value) == 10:
            return f"{date.fromisoformat(value).isoformat()}T00:00:00+00:00"
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise _MaxmaError(2, f"{where} must be YYYY-MM-DD or an ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat(timespec="seconds")


def _parse_client_fields(raw: Mapping[str, Any], where: str = "client") -> dict[str, Any]:
    """Validate the Maxma ``client`` object; return attribute name -> value for keys present."""
    out: dict[str, Any] = {}
    for key, attr in _CLIENT_FIELDS.items():
        if key not in raw:
            continue
        value = raw[key]
        at = _path(where, key)
        if key == "card":
            out[attr] = _opt_card(raw, where=where)
        elif key == "gender":
            if value is None:
                value = 0
            if isinstance(value, bool) or value not in (0, 1, 2):
                raise _MaxmaError(2, f"{at} must be 0, 1 or 2")
            out[attr] = value
        elif key == "level":
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise _MaxmaError(2, f"{at} must be a positive integer")
            out[attr] = value
        elif key in ("isEmailSubscribed", "isPhoneSubscribed"):
            if value is None:
                continue
            if not isinstance(value, bool):
                raise _MaxmaError(2, f"{at} must be a boolean")
            out[attr] = value
        elif key == "extraFields":
            out[attr] = dict(_as_object(value, at)) if value is not None else {}
        elif key == "birthdate":
            text = _opt_str(raw, key, where)
            out[attr] = _normalize_birthdate(text, at) if text else None
        else:
            out[attr] = _opt_str(raw, key, where)
    return out


def _shop(value: Any, where: str) -> dict[str, Any]:
    """The ``{code, name}`` shop object; whether the account has that shop is the caller's check."""
    shop = _as_object(value, where)
    _required_str(shop, "code", where)
    _required_str(shop, "name", where)
    return shop


def _to_decimal(value: Any, name: str) -> Decimal:
    """A number >= 0: a JSON number or a plain decimal string such as ``"1500.50"``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _MaxmaError(2, f"{name} must be a number")
    if isinstance(value, str) and not _DECIMAL_TEXT_RE.fullmatch(value):
        raise _MaxmaError(2, f"{name} must be a number (a decimal string holds only digits and a point)")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise _MaxmaError(2, f"{name} must be a number") from None
    if not number.is_finite() or number < 0:
        raise _MaxmaError(2, f"{name} must be a non-negative number")
    return number


def _to_money(value: Any, name: str) -> Decimal:
    """A price: a number >= 0 with at most 2 decimal places."""
    number = _to_decimal(value, name)
    try:
        exact = number == number.quantize(_MONEY_PLACES)
    except InvalidOperation:  # more digits than the decimal context holds
        exact = False
    if not exact:
        raise _MaxmaError(2, f"{name} must have at most 2 decimal places")
    return number


def _bonus_request(value: Any, name: str) -> int | Literal["auto"] | None:
    if value is None or value == "auto":
        return value  # type: ignore[no-any-return]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _MaxmaError(2, f"{name} must be a non-negative integer or 'auto'")
    return value


def _order_id(body: Mapping[str, Any]) -> str:
    value = _required_str(body, "orderId", "")
    if len(value) > _ORDER_ID_MAX:
        raise _MaxmaError(2, f"orderId must be at most {_ORDER_ID_MAX} characters")
    return value


def _executed_at(obj: Mapping[str, Any], where: str = "") -> str | None:
    """The optional ``executedAt``: an RFC 3339 date-time with an offset, returned as sent."""
    value = obj.get("executedAt")
    if value is None:
        return None
    if isinstance(value, str) and _RFC3339_RE.fullmatch(value):
        try:
            datetime.fromisoformat(value.upper())
        except ValueError:  # e.g. month 13
            pass
        else:
            return value
    raise _MaxmaError(
        2,
        f"{_path(where, 'executedAt')} must be an RFC 3339 date-time with an offset,"
        " e.g. 2024-05-01T10:00:00+03:00",
    )


def _parse_rows(value: Any, where: str) -> tuple[list[dict[str, Any]], list[Decimal]]:
    """Validate the order rows; return them and each row's sum (blackPrice * qty)."""
    if value is None or value == []:
        raise _MaxmaError(18)
    if not isinstance(value, list):
        raise _MaxmaError(2, f"{where} must be an array")
    rows: list[dict[str, Any]] = []
    sums: list[Decimal] = []
    seen_ids: set[str] = set()
    for i, raw_row in enumerate(value):
        at = _path(where, i)
        row = _as_object(raw_row, at)
        rows.append(row)
        product = _as_object(row.get("product"), f"{at}.product")
        _required_str(product, "sku", f"{at}.product")
        _required_str(product, "title", f"{at}.product")
        price = _to_money(product.get("blackPrice"), f"{at}.product.blackPrice")
        if product.get("redPrice") is not None:
            _to_money(product["redPrice"], f"{at}.product.redPrice")
        qty = _to_decimal(row.get("qty"), f"{at}.qty")
        if qty == 0:
            raise _MaxmaError(2, f"{at}.qty must be positive")
        row_id = row.get("id")
        if row_id is not None:
            if not isinstance(row_id, str):
                raise _MaxmaError(2, f"{at}.id must be a string")
            if row_id in seen_ids:
                raise _MaxmaError(2, f"{at}.id repeats an earlier row's id; row ids are unique in an order")
            seen_ids.add(row_id)
        sums.append(price * qty)
    return rows, sums


def _money(value: Decimal) -> float:
    return float(value.quantize(Decimal("0.01")))


def _discounts(bonuses: Decimal) -> dict[str, float]:
    return {
        "auto": 0.0,
        "manual": 0.0,
        "bonuses": _money(bonuses),
        "promocode": 0.0,
        "offer": 0.0,
        "rounding": 0.0,
    }


def _split(amount: int, weights: list[Decimal]) -> list[int]:
    """Split an integer amount over rows in proportion to their sums; remainder to the last row."""
    total = sum(weights, Decimal(0))
    if not weights or total == 0:
        return [0] * len(weights)
    parts = [int((Decimal(amount) * w / total).to_integral_value(ROUND_DOWN)) for w in weights]
    parts[-1] += amount - sum(parts)
    return parts


# --------------------------------------------------------------------------------------------
# The sandbox state
# --------------------------------------------------------------------------------------------


def _shop_code(code: str) -> str:
    if not isinstance(code, str) or (problem := _string_problem(code)):
        raise ValueError(f"a shop code must be clean, non-empty text: {code!a} {problem or 'is not text'}")
    return code


class ShopSpec(BaseModel):
    """Body of ``POST /_sandbox/shops``: a shop code the account gets to know."""

    model_config = ConfigDict(extra="forbid")

    code: str

    @field_validator("code")
    @classmethod
    def _clean_code(cls, code: str) -> str:
        return _shop_code(code)


class MaxmaSandbox(kit.SandboxState[RecordedRequest, FaultSpec]):
    """In-memory Maxma: shops, clients, orders, recorded requests and injected faults.

    ``shops`` are the shop codes the account has (default :data:`DEFAULT_SHOPS`); a request naming
    another shop answers 5. They are the account's configuration, so :meth:`reset` keeps them, those
    added later by :meth:`add_shop` included.

    Usable directly in tests (``sandbox.clients``, ``sandbox.add_fault(...)``,
    ``await sandbox.wait_for_requests(...)``) and over HTTP via :func:`create_maxma_app`.
    """

    fault_spec = FaultSpec

    def __init__(self, shops: Iterable[str] | None = None) -> None:
        super().__init__()
        if isinstance(shops, str):
            raise TypeError("shops is a collection of shop codes, not one code")
        self.shops: set[str] = {_shop_code(c) for c in (DEFAULT_SHOPS if shops is None else shops)}
        self.clients: dict[int, SandboxClient] = {}
        self.orders: dict[str, SandboxOrder] = {}
        self._reset_indexes()

    def _reset_indexes(self) -> None:
        self._by_phone: dict[str, SandboxClient] = {}
        self._by_card: dict[str, SandboxClient] = {}
        self._by_external_id: dict[str, SandboxClient] = {}
        self._by_email: dict[str, SandboxClient] = {}
        self._next_client_id = 1
        self._next_card = 1

    # ---- control ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget clients, orders, recorded requests, faults and latency; restart counters. Shops stay."""
        with self.lock:
            self.clients.clear()
            self.orders.clear()
            self._reset_indexes()
            super().reset()

    def add_shop(self, code: str) -> None:
        """Give the account one more shop (adding a known code again changes nothing)."""
        with self.lock:
            self.shops.add(_shop_code(code))

    def _known_shop(self, shop: Mapping[str, Any], where: str) -> None:
        if shop["code"] not in self.shops:
            raise _MaxmaError(5, f"{where}.code: the account has no shop with this code")

    def find_client(
        self,
        *,
        phone_number: str | None = None,
        card: str | None = None,
        external_id: str | None = None,
        email: str | None = None,
    ) -> SandboxClient | None:
        """Look a client up by any unique key."""
        with self.lock:
            if phone_number is not None:
                return self._by_phone.get(phone_number)
            if card is not None:
                return self._by_card.get(card)
            if external_id is not None:
                return self._by_external_id.get(external_id)
            if email is not None:
                return self._by_email.get(email.lower())
        return None

    def fault_applies(self, spec: FaultSpec, rec: RecordedRequest) -> bool:
        return super().fault_applies(spec, rec) and (spec.match is None or _matches(rec.body, spec.match))

    def fault_response(self, spec: FaultSpec, rec: RecordedRequest) -> Response:
        assert spec.code is not None  # error_code, the one mode the kit does not answer
        rec.error_code = spec.code
        return JSONResponse({"errorCode": spec.code, "description": spec.description or _describe(spec.code)})

    # ---- clients ---------------------------------------------------------------------------

    def _index(self, client: SandboxClient) -> None:
        self._by_phone[client.phone_number] = client
        self._by_card[client.card] = client
        if client.external_id:
            self._by_external_id[client.external_id] = client
        if client.email:
            self._by_email[client.email.lower()] = client

    def _unindex(self, client: SandboxClient) -> None:
        self._by_phone.pop(client.phone_number, None)
        self._by_card.pop(client.card, None)
        if client.external_id:
            self._by_external_id.pop(client.external_id, None)
        if client.email:
            self._by_email.pop(client.email.lower(), None)

    def _generate_card(self) -> str:
        while True:
            card = f"{_CARD_PREFIX}{self._next_card:06d}"
            self._next_card += 1
            if card not in self._by_card:
                return card

    def _check_unique(self, fields: Mapping[str, Any], owner: SandboxClient | None) -> None:
        """Answer 24/30/25/48 when a unique value already belongs to another client."""
        checks: tuple[tuple[str, dict[str, SandboxClient], int], ...] = (
            ("phone_number", self._by_phone, 24),
            ("external_id", self._by_external_id, 30),
            ("card", self._by_card, 25),
            ("email", self._by_email, 48),
        )
        for attr, index, code in checks:
            value = fields.get(attr)
            if not value:
                continue
            other = index.get(value.lower() if attr == "email" else value)
            if other is not None and other is not owner:
                raise _MaxmaError(code)

    def _find(self, ident: Mapping[str, Any], where: str = "") -> SandboxClient:
        """Find a client by phoneNumber | card | externalId (first one given wins)."""
        phone = _opt_str(ident, "phoneNumber", where)
        card = _opt_card(ident, where=where)
        external_id = _opt_str(ident, "externalId", where)
        if phone is not None:
            found = self._by_phone.get(_check_phone(phone))
        elif card is not None:
            found = self._by_card.get(card)
        elif external_id is not None:
            found = self._by_external_id.get(external_id)
        else:
            raise _MaxmaError(
                2, f"identify the client{f' in {where}' if where else ''} by phoneNumber, card or externalId"
            )
        if found is None:
            raise _MaxmaError(3)
        return found

    def _balance_reply(self, client: SandboxClient) -> dict[str, Any]:
        available = client.bonuses - client.reserved_bonuses
        return {"client": client.to_maxma(), "bonuses": [{"amount": available}] if available else []}

    def _op_new_client(self, body: dict[str, Any]) -> dict[str, Any]:
        fields = _parse_client_fields(_as_object(body.get("client"), "client"))
        shop = body.get("shop")
        if shop is not None:
            shop = _shop(shop, "shop")
        phone = fields.get("phone_number")
        if not phone:
            raise _MaxmaError(29)
        _check_phone(phone)
        if shop is not None:
            self._known_shop(shop, "shop")
        self._check_unique(fields, owner=None)
        # Validation is over: from here on the request succeeds, so the side effect is safe.
        if not fields.get("card"):
            fields["card"] = self._generate_card()
        fields = {k: v for k, v in fields.items() if v is not None}
        client = SandboxClient(id=self._next_client_id, shop=shop, **fields)
        self._next_client_id += 1
        self.clients[client.id] = client
        self._index(client)
        return self._balance_reply(client)

    def _op_update_client(self, body: dict[str, Any]) -> dict[str, Any]:
        # The client is named at the top level; "client" holds the new values (may be empty: no change).
        fields = _parse_client_fields(_as_object(body.get("client"), "client"))
        if "phone_number" in fields:
            if not fields["phone_number"]:
                raise _MaxmaError(29)
            _check_phone(fields["phone_number"])
        client = self._find(body)
        if "card" in fields and not fields["card"]:
            fields.pop("card")  # a client always keeps a card; unbinding is not modelled
        self._check_unique(fields, owner=client)
        self._unindex(client)
        for attr, value in fields.items():
            if attr == "extra_fields":
                client.extra_fields.update(value)  # Maxma merges extra fields key by key
            else:
                setattr(client, attr, value)
        client.updated_at = time.time()
        self._index(client)
        return self._balance_reply(client)

    def _op_get_balance(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._balance_reply(self._find(body))

    # ---- orders ----------------------------------------------------------------------------

    def _op_set_order(self, body: dict[str, Any]) -> dict[str, Any]:
        # Shape first (2, 18), then what the account knows (5 shop, 3 client, 32 order).
        order_id = _order_id(body)
        query = _as_object(body.get("calculationQuery"), "calculationQuery")
        shop = _shop(query.get("shop"), "calculationQuery.shop")
        executed_at = _executed_at(query, "calculationQuery")
        rows, sums = _parse_rows(query.get("rows"), "calculationQuery.rows")
        apply_req = _bonus_request(query.get("applyBonuses"), "calculationQuery.applyBonuses")
        collect_req = _bonus_request(query.get("collectBonuses"), "calculationQuery.collectBonuses")
        self._known_shop(shop, "calculationQuery.shop")
        client = None
        if query.get("client") is not None:
            where = "calculationQuery.client"
            client = self._find(_as_object(query["client"], where), where)

        existing = self.orders.get(order_id)
        if existing is not None and existing.status != "new":
            raise _MaxmaError(32, f"the order is already {existing.status}")
        total = sum(sums, Decimal(0))
        # A repeated set-order replaces the order, so its old reservation must not count.
        previous_reservation = existing.applied_bonuses if existing and existing.client_id else 0
        if client is not None:
            own = previous_reservation if existing and existing.client_id == client.id else 0
            available = client.bonuses - client.reserved_bonuses + own
            cap = int((total * _BONUS_MAX_APPLY_SHARE).to_integral_value(ROUND_DOWN))
            max_to_apply = max(0, min(available, cap))
            if apply_req is None:
                applied = 0
            elif apply_req == "auto":
                applied = max_to_apply
            else:
                applied = min(apply_req, max_to_apply)
            if collect_req is None or collect_req == "auto":
                collected = int(((total - applied) * _BONUS_COLLECT_SHARE).to_integral_value(ROUND_DOWN))
            else:
                collected = collect_req
        else:
            max_to_apply = applied = collected = 0

        if existing is not None and existing.client_id is not None:
            self.clients[existing.client_id].reserved_bonuses -= existing.applied_bonuses
        if client is not None:
            client.reserved_bonuses += applied
        order = SandboxOrder(
            order_id=order_id,
            client_id=client.id if client else None,
            shop=dict(shop),
            rows=list(rows),
            total=total,
            applied_bonuses=applied,
            collected_bonuses=collected,
            executed_at=executed_at,
        )
        if existing is not None:
            order.created_at = existing.created_at
        self.orders[order_id] = order

        applied_split = _split(applied, sums)
        collected_split = _split(collected, sums)
        result_rows = []
        for row, a, c in zip(rows, applied_split, collected_split, strict=True):
            result_row: dict[str, Any] = {
                "totalDiscount": float(a),
                "discounts": _discounts(Decimal(a)),
                "bonuses": {"applied": a, "collected": c},
            }
            if isinstance(row.get("id"), str):
                result_row["id"] = row["id"]
            result_rows.append(result_row)
        reply: dict[str, Any] = {
            "calculationResult": {
                "rows": result_rows,
                "summary": {
                    "totalDiscount": float(applied),
                    "discounts": _discounts(Decimal(applied)),
                    "prepaidAmount": 0.0,
                },
                "bonuses": {"applied": applied, "collected": collected, "maxToApply": max_to_apply},
            }
        }
        if client is not None:
            reply["clientBonuses"] = client.client_bonuses()
        return reply

    def _order_for_update(self, body: dict[str, Any]) -> tuple[SandboxOrder, str | None]:
        """The order named by ``orderId`` (31 if none) and the optional ``executedAt``."""
        order_id = _order_id(body)
        executed_at = _executed_at(body)
        order = self.orders.get(order_id)
        if order is None:
            raise _MaxmaError(31)
        return order, executed_at

    def _order_reply(self, order: SandboxOrder, applied: int, collected: int) -> dict[str, Any]:
        client = self.clients.get(order.client_id) if order.client_id is not None else None
        return {
            "operationResult": {
                "appliedBonuses": applied,
                "collectedBonuses": collected,
                "remainingAmount": _money(order.total - applied),
            },
            "clientBonuses": (
                client.client_bonuses() if client else {"available": 0, "pending": 0, "reserved": 0}
            ),
        }

    def _op_confirm_order(self, body: dict[str, Any]) -> dict[str, Any]:
        order, executed_at = self._order_for_update(body)
        if order.status != "new":
            raise _MaxmaError(32, f"the order is already {order.status}")
        client = self.clients.get(order.client_id) if order.client_id is not None else None
        if client is not None:
            client.reserved_bonuses -= order.applied_bonuses
            client.bonuses -= order.applied_bonuses
            client.pending_bonuses += order.collected_bonuses
        order.status = "confirmed"
        order.confirmations += 1
        order.confirmed_at = executed_at
        order.updated_at = time.time()
        return self._order_reply(order, order.applied_bonuses, order.collected_bonuses)

    def _op_cancel_order(self, body: dict[str, Any]) -> dict[str, Any]:
        order, executed_at = self._order_for_update(body)
        if order.status == "cancelled":
            raise _MaxmaError(32, "the order is already cancelled")
        client = self.clients.get(order.client_id) if order.client_id is not None else None
        if client is not None:
            if order.status == "new":
                client.reserved_bonuses -= order.applied_bonuses
            else:  # confirmed: a refund takes back what the confirmation did
                client.pending_bonuses -= order.collected_bonuses
                client.bonuses += order.applied_bonuses
        order.status = "cancelled"
        order.cancellations += 1
        order.cancelled_at = executed_at
        order.updated_at = time.time()
        return self._order_reply(order, 0, 0)

    def _operation(self, path: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
        return {
            "/new-client": self._op_new_client,
            "/update-client": self._op_update_client,
            "/get-balance": self._op_get_balance,
            "/v2/set-order": self._op_set_order,
            "/confirm-order": self._op_confirm_order,
            "/cancel-order": self._op_cancel_order,
        }[path]

    def run_operation(self, path: str, body: Any) -> dict[str, Any]:
        """Execute one Maxma method on the state, as if it arrived with a valid key.

        Returns the reply body: a success object or ``{"errorCode", "description", "hint"?}``.
        Either the whole operation applies or, on an error, nothing changes. Every string in the
        body is checked (see the module docstring) before the method looks at anything.
        """
        with self.lock:
            try:
                request = _as_object(body, "request body")
                _check_strings(request)
                return self._operation(path)(request)
            except _MaxmaError as exc:
                return exc.body()


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 without a byte order mark, no NaN or Infinity; ValueError otherwise."""
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def create_maxma_app(
    processing_keys: set[str] | None = None,
    state: MaxmaSandbox | None = None,
    shops: Iterable[str] | None = None,
) -> FastAPI:
    """Build the sandbox app; ``processing_keys=None`` accepts any non-empty key.

    ``shops`` are the account's shop codes for the state this builds (default :data:`DEFAULT_SHOPS`);
    a ``state`` passed in brings its own. The state is reachable as ``app.state.sandbox``.
    """
    if state is not None and shops is not None:
        raise ValueError("give the shops to the MaxmaSandbox passed as state")
    sandbox = state if state is not None else MaxmaSandbox(shops)
    keys = frozenset(processing_keys) if processing_keys is not None else None
    app = FastAPI(title="Maxma sandbox", version="1")
    app.state.sandbox = sandbox
    kit.add_control_routes(app, sandbox)

    async def serve_maxma(request: Request, path: str) -> Response:
        raw = await request.body()
        key = request.headers.get(_KEY_HEADER)
        try:
            body: Any = _parse_json(raw)
            malformed = False
        except ValueError:  # UnicodeDecodeError included
            body, malformed = None, True
        rec = RecordedRequest(
            method=request.method,
            path=path,
            headers={k: v for k, v in request.headers.items() if k != _KEY_HEADER},
            body=body,
            malformed=malformed,
            key_present=bool(key),
            key_valid=bool(key) and (keys is None or key in keys),
        )
        return await sandbox.serve(request, rec, lambda: _answer(rec))

    async def _answer(rec: RecordedRequest) -> Response:
        if not rec.key_valid:
            hint = "X-Processing-Key header is missing" if not rec.key_present else "unknown X-Processing-Key"
            rec.error_code = 22
            return JSONResponse(_MaxmaError(22, hint).body(), status_code=401)
        if rec.malformed:
            rec.error_code = 2
            return JSONResponse(_MaxmaError(2, "request body is not valid JSON").body())
        reply = sandbox.run_operation(rec.path, rec.body)
        code = reply.get("errorCode")
        rec.error_code = code if isinstance(code, int) else None
        return JSONResponse(reply)

    def _endpoint(path: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await serve_maxma(request, path)

        endpoint.__name__ = "maxma_" + path.strip("/").replace("/", "_").replace("-", "_")
        return endpoint

    for maxma_path in MAXMA_PATHS:
        app.add_api_route(maxma_path, _endpoint(maxma_path), methods=["POST"], tags=["maxma"])

    # ---- Maxma's own control routes (the kit adds requests, faults, reset and latency) ------

    @app.get("/_sandbox/clients", tags=["sandbox"])
    async def list_clients() -> JSONResponse:
        """All clients in creation order."""
        with sandbox.lock:
            return JSONResponse([c.to_dict() for c in sandbox.clients.values()])

    @app.get("/_sandbox/orders", tags=["sandbox"])
    async def list_orders() -> JSONResponse:
        """All orders in creation order, with how often each was confirmed and cancelled."""
        with sandbox.lock:
            return JSONResponse([o.to_dict() for o in sandbox.orders.values()])

    @app.get("/_sandbox/shops", tags=["sandbox"])
    async def list_shops() -> JSONResponse:
        """The account's shop codes, sorted."""
        with sandbox.lock:
            return JSONResponse(sorted(sandbox.shops))

    @app.post("/_sandbox/shops", status_code=201, tags=["sandbox"])
    async def add_shop(spec: ShopSpec) -> JSONResponse:
        """Give the account one more shop; answers the shop and every code now known (422 if invalid)."""
        sandbox.add_shop(spec.code)
        with sandbox.lock:
            return JSONResponse({"code": spec.code, "shops": sorted(sandbox.shops)}, status_code=201)

    return app
