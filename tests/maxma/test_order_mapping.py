"""Unit tests of the order and client-update mapping (services.maxma.mapping): every field Maxma gets."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from services.common.events import (
    Appointment,
    Client,
    CloudEvent,
    EventData,
    EventName,
    Invoice,
    ServiceLine,
    source_uri,
)
from services.maxma import mapping
from services.maxma.mapping import MappingError

PAID_AT = datetime(2026, 11, 21, 12, 30, 5, tzinfo=UTC)
CLIENT = Client(
    id="1842", full_name="Иванова Анна", first_name="Анна", last_name="Иванова", phone="+79991234567"
)


def visit(
    *,
    name: EventName = EventName.VISIT_PAID,
    client: Client | None = CLIENT,
    appt: Appointment | None = None,
    invoice: Invoice | None = None,
) -> CloudEvent:
    if appt is None and name is not EventName.INVOICE_CREATED:
        appt = Appointment(id="55017", total_cost=Decimal("2500.00"), services=["Стрижка женская"])
    return CloudEvent(
        id="e1", source=source_uri("salon"), type=name.ce_type, time=PAID_AT, relayreceivedat=PAID_AT,
        data=EventData(client=client, appointment=appt, invoice=invoice),
    )  # fmt: skip


def test_set_order_body_for_a_paid_visit() -> None:
    body = mapping.set_order_body(visit(), "main", "Салон на Тверской")
    assert body == {
        "orderId": "salon:55017",
        "calculationQuery": {
            "client": {"phoneNumber": "+79991234567"},
            "shop": {"code": "main", "name": "Салон на Тверской"},
            "executedAt": "2026-11-21T12:30:05+00:00",
            "rows": [
                {
                    "id": "1",
                    "product": {"sku": "visit", "title": "Стрижка женская", "blackPrice": 2500.0},
                    "qty": 1,
                }
            ],
            "applyBonuses": 0,
            "collectBonuses": "auto",
        },
    }
    json.dumps(body, ensure_ascii=False)  # serialisable as it is sent


def test_one_row_per_priced_service_when_they_add_up() -> None:
    lines = [
        ServiceLine(name="Стрижка женская", service_id="101", price=Decimal("1800.00")),
        ServiceLine(name="Укладка", service_id="106", price=Decimal("350.50"), qty=2),
    ]
    appt = Appointment(id="7", total_cost=Decimal("2501.00"), lines=lines)
    rows = mapping.set_order_body(visit(appt=appt), "main", "M")["calculationQuery"]["rows"]
    assert rows == [
        {
            "id": "1",
            "product": {"sku": "service-101", "title": "Стрижка женская", "blackPrice": 1800.0},
            "qty": 1,
        },
        {"id": "2", "product": {"sku": "service-106", "title": "Укладка", "blackPrice": 350.5}, "qty": 2},
    ]


@pytest.mark.parametrize(
    "lines",
    [
        # A discount: the prices do not add up to what was paid, so the paid amount is one row.
        [ServiceLine(name="A", price=Decimal("2000")), ServiceLine(name="B", price=Decimal("1000"))],
        # A price unknown: the split cannot be made.
        [ServiceLine(name="A", price=Decimal("2000")), ServiceLine(name="B")],
    ],
)
def test_one_row_for_the_visit_when_prices_do_not_explain_the_amount(lines: list[ServiceLine]) -> None:
    appt = Appointment(id="7", total_cost=Decimal("2500"), lines=lines)
    (row,) = mapping.order_rows(visit(appt=appt), Decimal("2500"))
    assert row == {"id": "1", "product": {"sku": "visit", "title": "A, B", "blackPrice": 2500.0}, "qty": 1}


def test_a_long_list_of_services_is_counted_not_cut() -> None:
    names = [f"Услуга номер {i} с длинным названием" for i in range(20)]
    appt = Appointment(id="7", total_cost=Decimal("100"), services=names)
    (row,) = mapping.order_rows(visit(appt=appt), Decimal("100"))
    assert row["product"]["title"] == "Визит (20 услуг)"


def test_decimals_stay_exact() -> None:
    appt = Appointment(id="7", total_cost=Decimal("1234.56"))
    (row,) = mapping.order_rows(visit(appt=appt), Decimal("1234.56"))
    assert json.dumps(row["product"]["blackPrice"]) == "1234.56"


def test_a_visit_without_an_amount_names_the_template_parameter() -> None:
    with pytest.raises(MappingError) as e:
        mapping.set_order_body(visit(appt=Appointment(id="7")), "main", "M")
    assert "no amount" in str(e.value)
    assert e.value.hint is not None
    assert "appointment_total_cost={{appointment.total_cost}}" in e.value.hint
    assert "visit-paid" in e.value.hint


def test_an_invoice_orders_its_amount_under_the_visit_id() -> None:
    inv = Invoice(object_id="55017", amount=Decimal("3000"), paid_sum=Decimal("1000"))
    ev = visit(name=EventName.INVOICE_CREATED, invoice=inv, appt=Appointment(id="55017"))
    body = mapping.set_order_body(ev, "main", "M")
    assert body["orderId"] == "salon:55017"  # the same order a visit-paid of that visit would make
    assert body["calculationQuery"]["rows"][0]["product"]["blackPrice"] == 3000.0


def test_an_invoice_without_an_amount_names_its_parameter() -> None:
    ev = visit(name=EventName.INVOICE_CREATED, invoice=Invoice(object_id="5"), appt=Appointment(id="5"))
    with pytest.raises(MappingError) as e:
        mapping.order_amount(ev)
    assert e.value.hint is not None
    assert "appointment_amount={{amount}}" in e.value.hint


def test_a_negative_amount_is_not_an_order() -> None:
    with pytest.raises(MappingError, match="negative"):
        mapping.order_amount(visit(appt=Appointment(id="7", total_cost=Decimal("-10"))))


def test_the_client_is_named_by_phone_else_by_external_id() -> None:
    assert mapping.order_client(visit()) == {"phoneNumber": "+79991234567"}
    assert mapping.order_client(visit(client=Client(id="9"))) == {"externalId": "9"}
    with pytest.raises(MappingError) as e:
        mapping.order_client(visit(client=None))
    assert e.value.hint is not None
    assert "client_id" in e.value.hint


def test_no_visit_id_no_order() -> None:
    with pytest.raises(MappingError, match="appointment id"):
        mapping.order_id(visit(appt=Appointment(total_cost=Decimal("1"))))


def test_confirm_and_cancel_bodies() -> None:
    assert mapping.confirm_order_body(visit()) == {
        "orderId": "salon:55017",
        "executedAt": "2026-11-21T12:30:05+00:00",
    }
    assert mapping.cancel_order_body("salon:55017", visit()) == {
        "orderId": "salon:55017",
        "executedAt": "2026-11-21T12:30:05+00:00",
    }


@pytest.mark.parametrize(
    ("status", "cancels"),
    [
        ("cancelled", True),
        ("Cancelled_By_SMS", True),
        (" cancelled ", True),
        ("finished", False),
        (None, False),
    ],
)
def test_which_status_cancels(status: str | None, cancels: bool) -> None:
    ev = visit(name=EventName.APPOINTMENT_CHANGED, appt=Appointment(id="7", status=status))
    assert mapping.is_cancellation(ev, ("cancelled", "cancelled_by_sms")) is cancels


def test_update_body_by_external_id_or_by_phone() -> None:
    by_id = mapping.update_client_body(visit(name=EventName.CLIENT_CREATED), by_external_id=True)
    assert by_id["externalId"] == "1842"
    assert by_id["client"]["fullName"] == "Иванова Анна"
    by_phone = mapping.update_client_body(visit(name=EventName.CLIENT_CREATED), by_external_id=False)
    assert by_phone["phoneNumber"] == "+79991234567"
    # Found by phone, the Maxma client may be another system's: its externalId is not rewritten.
    assert "externalId" not in by_phone["client"]


def test_the_fingerprint_follows_names_email_and_phone_only() -> None:
    base = mapping.client_fingerprint(visit())
    assert mapping.client_fingerprint(visit()) == base
    for change in ({"email": "a@b.ru"}, {"phone": "+79990000000"}, {"full_name": "Петрова Анна"}):
        assert mapping.client_fingerprint(visit(client=CLIENT.model_copy(update=change))) != base
    assert mapping.client_fingerprint(visit(client=CLIENT.model_copy(update={"deleted": True}))) == base
