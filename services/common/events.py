"""The event contract: Klientiks event names, the typed payload and the CloudEvents 1.0 Kafka binding."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, PlainSerializer

SPEC_VERSION = "1.0"
DATA_SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"


class EventName(StrEnum):
    """The ``{event}`` segment of the webhook URL."""

    CLIENT_CREATED = "client-created"
    APPOINTMENT_CREATED = "appointment-created"
    ONLINE_BOOKING = "online-booking"
    APPOINTMENT_CHANGED = "appointment-changed"
    INVOICE_CREATED = "invoice-created"
    VISIT_PAID = "visit-paid"

    @property
    def ce_type(self) -> str:
        return CE_TYPES[self]


CE_TYPES: dict[EventName, str] = {
    EventName.CLIENT_CREATED: "ru.klientiks.client.created",
    EventName.APPOINTMENT_CREATED: "ru.klientiks.appointment.created",
    EventName.ONLINE_BOOKING: "ru.klientiks.appointment.booked_online",
    EventName.APPOINTMENT_CHANGED: "ru.klientiks.appointment.changed",
    EventName.INVOICE_CREATED: "ru.klientiks.invoice.created",
    EventName.VISIT_PAID: "ru.klientiks.visit.paid",
}
EVENT_BY_CE_TYPE = {v: k for k, v in CE_TYPES.items()}

# Money travels as a decimal string so no float ever rounds a price.
Money = Annotated[Decimal, PlainSerializer(lambda d: str(d), return_type=str, when_used="json")]


class Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Person(Payload):
    name: str | None = None
    phone: str | None = Field(None, description="E.164")


class Client(Payload):
    id: str | None = None
    full_name: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    patronymic: str | None = None
    phone: str | None = Field(None, description="E.164, e.g. +79991234567")
    email: str | None = None
    deleted: bool | None = None


class ServiceLine(Payload):
    """One service of a visit with its price, as the Klientiks API lists it (``appointed_services``)."""

    name: str = Field(min_length=1)
    service_id: str | None = None
    price: Money | None = Field(None, description="the price of one, a decimal string")
    qty: int = Field(1, ge=1)


class Appointment(Payload):
    id: str | None = None
    start: AwareDatetime | None = Field(None, description="in the source's time zone")
    status: str | None = None
    total_cost: Money | None = None
    services: list[str] = Field(default_factory=list)
    lines: list[ServiceLine] = Field(
        default_factory=list, description="the services with their prices, from the Klientiks API"
    )
    executor: Person | None = None
    executor_id: str | None = Field(None, description="the Klientiks user who serves the visit")
    author_id: str | None = Field(None, description="the Klientiks user who booked it")
    by_subscription: bool | None = Field(None, description="paid by a subscription (абонемент)")
    created: AwareDatetime | None = None
    paid: bool | None = None
    parent_id: str | None = Field(None, description="appointment_appointment_id of the visit-paid template")
    account_id: str | None = None


class Invoice(Payload):
    object_id: str | None = Field(None, description="what the invoice is for (an appointment id)")
    name: str | None = None
    description: str | None = None
    amount: Money | None = None
    paid_sum: Money | None = None
    left_to_pay: Money | None = None
    paid: bool | None = None


class Attribution(Payload):
    utm: dict[str, str] = Field(default_factory=dict)
    ip: str | None = None
    user_agent: str | None = None
    click_ids: dict[str, str] = Field(default_factory=dict)


class EventData(Payload):
    """The versioned payload of every event (``data`` of the CloudEvent)."""

    schema_version: Literal[1] = 1
    client: Client | None = None
    appointment: Appointment | None = None
    invoice: Invoice | None = None
    attribution: Attribution | None = None
    user_position: str | None = None
    extra: dict[str, str] = Field(default_factory=dict, description="parameters the parser does not know")
    missing: list[str] = Field(
        default_factory=list, description="parameters sent empty or as leftover placeholders"
    )


class CloudEvent(Payload):
    """CloudEvents 1.0 envelope; on Kafka in binary content mode (attributes in ``ce_*`` headers)."""

    specversion: Literal["1.0"] = "1.0"
    id: str
    source: str
    type: str
    time: AwareDatetime
    subject: str | None = None
    datacontenttype: str = CONTENT_TYPE
    relayreceivedat: AwareDatetime
    data: EventData

    @property
    def event_name(self) -> EventName:
        return EVENT_BY_CE_TYPE[self.type]

    @property
    def source_name(self) -> str:
        return self.source.rsplit("/", 1)[-1]

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        attrs = self.model_dump(mode="json", exclude={"data", "datacontenttype"}, exclude_none=True)
        headers = [(f"ce_{k}", str(v).encode()) for k, v in attrs.items()]
        headers.append(("content-type", self.datacontenttype.encode()))
        return headers

    def kafka_value(self) -> bytes:
        return self.data.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_kafka(cls, headers: Iterable[tuple[str, bytes]], value: bytes) -> CloudEvent:
        """Parse a binary-mode record; raise pydantic.ValidationError or ValueError on a bad one."""
        attrs: dict[str, Any] = {}
        for k, v in headers:
            if k.startswith("ce_"):
                name = k[3:]
                # Extension attributes of other producers are allowed by the spec; we do not read them.
                if name in cls.model_fields:
                    attrs[name] = v.decode()
            elif k == "content-type":
                attrs["datacontenttype"] = v.decode()
        if "specversion" not in attrs:
            raise ValueError("not a CloudEvent: the ce_specversion header is missing")
        attrs["data"] = json.loads(value)
        return cls.model_validate(attrs)


def source_uri(source: str) -> str:
    return f"/klientiks/{source}"


def kafka_key(source: str, client_id: str | None, appointment_id: str | None) -> str:
    """``{source}:{client_id}`` keeps one client's events in order; else the appointment id."""
    if client_id:
        return f"{source}:{client_id}"
    if appointment_id:
        return f"{source}:appointment:{appointment_id}"
    return source


def new_event_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


def header(headers: Sequence[tuple[str, bytes]], name: str) -> str | None:
    for k, v in headers:
        if k == name:
            return v.decode()
    return None
