"""Pure functions: a raw Klientiks request to a typed event. No I/O, no clock, no settings object."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
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


# Seed templates are copied with mistakes: `{appointment.status}}`, `{{#new_data}}{{status}}{{/new_data}}`, ...
_PLACEHOLDER = re.compile(r"\{\{|\}\}|^\{[#/^]?[A-Za-z_][A-Za-z0-9_.]*\}$")
_TRUE = {"1", "true", "t", "yes", "y", "on", "да", "д", "истина"}
_FALSE = {"0", "false", "f", "no", "n", "off", "нет", "н", "ложь", "null", "none"}
_CLICK_IDS = {"gclid", "yclid", "fbclid", "ymclid", "ttclid", "vkclid", "msclkid", "ad_id", "adid"}

# Parameters the parser knows; anything else goes to `extra`.
KNOWN = {
    "client_id", "client_phone", "client_name", "client_first_name", "client_patron_name",
    "client_second_name", "client_deleted", "client_email", "appointment_id", "appointment_date",
    "appointment_time", "executor_name", "executor_phone", "services", "appointment_total_cost",
    "user_position", "appointment_amount", "appointment_paid", "appointment_name", "appointment_description",
    "appointment_paid_sum", "appointment_left_to_pay", "appointment_account_id", "appointment_created",
    "appointment_appointment_id", "appointment_status", "status", "ip", "user_agent",
}  # fmt: skip


def request_params(query: str, content_type: str | None, body: bytes) -> list[tuple[str, str]]:
    """Query-string pairs, then form or JSON body pairs, in the order they came."""
    pairs = parse_qsl(query, keep_blank_values=True)
    if not body.strip():
        return pairs
    ctype = (content_type or "").split(";")[0].strip().lower()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ParamsError("the body is not UTF-8") from None
    if ctype == "application/json" or (not ctype and text.lstrip().startswith("{")):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ParamsError(f"the JSON body is malformed at line {e.lineno}, column {e.colno}") from None
        if not isinstance(obj, dict):
            raise ParamsError("the JSON body must be an object of parameters")
        for k, v in obj.items():
            if v is None:
                v = ""
            pairs.append((str(k), v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)))
        return pairs
    if ctype in ("", "application/x-www-form-urlencoded", "text/plain"):
        pairs.extend(parse_qsl(text, keep_blank_values=True))
        return pairs
    raise ParamsError(f"unsupported content type {ctype!r}; send a query string, a form or a JSON object")


def canonical_key(key: str) -> str:
    """`appointment.time` (a seed typo) -> `appointment_time`; case and spaces do not matter."""
    return key.strip().lower().replace(".", "_").replace("-", "_")


def is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value.strip()))


@dataclass
class Params:
    """Merged parameters; empty values and leftover placeholders are recorded as missing, never as data."""

    values: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)  # field -> "empty" | "placeholder"

    @classmethod
    def of(cls, pairs: list[tuple[str, str]]) -> Params:
        p = cls()
        for raw_key, raw_value in pairs:
            key, value = canonical_key(raw_key), raw_value.strip()
            if not key:
                continue
            if key in p.values:  # the first value wins, as in most web frameworks
                continue
            if is_placeholder(value):
                p.missing.setdefault(key, "placeholder")
            elif not value:
                p.missing.setdefault(key, "empty")
            else:
                p.values[key] = value
                p.missing.pop(key, None)
        return p

    def get(self, key: str) -> str | None:
        return self.values.get(key)


def routing_key(source: str, params: Params) -> str:
    return kafka_key(source, params.get("client_id"), params.get("appointment_id"))


def normalize_phone(raw: str, region: str) -> str | None:
    """E.164 or None. Klientiks sends `79991234567`, `8 (999) 123-45-67`, `+7 999 ...`."""
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
            return str(phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164))
    return None


def parse_bool(raw: str) -> bool | None:
    v = raw.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    return None


def parse_money(raw: str) -> Decimal | None:
    v = raw.replace("\u00a0", "").replace(" ", "").replace("₽", "").replace("руб.", "").replace("руб", "")
    v = v.replace(",", ".")
    try:
        d = Decimal(v)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def parse_date(raw: str) -> date | None:
    v = raw.strip()[:10]
    for fmt in ("%Y-%m-%d", "%d.%m.%Y", "%d/%m/%Y"):
        try:
            return datetime.strptime(v, fmt).date()
        except ValueError:
            continue
    return None


def parse_time(raw: str) -> time | None:
    for fmt in ("%H:%M:%S", "%H:%M"):
        try:
            return datetime.strptime(raw.strip(), fmt).time()
        except ValueError:
            continue
    return None


def parse_datetime(raw: str, zone: ZoneInfo) -> datetime | None:
    """`2021-09-28 19:26:04.295301` (Klientiks, local time), ISO 8601, or a date alone."""
    v = raw.strip().replace("T", " ")
    try:
        dt = datetime.fromisoformat(v)
    except ValueError:
        d = parse_date(v)
        if d is None:
            return None
        dt = datetime.combine(d, time())
    return dt if dt.tzinfo else dt.replace(tzinfo=zone)


def split_services(raw: str) -> list[str]:
    if raw.startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            return [str(i).strip() for i in items if str(i).strip()]
    return [s.strip() for s in re.split(r"[,;\n]", raw) if s.strip()]


def join_name(*parts: str | None) -> str | None:
    words = [p for p in parts if p]
    return " ".join(words) or None


@dataclass(frozen=True)
class Normalized:
    event: CloudEvent
    key: str
    # (field, "empty" | "placeholder" | "invalid") for the operator and the metrics.
    missing: list[tuple[str, str]]


@dataclass(frozen=True)
class Rejected:
    reason: str  # a short stable code for metrics and filters
    detail: str


def _client(p: Params, region: str, invalid: list[tuple[str, str]]) -> Client | None:
    phone = None
    if raw := p.get("client_phone"):
        phone = normalize_phone(raw, region)
        if phone is None:
            invalid.append(("client_phone", "invalid"))
    email = p.get("client_email")
    if email and not re.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+", email):
        invalid.append(("client_email", "invalid"))
        email = None
    deleted = parse_bool(p.get("client_deleted") or "")
    first, last, patronymic = (
        p.get("client_first_name"),
        p.get("client_second_name"),
        p.get("client_patron_name"),
    )
    client = Client(
        id=p.get("client_id"),
        full_name=p.get("client_name") or join_name(last, first, patronymic),
        first_name=first,
        last_name=last,
        patronymic=patronymic,
        phone=phone,
        email=email,
        deleted=deleted,
    )
    return client if client.model_dump(exclude_none=True) else None


def _money(p: Params, key: str, invalid: list[tuple[str, str]]) -> Decimal | None:
    raw = p.get(key)
    if raw is None:
        return None
    value = parse_money(raw)
    if value is None:
        invalid.append((key, "invalid"))
    return value


def _appointment(
    p: Params, event: EventName, zone: ZoneInfo, region: str, invalid: list[tuple[str, str]]
) -> Appointment | None:
    start = None
    if raw_date := p.get("appointment_date"):
        raw_time = p.get("appointment_time")
        d, t = parse_date(raw_date), parse_time(raw_time or "") or time()
        if raw_time and parse_time(raw_time) is None:
            invalid.append(("appointment_time", "invalid"))
        if d is None:
            invalid.append(("appointment_date", "invalid"))
        else:
            start = datetime.combine(d, t, tzinfo=zone)
    created = None
    if raw_created := p.get("appointment_created"):
        created = parse_datetime(raw_created, zone)
        if created is None:
            invalid.append(("appointment_created", "invalid"))
    executor = None
    if p.get("executor_name") or p.get("executor_phone"):
        ex_phone = normalize_phone(p.get("executor_phone") or "", region) if p.get("executor_phone") else None
        executor = Person(name=p.get("executor_name"), phone=ex_phone)
    paid = parse_bool(p.get("appointment_paid") or "") if event is not EventName.INVOICE_CREATED else None
    services = split_services(p.get("services") or "")
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
        paid=parse_bool(p.get("appointment_paid") or ""),
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
        params = Params.of(request_params(record.query, record.content_type, record.body_bytes()))
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
    return Normalized(ce, routing_key(record.source, params), missing)
