"""Pure functions: a raw Klientiks request to a typed event. No I/O, no clock, no settings object."""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import TypeVar
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import phonenumbers

from services.common.events import (
    Appointment,
    Attribution,
    Client,
    CloudEvent,
    EventData,
    EventName,
    Invoice,
    Person,
    kafka_key,
    source_uri,
)
from services.ingest.inbox import InboxRecord


class ParamsError(ValueError):
    """The request body cannot be read as parameters."""


class JsonValue(str):
    """A JSON object or array from a JSON body, as its JSON text: only ``services`` may be a list."""


# Seed templates are copied with mistakes: `{appointment.status}}`, `{{#new_data}}{{status}}{{/new_data}}`, ...
_PLACEHOLDER = re.compile(r"\{\{|\}\}|^\{[#/^]?[A-Za-z_][A-Za-z0-9_.]*\}$")
_TRUE = {"1", "true", "t", "yes", "y", "on", "да", "д", "истина", "оплачен", "оплачено", "оплачена", "paid"}
_FALSE = {
    "0", "false", "f", "no", "n", "off", "нет", "н", "ложь", "null", "none",
    "не оплачен", "не оплачено", "не оплачена", "неоплачен", "неоплачено", "неоплачена", "unpaid", "not paid",
}  # fmt: skip
_CLICK_IDS = {"gclid", "yclid", "fbclid", "ymclid", "ttclid", "vkclid", "msclkid", "ad_id", "adid"}

# ASCII digits only: `\d` would also take Arabic-Indic or full-width digits no Klientiks field ever holds.
_DATE_PART = (
    r"(?:(?P<y>[0-9]{4})-(?P<m>[0-9]{1,2})-(?P<d>[0-9]{1,2})"
    r"|(?P<d2>[0-9]{1,2})(?P<sep>[./])(?P<m2>[0-9]{1,2})(?P=sep)(?P<y2>[0-9]{4}))"
)
_TIME_PART = r"(?P<H>[0-9]{1,2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?:[.,](?P<frac>[0-9]{1,9}))?)?"
_OFFSET_PART = r"(?P<tz>[Zz]|[+-][0-9]{2}(?::?[0-9]{2})?)"
_DATETIME = re.compile(rf"{_DATE_PART}(?:(?:[Tt]|[ \t]+){_TIME_PART}[ \t]*{_OFFSET_PART}?)?")
_TIME = re.compile(_TIME_PART)
# Whole groups of three only, so `12 34` (two numbers?) is not read as 1234; no exponent, NaN or Infinity.
_GROUP_SEP = "[ \u00a0\u2007\u2009\u202f]"
_MONEY = re.compile(
    rf"(?P<sign>[-\u2212])?(?P<int>[0-9]{{1,3}}(?:{_GROUP_SEP}[0-9]{{3}})+|[0-9]+)(?:[.,](?P<frac>[0-9]+))?"
    r"\s*(?:₽|руб\.?|р\.?|rub)?",
    re.IGNORECASE,
)
_PATRONYMIC = re.compile(r"(?:вич|вна|ична|инична|ич)$", re.IGNORECASE)
_NAME_WORD = re.compile(r"[^\W\d_]+(?:[-'’][^\W\d_]+)*")

# Parameters the parser knows; anything else goes to `extra`.
KNOWN = {
    "client_id", "client_phone", "client_name", "client_first_name", "client_patron_name",
    "client_second_name", "client_deleted", "client_email", "appointment_id", "appointment_date",
    "appointment_time", "executor_name", "executor_phone", "services", "appointment_total_cost",
    "user_position", "appointment_amount", "appointment_paid", "appointment_name", "appointment_description",
    "appointment_paid_sum", "appointment_left_to_pay", "appointment_account_id", "appointment_created",
    "appointment_appointment_id", "appointment_status", "status", "ip", "user_agent", "executor_id",
    "author_id", "appointment_abonement",
}  # fmt: skip

# Klientiks ids are integers: anything else (a sign, spaces, an invisible character) is not one of its ids.
_ID = re.compile(r"[0-9]{1,20}")
IDS = frozenset({
    "client_id", "appointment_id", "appointment_appointment_id", "appointment_account_id", "executor_id", "author_id",
})  # fmt: skip
# Longest value kept, in characters after cleaning; a longer one is invalid, never cut short. A full name
# has room for its three parts joined.
CAPS: dict[str, int] = {
    "client_name": 302, "client_first_name": 100, "client_second_name": 100, "client_patron_name": 100,
    "executor_name": 300, "client_email": 254, "appointment_name": 300, "appointment_description": 2000,
    "services": 4000, "user_position": 200, "user_agent": 1000, "ip": 45,
    "appointment_status": 64, "status": 64,
}  # fmt: skip
SHORT_CAP = 64  # phones, dates, times, money, flags
TEXT_CAP = 1000  # attribution and parameters the parser does not know
SERVICE_CAP = 200  # one service's name
NAME_CAP = 64  # a parameter's name
_SHORT = {
    "client_phone", "executor_phone", "client_deleted", "appointment_paid", "appointment_date",
    "appointment_time", "appointment_created", "appointment_total_cost", "appointment_amount",
    "appointment_paid_sum", "appointment_left_to_pay", "appointment_abonement",
}  # fmt: skip
# Never kept in text: controls, format characters (zero-width, bidi controls, BOM), private use, unassigned.
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cn"})


def cap_of(key: str) -> int:
    """How many characters the value of parameter ``key`` may have."""
    if key in _SHORT:
        return SHORT_CAP
    return CAPS.get(key, TEXT_CAP)


def clean_text(raw: str) -> str | None:
    """Text as it is shown: NFC, invisible characters dropped, each run of whitespace one space, trimmed.

    None when it is not text at all: a lone surrogate, which is what an undecodable byte or a ``\\ud800``
    escape becomes, or U+FFFD, which an earlier decoder left for bytes it could not read. Whatever else
    comes back is printable (``str.isprintable``), possibly empty.
    """
    if "\ufffd" in raw:
        return None
    if raw.isprintable() and "  " not in raw and unicodedata.is_normalized("NFC", raw):
        return raw.strip()  # the common case, in C: cheap on the request path (no surrogate is printable)
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        return None
    kept = (
        " " if ch.isspace() else ch
        for ch in raw
        if ch.isspace() or unicodedata.category(ch) not in _INVISIBLE
    )
    # NFC after dropping: a dropped character between a letter and its accent kept them from composing.
    return " ".join(unicodedata.normalize("NFC", "".join(kept)).split())


def clean_id(raw: object) -> str | None:
    """A Klientiks id (digits; a JSON integer too), else None."""
    if isinstance(raw, bool) or raw is None:
        return None
    text = str(raw).strip()
    return text if _ID.fullmatch(text) else None


def clean_value(key: str, raw: str) -> str | None:
    """The value of parameter ``key`` cleaned (:func:`clean_text`); None when it is not text."""
    if isinstance(raw, JsonValue) and key != "services":
        return None  # an object or array where a scalar belongs
    if key == "services" and not raw.lstrip().startswith("["):
        raw = re.sub(r"[\r\n]+", ";", raw)  # a line per service: the lines must survive the cleaning
    return clean_text(raw)


def fits(key: str, value: str, raw: str) -> bool:
    """Whether a cleaned, non-empty ``value`` (from ``raw``) is acceptable data for parameter ``key``."""
    if key in IDS:
        # Cleaning must not have changed it: an id with an invisible character in it is not that id.
        return bool(_ID.fullmatch(value)) and value == raw.strip()
    if len(value) > cap_of(key):
        return False
    if key == "ip":
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return False
        # `fe80::1%eth0`: a zone names an interface of the client's machine, meaningless to anyone else.
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            return False
    return True


def request_params(query: str, content_type: str | None, body: bytes) -> list[tuple[str, str]]:
    """Query-string pairs, then form or JSON body pairs, in the order they came.

    Bytes that are not UTF-8 in a query or form value become lone surrogates (``surrogateescape``): the
    value is kept for the record and later listed as invalid, never decoded into U+FFFD look-alikes.
    """
    pairs = parse_qsl(query, keep_blank_values=True, errors="surrogateescape")
    if not body.strip():
        return pairs
    ctype = (content_type or "").split(";")[0].strip().lower()
    text = body.decode("utf-8", "surrogateescape")
    if ctype == "application/json" or (not ctype and text.lstrip().startswith("{")):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ParamsError("the body is not UTF-8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ParamsError(f"the JSON body is malformed at line {e.lineno}, column {e.colno}") from None
        except (ValueError, RecursionError):  # an integer over 4,300 digits; arrays nested thousands deep
            raise ParamsError("the JSON body is too deeply nested or has a number too long to read") from None
        if not isinstance(obj, dict):
            raise ParamsError("the JSON body must be an object of parameters")
        for k, v in obj.items():
            if v is None:
                v = ""
            elif isinstance(v, dict | list):
                v = JsonValue(json.dumps(v, ensure_ascii=False))
            elif not isinstance(v, str):
                v = json.dumps(v)
            try:
                k.encode("utf-8"), v.encode("utf-8")
            except UnicodeEncodeError:
                # `\ud800` escapes decode to a lone surrogate: not text, and nothing can store or send it.
                raise ParamsError(f"the JSON body has a lone surrogate escape in {_shown(k)!r}") from None
            pairs.append((k, v))
        return pairs
    if ctype in ("", "application/x-www-form-urlencoded", "text/plain"):
        pairs.extend(parse_qsl(text, keep_blank_values=True))
        return pairs
    raise ParamsError(f"unsupported content type {ctype!r}; send a query string, a form or a JSON object")


def _shown(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[:64]


def canonical_key(key: str) -> str:
    """`appointment.time` (a seed typo) -> `appointment_time`; case and spaces do not matter."""
    return key.strip().lower().replace(".", "_").replace("-", "_")


def is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value.strip()))


# In ``missing`` for a parameter whose name is not text or is too long to be one.
BAD_NAME = "invalid_parameter_name"


@dataclass
class Params:
    """Merged parameters; empty values and leftover placeholders are recorded as missing, never as data."""

    values: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # field -> "empty" | "placeholder" | "invalid"

    @classmethod
    def of(cls, pairs: list[tuple[str, str]], keys: frozenset[str] | None = None) -> Params:
        """The parameters, or only those named in ``keys`` (all that the ingest API needs for a key)."""
        p = cls()
        for raw_key, raw_value in pairs:
            name = clean_text(raw_key)
            key = canonical_key(name) if name else ""
            if keys is not None and key not in keys:
                continue
            if len(key) > NAME_CAP or (raw_key.strip() and not key):
                p.missing.setdefault(BAD_NAME, "invalid")
                continue
            if not key:
                continue
            if key in p.values:  # the first value wins, as in most web frameworks
                continue
            value = clean_value(key, raw_value)
            if value is None:
                p.missing.setdefault(key, "invalid")
            elif is_placeholder(value):
                p.missing.setdefault(key, "placeholder")
            elif not value:
                p.missing.setdefault(key, "empty")
            elif not fits(key, value, raw_value):
                p.missing.setdefault(key, "invalid")
            else:
                p.values[key] = value
                p.missing.pop(key, None)
        return p

    def get(self, key: str) -> str | None:
        return self.values.get(key)


ROUTING = frozenset({"client_id", "appointment_id"})  # what :func:`routing_key` reads


def routing_key(source: str, params: Params) -> str:
    return kafka_key(source, params.get("client_id"), params.get("appointment_id"))


def normalize_phone(raw: str, region: str) -> str | None:
    """E.164 of a valid number, else None. Klientiks sends `79991234567`, `8 (999) 123-45-67`, `+7 999 ...`.

    Only `is_valid_number` counts: a merely possible number (right length, unassigned block) is refused.
    """
    digits = re.sub(r"\D", "", raw)
    if len(digits) < 7:
        return None
    candidates = [raw] if raw.strip().startswith("+") else [raw, "+" + digits]
    for c in candidates:
        try:
            n = phonenumbers.parse(c, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(n):
            e164 = str(phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164))
            # libphonenumber accepts a few 16-digit service numbers (+49 180 ...); E.164 stops at 15 digits.
            return e164 if len(e164) <= 16 else None
    return None


def parse_bool(raw: str) -> bool | None:
    """`1/0`, `true/false`, `да/нет`, `yes/no`, `on/off`, `оплачен/не оплачен`, `paid/unpaid`, ...; else None."""
    v = " ".join(raw.lower().split())
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def parse_money(raw: str) -> Decimal | None:
    """`1500`, `1 500,50`, `1500.5 руб.`, `1 500 ₽`, `-200` (a refund) as given, scale kept; else None."""
    m = _MONEY.fullmatch(raw.strip())
    if m is None:
        return None
    whole = re.sub(_GROUP_SEP, "", m["int"])
    return Decimal(("-" if m["sign"] else "") + whole + ("." + m["frac"] if m["frac"] else ""))


def _time_of(m: re.Match[str]) -> time:
    """The time groups of a match; ValueError when out of range (`25:00`)."""
    micro = int((m["frac"] or "")[:6].ljust(6, "0"))
    return time(int(m["H"]), int(m["M"]), int(m["S"] or 0), micro)


def _date_and_time(raw: str) -> tuple[date, time | None] | None:
    """A date with the time written after it, if any (aware when an offset was written too)."""
    m = _DATETIME.fullmatch(raw.strip())
    if m is None:
        return None
    try:
        if m["y"]:
            d = date(int(m["y"]), int(m["m"]), int(m["d"]))
        else:
            d = date(int(m["y2"]), int(m["m2"]), int(m["d2"]))
        if m["H"] is None:
            return d, None
        t = _time_of(m)
        if tz := m["tz"]:
            hh, mm = (0, 0) if tz.upper() == "Z" else (int(tz[1:3]), int(tz[3:].lstrip(":") or 0))
            offset = timedelta(hours=hh, minutes=mm)
            t = t.replace(tzinfo=timezone(-offset if tz[0] == "-" else offset))
        return d, t
    except ValueError:  # 31.02, 24:00, an offset of a day or more
        return None


def parse_date(raw: str) -> date | None:
    """`2024-03-15`, `15.03.2024`, `15/03/2024`, also with a time after it; anything else is None."""
    parsed = _date_and_time(raw)
    return parsed[0] if parsed else None


def parse_time(raw: str) -> time | None:
    m = _TIME.fullmatch(raw.strip())
    if m is None:
        return None
    try:
        return _time_of(m)
    except ValueError:
        return None


def parse_datetime(raw: str, zone: ZoneInfo) -> datetime | None:
    """`2021-09-28 19:26:04.295301` (Klientiks, local time), ISO 8601, or a date alone.

    Without an offset the time is the source's local time; an explicit offset is kept.
    """
    parsed = _date_and_time(raw)
    if parsed is None:
        return None
    d, t = parsed
    dt = datetime.combine(d, t or time())
    return dt if dt.tzinfo else dt.replace(tzinfo=zone)


def split_services(raw: str) -> list[str] | None:
    """Service names from a JSON array or a list separated by `,`, `;` or new lines; None when invalid.

    Invalid: an array holding anything but names (numbers pass), or a name over ``SERVICE_CAP``.
    """
    parts: list[object] | None = None
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except (ValueError, RecursionError):
            items = None
        if isinstance(items, list):
            parts = items
    if parts is None:
        parts = re.split(r"[,;\n]", raw)
    names = []
    for item in parts:
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            return None
        name = clean_text(str(item))
        if name is None or len(name) > SERVICE_CAP:
            return None
        if name:
            names.append(name)
    return names


def join_name(*parts: str | None) -> str | None:
    words = [p for p in parts if p]
    return " ".join(words) or None


def split_name(full: str) -> tuple[str | None, str | None, str | None] | None:
    """(last, first, patronymic) read from a full name, or None when its order cannot be told.

    The rule: one word is a first name. Three words are `last first patronymic` when only the last one ends
    like a Russian patronymic (-вич, -вна, -ична, -инична, -ич), and `first patronymic last` when only the
    middle one does. Two words (`Анна Иванова` or `Иванова Анна`?), three words with no or two such endings,
    four or more words, and words that are not letters (digits, braces, ...) stay only in the full name.
    """
    words = full.split()
    if not words or not all(_NAME_WORD.fullmatch(w) for w in words):
        return None
    if len(words) == 1:
        return None, words[0], None
    if len(words) == 3:
        a, b, c = words
        middle, last = bool(_PATRONYMIC.search(b)), bool(_PATRONYMIC.search(c))
        if last and not middle:
            return a, b, c
        if middle and not last:
            return c, a, b
    return None


@dataclass(frozen=True)
class Normalized:
    event: CloudEvent
    key: str
    # (field, "empty" | "placeholder" | "invalid") for the operator and the metrics.
    missing: list[tuple[str, str]]
    # The request's parameters as they came (the dedupe fingerprint is made of them).
    pairs: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Rejected:
    reason: str  # a short stable code for metrics and filters
    detail: str


T = TypeVar("T")


def _parsed(
    p: Params, key: str, parse: Callable[[str], T | None], invalid: list[tuple[str, str]]
) -> T | None:
    """``parse`` of a present value; one it cannot read is listed invalid and never becomes data."""
    raw = p.get(key)
    if raw is None:
        return None
    value = parse(raw)
    if value is None:
        invalid.append((key, "invalid"))
    return value


def _phone(p: Params, key: str, region: str, invalid: list[tuple[str, str]]) -> str | None:
    return _parsed(p, key, lambda raw: normalize_phone(raw, region), invalid)


def _bool(p: Params, key: str, invalid: list[tuple[str, str]]) -> bool | None:
    return _parsed(p, key, parse_bool, invalid)


def _money(p: Params, key: str, invalid: list[tuple[str, str]]) -> Decimal | None:
    return _parsed(p, key, parse_money, invalid)


def _is_email(value: str) -> bool:
    """`[^@\\s]+@[^@\\s]+\\.[^@\\s]+` without a regex: that one backtracks quadratically on long junk."""
    local, at, domain = value.partition("@")
    return bool(
        at and local and "@" not in domain and not any(c.isspace() for c in value) and "." in domain[1:-1]
    )


def _client(p: Params, region: str, invalid: list[tuple[str, str]]) -> Client | None:
    phone = _phone(p, "client_phone", region, invalid)
    email = p.get("client_email")
    if email and not _is_email(email):
        invalid.append(("client_email", "invalid"))
        email = None
    deleted = _bool(p, "client_deleted", invalid)
    full = p.get("client_name")
    given = (p.get("client_second_name"), p.get("client_first_name"), p.get("client_patron_name"))
    last, first, patronymic = given
    derived = split_name(full) if full else None
    # A part read from the full name only fills a gap, and only if it agrees with every part that was sent.
    if derived and all(
        g is None or d is None or g.casefold() == d.casefold() for g, d in zip(given, derived, strict=True)
    ):
        last, first, patronymic = (g or d for g, d in zip(given, derived, strict=True))
    client = Client(
        id=p.get("client_id"),
        full_name=full or join_name(last, first, patronymic),
        first_name=first,
        last_name=last,
        patronymic=patronymic,
        phone=phone,
        email=email,
        deleted=deleted,
    )
    return client if client.model_dump(exclude_none=True) else None


def _start(p: Params, zone: ZoneInfo, invalid: list[tuple[str, str]]) -> datetime | None:
    """appointment_date (with or without a time in it) and appointment_time, on the source's clock."""
    given_time = None
    if raw_time := p.get("appointment_time"):
        given_time = parse_time(raw_time)
        if given_time is None:
            invalid.append(("appointment_time", "invalid"))
    raw_date = p.get("appointment_date")
    if raw_date is None:
        return None
    parsed = _date_and_time(raw_date)
    if parsed is None:
        invalid.append(("appointment_date", "invalid"))
        return None
    d, t = parsed
    if t is not None and t.tzinfo is not None:
        try:  # the same instant, read on the source's clock
            local = datetime.combine(d, t).astimezone(zone)
        except (OverflowError, ValueError):  # year 1 or 9999 pushed out of range by the offset
            invalid.append(("appointment_date", "invalid"))
            return None
        d, t = local.date(), local.time()
    # appointment_time wins over a time inside appointment_date: it is the field made for the start time,
    # while a date column that happens to carry a time may hold a default (00:00:00) or the booking moment.
    return datetime.combine(d, given_time or t or time(), tzinfo=zone)


def _appointment(
    p: Params, event: EventName, zone: ZoneInfo, region: str, invalid: list[tuple[str, str]]
) -> Appointment | None:
    start = _start(p, zone, invalid)
    created = None
    if raw_created := p.get("appointment_created"):
        created = parse_datetime(raw_created, zone)
        if created is None:
            invalid.append(("appointment_created", "invalid"))
    ex_name, ex_phone = p.get("executor_name"), _phone(p, "executor_phone", region, invalid)
    executor = Person(name=ex_name, phone=ex_phone) if ex_name or ex_phone else None
    # In invoice-created appointment_paid is the invoice's: read (and reported) there, not twice.
    paid = _bool(p, "appointment_paid", invalid) if event is not EventName.INVOICE_CREATED else None
    services = split_services(p.get("services") or "")
    if services is None:
        invalid.append(("services", "invalid"))
        services = []
    if any(is_placeholder(s) for s in services):  # `Стрижка, {service.name}`: a leftover is never data
        services = [s for s in services if not is_placeholder(s)]
        invalid.append(("services", "placeholder"))
    appt = Appointment(
        id=p.get("appointment_id"),
        start=start,
        status=p.get("appointment_status") or p.get("status"),
        total_cost=_money(p, "appointment_total_cost", invalid),
        services=services,
        executor=executor,
        created=created,
        paid=paid,
        parent_id=p.get("appointment_appointment_id"),
        account_id=p.get("appointment_account_id"),
        executor_id=p.get("executor_id"),
        author_id=p.get("author_id"),
        by_subscription=_bool(p, "appointment_abonement", invalid),
    )
    return appt if appt.model_dump(exclude_none=True, exclude_defaults=True) else None


def _invoice(p: Params, event: EventName, invalid: list[tuple[str, str]]) -> Invoice | None:
    if event is not EventName.INVOICE_CREATED:
        return None
    return Invoice(
        object_id=p.get("appointment_id"),
        name=p.get("appointment_name"),
        description=p.get("appointment_description"),
        amount=_money(p, "appointment_amount", invalid),
        paid_sum=_money(p, "appointment_paid_sum", invalid),
        left_to_pay=_money(p, "appointment_left_to_pay", invalid),
        paid=_bool(p, "appointment_paid", invalid),
    )


def _attribution(p: Params) -> Attribution | None:
    utm = {k: v for k, v in p.values.items() if k.startswith("utm_")}
    clicks = {k: v for k, v in p.values.items() if k in _CLICK_IDS}
    attr = Attribution(utm=utm, ip=p.get("ip"), user_agent=p.get("user_agent"), click_ids=clicks)
    return attr if attr.model_dump(exclude_none=True, exclude_defaults=True) else None


def normalize(record: InboxRecord, *, zone: ZoneInfo, phone_region: str) -> Normalized | Rejected:
    """Turn one inbox record into a CloudEvent, or say why it cannot be one."""
    try:
        event = EventName(record.event)
    except ValueError:
        return Rejected("unknown_event", f"unknown event {record.event!r}")
    try:
        pairs = request_params(record.query, record.content_type, record.body_bytes())
        params = Params.of(pairs)
    except ParamsError as e:
        return Rejected("bad_body", str(e))
    if not params.get("client_id") and not params.get("appointment_id"):
        return Rejected("no_id", "neither client_id nor appointment_id has a value; check the URL template")

    invalid: list[tuple[str, str]] = []
    client = _client(params, phone_region, invalid)
    appointment = _appointment(params, event, zone, phone_region, invalid)
    invoice = _invoice(params, event, invalid)  # before `missing`: its invalid amounts belong there
    known = KNOWN | {k for k in params.values if k.startswith("utm_") or k in _CLICK_IDS}
    missing = sorted(params.missing.items()) + invalid
    data = EventData(
        client=client,
        appointment=appointment,
        invoice=invoice,
        attribution=_attribution(params),
        user_position=params.get("user_position"),
        extra={k: v for k, v in params.values.items() if k not in known},
        missing=sorted({f for f, _ in missing}),
    )
    subject = f"client/{client.id}" if client and client.id else f"appointment/{params.get('appointment_id')}"
    ce = CloudEvent(
        id=record.id,
        source=source_uri(record.source),
        type=event.ce_type,
        time=record.received_at,
        subject=subject,
        relayreceivedat=record.received_at,
        data=data,
    )
    return Normalized(ce, routing_key(record.source, params), missing, pairs)
