"""What the Weeek tests share: the sandbox's seeded ids, a connection, events as the normalizer makes them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from services.common.events import (
    Appointment,
    Client,
    CloudEvent,
    EventData,
    EventName,
    Invoice,
    Person,
    source_uri,
)
from services.sandbox.weeek import (
    SEED_FUNNEL_NAME,
    SEED_STATUS_NAMES,
    SEED_USERS,
    WeeekSandbox,
    custom_field_id,
    funnel_id,
    status_id,
    user_id,
)
from services.weeek.settings import WeeekConnection

TOKEN = "weeek-test-token-0123456789abcdef"
FUNNEL = funnel_id(SEED_FUNNEL_NAME)
NEW, BOOKED, CAME, PAID, REFUSED = (status_id(SEED_FUNNEL_NAME, name) for name in SEED_STATUS_NAMES)
ADMIN, MASTER = (user_id(email) for _, email in SEED_USERS)
VISIT_FIELD = custom_field_id("Klientiks visit id")
STALE = "00000000-0000-4000-8000-000000000000"  # a status id no funnel has
MSK = ZoneInfo("Europe/Moscow")
START = datetime(2024, 3, 20, 14, 30, tzinfo=MSK)
RECEIVED = datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC)
PHONE = "+79161234567"
EMAIL = "anna.ivanova@mail.ru"


def connection(**over: Any) -> WeeekConnection:
    """The demo-like connection to the seeded funnel; a keyword replaces a key, None removes it."""
    data: dict[str, Any] = {
        "target": "weeek",
        "name": "weeek",
        "base_url": "https://api.weeek.net/public/v1",
        "token": TOKEN,
        "status_id": NEW,
        **over,
    }
    return WeeekConnection.model_validate({k: v for k, v in data.items() if v is not None})


def client(**over: Any) -> Client:
    """The client as a client-created webhook carries it (the parts of the name, phone and email)."""
    fields: dict[str, Any] = {
        "id": "1842",
        "full_name": "Иванова Анна Сергеевна",
        "first_name": "Анна",
        "last_name": "Иванова",
        "patronymic": "Сергеевна",
        "phone": PHONE,
        "email": EMAIL,
        **over,
    }
    return Client(**fields)


def booking_client(**over: Any) -> Client:
    """The client as an appointment-created webhook carries it: id, the whole name and the phone."""
    fields: dict[str, Any] = {"id": "1842", "full_name": "Иванова Анна Сергеевна", "phone": PHONE, **over}
    return Client(**fields)


def appointment(**over: Any) -> Appointment:
    fields: dict[str, Any] = {
        "id": "55017",
        "start": START,
        "services": ["Стрижка женская", "Окрашивание"],
        "total_cost": Decimal("2500.00"),
        **over,
    }
    return Appointment(**fields)


def event(
    name: EventName = EventName.APPOINTMENT_CREATED,
    *,
    who: Client | None = None,
    appt: Appointment | None = None,
    invoice: Invoice | None = None,
    event_id: str = "0f8e7d6c5b4a39281706f5e4d3c2b1a0",
    extra: dict[str, str] | None = None,
) -> CloudEvent:
    return CloudEvent(
        id=event_id,
        source=source_uri("salon"),
        type=name.ce_type,
        time=RECEIVED,
        subject=f"client/{who.id}" if who and who.id else None,
        relayreceivedat=RECEIVED,
        data=EventData(client=who, appointment=appt, invoice=invoice, extra=extra or {}),
    )


def booking(event_id: str = "a1", *, who: Client | None = None, **appt: Any) -> CloudEvent:
    """An appointment-created event of visit 55017 (or ``id=``) for client 1842."""
    return event(
        EventName.APPOINTMENT_CREATED,
        who=who if who is not None else booking_client(),
        appt=appointment(**appt),
        event_id=event_id,
    )


def new_client(event_id: str = "c1", **over: Any) -> CloudEvent:
    return event(EventName.CLIENT_CREATED, who=client(**over), event_id=event_id)


def changed(event_id: str = "x1", status: str | None = "confirmed", **appt: Any) -> CloudEvent:
    return event(
        EventName.APPOINTMENT_CHANGED,
        who=booking_client(),
        appt=appointment(status=status, **appt),
        event_id=event_id,
    )


def paid(event_id: str = "p1", **appt: Any) -> CloudEvent:
    return event(EventName.VISIT_PAID, who=booking_client(), appt=appointment(**appt), event_id=event_id)


def executor(name: str) -> Person:
    return Person(name=name)


def api(
    sandbox: WeeekSandbox, method: str, route: str, body: dict[str, Any], **params: str
) -> tuple[int, dict[str, Any]]:
    """One authenticated call on the sandbox's state, the body serialized as httpx sends JSON."""
    raw = json.dumps(body, ensure_ascii=False, allow_nan=False).encode()
    return sandbox.call(method, route, params, (), "application/json", raw)


def accepted(sandbox: WeeekSandbox, method: str, route: str, body: dict[str, Any], **params: str) -> Any:
    """The sandbox's answer to a body it must accept; an AssertionError with its 422 errors otherwise."""
    status, answer = api(sandbox, method, route, body, **params)
    assert status == 200, (body, answer)
    assert answer["success"] is True
    return answer
