"""services.ingest.enrichment: thin webhooks completed from Klientiks records (pure, no I/O)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.common.events import (
    Appointment,
    Client,
    CloudEvent,
    EventData,
    EventName,
    Person,
    ServiceLine,
    source_uri,
)
from services.ingest.enrichment import (
    client_from_appointment,
    client_id_from_appointment,
    enrich,
    enriched_key,
    needs_enrichment,
)
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import Normalized, normalize

MSK = ZoneInfo("Europe/Moscow")
NOW = datetime(2024, 6, 3, 9, 15, tzinfo=UTC)

CLIENT: dict[str, Any] = {
    "id": 6439308,
    "name": "Петрова Мария Сергеевна",
    "phone": "79166859013",
    "first_name": "Мария",
    "patron_name": "Сергеевна",
    "second_name": "Петрова",
    "email": "maria.petrova16@mail.ru",
    "created": "2023-09-16 16:02:53.803467",
    "modified": "2024-06-03 12:10:04.803467",
    "deleted": False,
    "blocked": False,
    "account_id": 21947,
}
APPOINTMENT: dict[str, Any] = {
    "id": 5833264,
    "account_id": 21947,
    "client_id": 6439308,
    "executor_id": 113423,
    "start_datetime": "2024-06-10 16:30:00",
    "finish_datetime": "2024-06-10 18:00:00",
    "status": "confirmed",
    "appointed_services": [
        {"id": 1, "service_id": 101, "name": "Стрижка женская", "type": "service", "price": "1800.00"},
        {"id": 2, "service_id": 106, "name": "Укладка", "type": "service", "price": "1500.00"},
    ],
    "created": "2024-05-31 00:26:09.044748",
    "modified": "2024-06-03 12:10:04.803467",
    "paid": False,
    "appointment_client_links": [
        {
            "id": 9100001,
            "appointment_id": 5833264,
            "client_id": 6439308,
            "status": "confirmed",
            "client": CLIENT,
        }
    ],
}


def event(
    client: Client | None = None,
    appointment: Appointment | None = None,
    *,
    name: EventName = EventName.APPOINTMENT_CHANGED,
    missing: list[str] | None = None,
    subject: str | None = None,
) -> CloudEvent:
    return CloudEvent(
        id="e-1",
        source=source_uri("salon"),
        type=name.ce_type,
        time=NOW,
        subject=subject,
        relayreceivedat=NOW,
        data=EventData(client=client, appointment=appointment, missing=missing or []),
    )


def thin(status: str = "cancelled", **kw: Any) -> CloudEvent:
    """Seed 004: only `appointment_id` and `status`."""
    return event(appointment=Appointment(id="5833264", status=status), subject="appointment/5833264", **kw)


def full(e: CloudEvent, appointment: Any = APPOINTMENT, client: Any = None) -> CloudEvent:
    return enrich(e, appointment, client, zone=MSK, phone_region="RU")


# ---- needs_enrichment --------------------------------------------------------------------------------


def test_seed_004_thin_webhook_needs_enrichment() -> None:
    rec = InboxRecord(
        id="e-004",
        source="salon",
        event="appointment-changed",
        received_at=NOW,
        method="GET",
        query="appointment_id=5833264&status=cancelled",
    )
    result = normalize(rec, zone=MSK, phone_region="RU")
    assert isinstance(result, Normalized)
    assert needs_enrichment(result.event)
    assert result.key == "salon:appointment:5833264"


@pytest.mark.parametrize(
    ("client", "appointment", "expected"),
    [
        (None, Appointment(id="1", status="confirmed"), True),
        (Client(phone="+79161234567"), Appointment(id="1"), True),  # no start
        (Client(id="7"), Appointment(id="1"), True),  # no start
        (Client(full_name="Анна"), Appointment(id="1", start=NOW), True),  # neither phone nor id
        (Client(id="7", phone="+79161234567"), Appointment(id="1", start=NOW), False),
        (Client(phone="+79161234567"), Appointment(id="1", start=NOW), False),
        (Client(id="7"), None, True),  # client-created thin form
        (Client(id="7", full_name="Попова Дарья"), None, False),
        (Client(id="7", first_name="Дарья"), None, False),
        (Client(id="7", phone="+79161234567"), None, False),
        (Client(phone="+79161234567", full_name="Анна"), None, False),
        (None, Appointment(status="confirmed"), False),  # nothing to look up
    ],
)
def test_needs_enrichment(client: Client | None, appointment: Appointment | None, expected: bool) -> None:
    assert needs_enrichment(event(client, appointment)) is expected


# ---- enrich --------------------------------------------------------------------------------------------


def test_thin_event_becomes_full() -> None:
    e = full(thin())
    assert e is not None
    c, a = e.data.client, e.data.appointment
    assert c == Client(
        id="6439308",
        full_name="Петрова Мария Сергеевна",
        first_name="Мария",
        last_name="Петрова",
        patronymic="Сергеевна",
        phone="+79166859013",
        email="maria.petrova16@mail.ru",
        deleted=False,
    )
    assert a is not None
    assert a.id == "5833264"
    assert a.start == datetime(2024, 6, 10, 16, 30, tzinfo=MSK)
    assert a.start is not None
    assert a.start.utcoffset() is not None
    assert a.start.astimezone(UTC) == datetime(2024, 6, 10, 13, 30, tzinfo=UTC)
    assert a.services == ["Стрижка женская", "Укладка"]
    assert a.paid is False
    assert a.created == datetime(2024, 5, 31, 0, 26, 9, 44748, tzinfo=MSK)
    assert a.account_id == "21947"
    assert not needs_enrichment(e)
    # Everything else is the same event.
    assert (e.id, e.type, e.time, e.source) == (
        "e-1",
        EventName.APPOINTMENT_CHANGED.ce_type,
        NOW,
        "/klientiks/salon",
    )


def test_webhook_status_wins_over_the_api() -> None:
    e = full(thin(status="cancelled"))
    assert e.data.appointment is not None
    assert e.data.appointment.status == "cancelled"  # the record still says "confirmed"


def test_api_status_fills_a_missing_status() -> None:
    e = full(event(appointment=Appointment(id="5833264")))
    assert e.data.appointment is not None
    assert e.data.appointment.status == "confirmed"


def test_webhook_values_win_field_by_field() -> None:
    webhook = event(
        Client(full_name="Петрова Маша", phone="+79031112233"),
        Appointment(id="5833264", services=["Маникюр"], paid=True),
    )
    e = full(webhook)
    c, a = e.data.client, e.data.appointment
    assert c is not None
    assert a is not None
    assert (c.full_name, c.phone) == ("Петрова Маша", "+79031112233")
    assert (c.id, c.first_name, c.email) == ("6439308", "Мария", "maria.petrova16@mail.ru")
    assert a.services == ["Маникюр"]
    assert a.paid is True
    assert a.start == datetime(2024, 6, 10, 16, 30, tzinfo=MSK)


def test_missing_loses_only_what_got_filled() -> None:
    e = full(thin(missing=["appointment_date", "appointment_time", "client_phone", "services", "utm_source"]))
    assert e.data.missing == ["utm_source"]


def test_missing_keeps_what_the_api_did_not_have() -> None:
    record = {**APPOINTMENT, "appointed_services": []}
    e = full(thin(missing=["services", "client_phone"]), appointment=record)
    assert e.data.missing == ["services"]


def test_key_becomes_source_and_client_id() -> None:
    before = thin()
    assert enriched_key("salon", before) == "salon:appointment:5833264"
    after = full(before)
    assert enriched_key("salon", after) == "salon:6439308"
    assert after.subject == "client/6439308"


def test_client_record_given_apart_from_the_appointment() -> None:
    appointment = {**APPOINTMENT, "appointment_client_links": [{"id": 1, "client_id": 6439308}]}
    e = full(thin(), appointment=appointment, client=CLIENT)
    assert e.data.client is not None
    assert e.data.client.phone == "+79166859013"


def test_client_id_alone_when_no_client_record() -> None:
    appointment = {**APPOINTMENT, "appointment_client_links": [{"id": 1, "client_id": 6439308}]}
    e = full(thin(missing=["client_id"]), appointment=appointment)
    assert e.data.client == Client(id="6439308")
    assert e.data.missing == []
    assert enriched_key("salon", e) == "salon:6439308"


def test_records_of_another_visit_or_client_are_ignored() -> None:
    other_visit = {**APPOINTMENT, "id": 1}
    e = thin()
    assert full(e, appointment=other_visit) is e
    webhook = event(Client(id="42"), Appointment(id="5833264", start=NOW))
    enriched = full(webhook, appointment=None, client=CLIENT)
    assert enriched.data.client == Client(id="42")


def test_client_created_thin_form() -> None:
    record = {**CLIENT, "name": "", "email": "", "deleted": True}
    e = full(
        event(Client(id="6439308"), name=EventName.CLIENT_CREATED, subject="client/6439308"),
        appointment=None,
        client=record,
    )
    assert e.data.client == Client(
        id="6439308",
        full_name="Петрова Мария Сергеевна",  # composed from the parts
        first_name="Мария",
        last_name="Петрова",
        patronymic="Сергеевна",
        phone="+79166859013",
        deleted=True,
    )
    assert e.data.appointment is None
    assert enriched_key("salon", e) == "salon:6439308"


def test_nothing_to_add_returns_the_same_event() -> None:
    e = thin()
    assert full(e, appointment=None) is e
    assert full(e, appointment={}) is e


def test_executor_when_present_and_odd_values() -> None:
    record = {
        **APPOINTMENT,
        "executor": {"first_name": "Ольга", "second_name": "Волкова", "phone": "8 (925) 111-22-33"},
        "paid": "t",
        "start_datetime": "2024-06-10 16:30:00.250000",
        "appointed_services": "Стрижка, Укладка",
    }
    e = full(thin(missing=["executor_name", "executor_phone", "appointment_paid"]), appointment=record)
    a = e.data.appointment
    assert a is not None
    assert a.executor == Person(name="Волкова Ольга", phone="+79251112233")
    assert a.paid is True
    assert a.start == datetime(2024, 6, 10, 16, 30, 0, 250000, tzinfo=MSK)
    assert a.services == ["Стрижка", "Укладка"]
    assert e.data.missing == []


def test_bad_phone_and_email_in_a_record_are_not_copied() -> None:
    record = {**CLIENT, "phone": "123", "email": "not an email"}
    e = full(thin(missing=["client_phone", "client_email"]), client=record, appointment=None)
    assert e.data.client is not None
    assert (e.data.client.phone, e.data.client.email) == (None, None)
    assert e.data.missing == ["client_phone", "client_email"]


def test_record_helpers() -> None:
    assert client_id_from_appointment(APPOINTMENT) == "6439308"
    assert client_id_from_appointment({"client_id": 5}) == "5"
    assert client_id_from_appointment(None) is None
    assert client_from_appointment(APPOINTMENT) == CLIENT
    assert client_from_appointment({"appointment_client_links": [{"client_id": 5}]}) is None
    assert client_from_appointment({"appointment_client_links": "oops"}) is None


# ---- visit-paid: the amount and the priced services ------------------------------------------------------


def paid_thin() -> CloudEvent:
    """The seed's visit-paid template: ids, status and paid; no amount, no services."""
    return event(
        Client(id="6439308"),
        Appointment(id="5833264", status="finished", paid=True),
        name=EventName.VISIT_PAID,
    )


def test_a_paid_visit_without_an_amount_needs_enrichment_even_with_its_start() -> None:
    appt = Appointment(id="5833264", start=NOW, status="finished")
    assert needs_enrichment(event(Client(id="7", phone="+79161234567"), appt, name=EventName.VISIT_PAID))
    with_amount = appt.model_copy(update={"total_cost": Decimal("10")})
    assert not needs_enrichment(
        event(Client(id="7", phone="+79161234567"), with_amount, name=EventName.VISIT_PAID)
    )
    # Another event with no amount is not looked up for it: only a paid visit makes an order.
    assert not needs_enrichment(event(Client(id="7", phone="+79161234567"), appt))


def test_a_paid_visit_gets_its_amount_and_priced_services() -> None:
    a = full(paid_thin(), {**APPOINTMENT, "total_cost": "3300.00"}).data.appointment
    assert a is not None
    assert a.total_cost == Decimal("3300.00")
    assert a.lines == [
        ServiceLine(name="Стрижка женская", service_id="101", price=Decimal("1800.00")),
        ServiceLine(name="Укладка", service_id="106", price=Decimal("1500.00")),
    ]
    assert a.status == "finished"  # the webhook's


def test_the_amount_is_the_sum_of_the_prices_when_the_record_has_no_total() -> None:
    a = full(paid_thin()).data.appointment
    assert a is not None
    assert a.total_cost == Decimal("3300.00")


@pytest.mark.parametrize(
    ("total", "prices", "expected"),
    [
        (3000, ["1800.00", "1200"], Decimal("3000")),  # a JSON number
        ("1 500,50", ["1500.50"], Decimal("1500.50")),  # as Klientiks may print it
        ("abc", ["100", "200"], Decimal("300")),  # unreadable: the prices' sum
        ("-5", ["100"], Decimal("100")),  # negative is not a price
        ("10.555", ["10.555"], None),  # not kopecks, and no price is either
        (None, ["100", None], None),  # a price unknown: no sum
        (True, ["100"], Decimal("100")),  # not a number
    ],
)
def test_odd_amounts_are_never_guessed(total: Any, prices: list[Any], expected: Decimal | None) -> None:
    services = [{"service_id": 100 + i, "name": f"Услуга {i}", "price": p} for i, p in enumerate(prices)]
    a = full(
        paid_thin(), {**APPOINTMENT, "total_cost": total, "appointed_services": services}
    ).data.appointment
    assert a is not None
    assert a.total_cost == expected


def test_a_count_and_junk_in_the_service_list() -> None:
    services: list[Any] = [
        {"service_id": 1, "name": "Маникюр", "price": "1000", "count": "2"},
        {"service_id": 2, "name": "", "price": "5"},  # no name: not a line
        "Педикюр",  # not a record
        {"service_id": "x", "name": "Укладка\u200b", "price": "10", "count": 0},  # odd id and count
    ]
    a = full(paid_thin(), {**APPOINTMENT, "appointed_services": services}).data.appointment
    assert a is not None
    assert a.lines == [
        ServiceLine(name="Маникюр", service_id="1", price=Decimal("1000"), qty=2),
        ServiceLine(name="Укладка", service_id=None, price=Decimal("10"), qty=1),
    ]
    assert a.total_cost == Decimal("2010")
