"""Completing thin webhooks from Klientiks records. Pure functions: no I/O, no clock, no settings object.

The webhook is the state at the time of the event (its ``status`` is the new status), so what it carried
wins; a record from the API only fills what is missing. A record about another appointment or client than
the one the webhook names is ignored. The records are the dicts :mod:`services.ingest.klientiks` returns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from services.common.events import Appointment, Client, CloudEvent, EventName, Person, ServiceLine, kafka_key
from services.ingest.parsing import (
    SERVICE_CAP,
    TEXT_CAP,
    cap_of,
    clean_id,
    clean_text,
    join_name,
    normalize_phone,
    parse_bool,
    parse_datetime,
    parse_money,
    split_services,
)

__all__ = [
    "client_from_appointment",
    "client_id_from_appointment",
    "enrich",
    "enriched_key",
    "needs_enrichment",
]

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")

# Event field -> the webhook parameters that would have carried it (the names in ``data.missing``).
_CLIENT_PARAMS = {
    "id": ("client_id",),
    "phone": ("client_phone",),
    "full_name": ("client_name",),
    "first_name": ("client_first_name",),
    "last_name": ("client_second_name",),
    "patronymic": ("client_patron_name",),
    "email": ("client_email",),
    "deleted": ("client_deleted",),
}
_APPOINTMENT_PARAMS = {
    "id": ("appointment_id",),
    "start": ("appointment_date", "appointment_time"),
    "status": ("appointment_status", "status"),
    "services": ("services",),
    "total_cost": ("appointment_total_cost",),
    "paid": ("appointment_paid",),
    "created": ("appointment_created",),
    "account_id": ("appointment_account_id",),
    "executor_id": ("executor_id",),
    "author_id": ("author_id",),
    "by_subscription": ("appointment_abonement",),
}


def needs_enrichment(event: CloudEvent) -> bool:
    """True for a thin webhook that the Klientiks API can complete.

    An appointment id without the client's phone and id, or without the start (seed 004 sends only
    ``appointment_id`` and ``status``); a paid visit without its amount (the seed's visit-paid template
    sends none, and a bonus order needs it); or a client id without phone and name (served by the
    clients-changed-since scan, see ``KlientiksApiClient.get_client``).
    """
    client, appt = event.data.client, event.data.appointment
    if appt is not None and appt.id:
        no_client = client is None or not (client.phone or client.id)
        if no_client or appt.start is None:
            return True
        if appt.total_cost is None and event.type == EventName.VISIT_PAID.ce_type:
            return True
    if client is not None and client.id and not client.phone:
        return not (client.full_name or client.first_name or client.last_name)
    return False


def client_id_from_appointment(appointment: Mapping[str, Any] | None) -> str | None:
    """The visit's client id: its first client link, else its own ``client_id``."""
    if not appointment:
        return None
    for link in _links(appointment):
        if found := clean_id(link.get("client_id")):
            return found
        nested = link.get("client")
        if isinstance(nested, Mapping) and (found := clean_id(nested.get("id"))):
            return found
    value = clean_id(appointment.get("client_id"))
    return value if value and value.strip("0") else None


def client_from_appointment(appointment: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The client record nested in the visit's first client link, if Klientiks sent one."""
    if not appointment:
        return None
    for link in _links(appointment):
        nested = link.get("client")
        if isinstance(nested, Mapping) and nested:
            client = dict(nested)
            client.setdefault("id", link.get("client_id"))
            return client
    return None


def enriched_key(source_name: str, event: CloudEvent) -> str:
    """The Kafka key of a (possibly enriched) event: ``{source}:{client_id}`` once the client is known."""
    client, appt = event.data.client, event.data.appointment
    return kafka_key(source_name, client.id if client else None, appt.id if appt else None)


def enrich(
    event: CloudEvent,
    appointment: Mapping[str, Any] | None,
    client: Mapping[str, Any] | None,
    *,
    zone: ZoneInfo,
    phone_region: str,
) -> CloudEvent:
    """A copy of ``event`` with what it lacks filled from the records; ``data.missing`` loses what got filled.

    The new Kafka key is :func:`enriched_key` of the result.
    """
    data = event.data
    filled: set[str] = set()

    appt = data.appointment
    if appointment and appt is not None and appt.id and not _same(appointment.get("id"), appt.id):
        appointment = None
    if appointment:
        found = _appointment_fields(appointment, zone, phone_region)
        base = appt or Appointment()
        updates = _gaps(base, found)
        if updates:
            appt = base.model_copy(update=updates)
            filled |= {p for name in updates for p in _APPOINTMENT_PARAMS.get(name, ())}
            if "executor" in updates:
                filled |= {f"executor_{k}" for k in ("name", "phone") if getattr(updates["executor"], k)}

    person = data.client
    if not client:
        client = client_from_appointment(appointment)
    wanted = (person.id if person else None) or client_id_from_appointment(appointment)
    if client and (not wanted or _same(client.get("id"), wanted)):
        base_client = person or Client()
        found_client = _client_fields(client, phone_region)
        updates = _gaps(base_client, found_client)
        if "full_name" not in updates and base_client.full_name is None and "full_name" not in found_client:
            composed = join_name(
                updates.get("last_name", base_client.last_name),
                updates.get("first_name", base_client.first_name),
                updates.get("patronymic", base_client.patronymic),
            )
            if composed:
                updates["full_name"] = composed
        if updates:
            person = base_client.model_copy(update=updates)
            filled |= {p for name in updates for p in _CLIENT_PARAMS[name]}
    elif wanted and (person is None or not person.id):
        # The appointment names its client even when no client record came back.
        person = (person or Client()).model_copy(update={"id": wanted})
        filled.add("client_id")

    if person is data.client and appt is data.appointment:
        return event
    new_data = data.model_copy(
        update={
            "client": person,
            "appointment": appt,
            "missing": [m for m in data.missing if m not in filled],
        }
    )
    subject = event.subject
    if person is not None and person.id and (subject is None or subject.startswith("appointment/")):
        subject = f"client/{person.id}"
    return event.model_copy(update={"data": new_data, "subject": subject})


# ------------------------------------------------------------------------------------------------ helpers


def _links(appointment: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    links = appointment.get("appointment_client_links")
    if not isinstance(links, list):
        return []
    return [link for link in links if isinstance(link, Mapping)]


def _same(record_id: Any, event_id: str) -> bool:
    return record_id is not None and str(record_id).strip() == event_id.strip()


def _text(value: Any, cap: int = TEXT_CAP) -> str | None:
    """A record's value as clean text (as the webhook's values are), or None: the API is input too."""
    if value is None or isinstance(value, bool | Mapping | list):
        return None
    text = clean_text(str(value))
    return text if text and len(text) <= cap else None


def _flag(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return bool(value)
    text = _text(value)
    return parse_bool(text) if text else None


def _when(value: Any, zone: ZoneInfo) -> datetime | None:
    text = _text(value)
    return parse_datetime(text, zone) if text else None


def _gaps(current: Any, found: Mapping[str, Any]) -> dict[str, Any]:
    """The found values for the fields ``current`` lacks (None, or an empty list)."""
    return {k: v for k, v in found.items() if getattr(current, k) in (None, [])}


def _client_fields(record: Mapping[str, Any], region: str) -> dict[str, Any]:
    raw_phone = _text(record.get("phone"), cap_of("client_phone"))
    email = _text(record.get("email"), cap_of("client_email"))
    fields: dict[str, Any] = {
        "id": clean_id(record.get("id")),
        "phone": normalize_phone(raw_phone, region) if raw_phone else None,
        "first_name": _text(record.get("first_name"), cap_of("client_first_name")),
        "last_name": _text(record.get("second_name"), cap_of("client_second_name")),
        "patronymic": _text(record.get("patron_name"), cap_of("client_patron_name")),
        "email": email if email and _EMAIL.fullmatch(email) else None,
        "deleted": _flag(record.get("deleted")),
    }
    # `name` is the card's display name; the parts are composed when it is empty.
    fields["full_name"] = _text(record.get("name"), cap_of("client_name"))
    return {k: v for k, v in fields.items() if v is not None}


def _appointment_fields(record: Mapping[str, Any], zone: ZoneInfo, region: str) -> dict[str, Any]:
    services = record.get("appointed_services")
    names: list[str] = []
    if isinstance(services, list):
        names = [n for s in services if isinstance(s, Mapping) and (n := _text(s.get("name"), SERVICE_CAP))]
    elif isinstance(services, str):
        names = split_services(services) or []
    lines = _lines(services)
    total = _amount(record.get("total_cost"))
    if total is None and lines and all(line.price is not None for line in lines):
        total = sum((line.price * line.qty for line in lines if line.price is not None), Decimal(0))
    fields: dict[str, Any] = {
        "id": clean_id(record.get("id")),
        "start": _when(record.get("start_datetime"), zone),
        "status": _text(record.get("status"), cap_of("status")),
        "services": names or None,
        "lines": lines or None,
        "total_cost": total,
        "paid": _flag(record.get("paid")),
        "created": _when(record.get("created"), zone),
        "account_id": clean_id(record.get("account_id")),
        "executor": _executor(record.get("executor"), region),
        "executor_id": clean_id(record.get("executor_id")),
        # Not confirmed by a source: the booking's author and its subscription, as the analytics
        # integration of seed 004 reads them (services/sandbox/klientiks.py gives the same names).
        "author_id": clean_id(record.get("author_id")),
        "by_subscription": _subscription(record.get("abonement_id")),
    }
    return {k: v for k, v in fields.items() if v is not None}


def _subscription(value: Any) -> bool | None:
    """A visit paid by a subscription names it (``abonement_id``); an empty or zero id says it was not."""
    if value is None:
        return None
    ident = clean_id(value)
    return bool(ident and ident.strip("0")) if ident is not None or value in ("", 0, False) else None


def _amount(value: Any) -> Decimal | None:
    """A price from the API: a JSON number or a decimal string, never negative, at most kopecks."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        value = str(value)
    text = _text(value, cap_of("appointment_total_cost"))
    amount = parse_money(text) if text else None
    if amount is None or not amount.is_finite() or amount < 0:
        return None
    # "1800.000" is 1800.00; "10.555" is not a price.
    kopecks = amount.quantize(Decimal("0.01"))
    return kopecks if kopecks == amount else None


def _lines(services: Any) -> list[ServiceLine]:
    """The visit's services with their prices (``appointed_services[{service_id, name, price, count}]``)."""
    if not isinstance(services, list):
        return []
    lines = []
    for s in services:
        if not isinstance(s, Mapping) or not (name := _text(s.get("name"), SERVICE_CAP)):
            continue
        qty = s.get("count", 1)
        if isinstance(qty, str) and qty.isascii() and qty.isdigit():
            qty = int(qty)
        if isinstance(qty, bool) or not isinstance(qty, int) or not 1 <= qty <= 1000:
            qty = 1
        price = _amount(s.get("price"))
        lines.append(ServiceLine(name=name, service_id=clean_id(s.get("service_id")), price=price, qty=qty))
    return lines


def _executor(value: Any, region: str) -> Person | None:
    if not isinstance(value, Mapping):
        return None
    cap = cap_of("executor_name")
    name = _text(value.get("name"), cap) or join_name(
        _text(value.get("second_name"), cap), _text(value.get("first_name"), cap)
    )
    raw_phone = _text(value.get("phone"), cap_of("executor_phone"))
    phone = normalize_phone(raw_phone, region) if raw_phone else None
    return Person(name=name, phone=phone) if name or phone else None
