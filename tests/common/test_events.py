"""Unit tests for services.common.events: the event contract and its CloudEvents Kafka binding."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from services.common.events import (
    CE_TYPES,
    EVENT_BY_CE_TYPE,
    Appointment,
    Attribution,
    Client,
    CloudEvent,
    EventData,
    EventName,
    Invoice,
    Person,
    header,
    kafka_key,
    new_event_id,
    source_uri,
)

MSK = ZoneInfo("Europe/Moscow")
RECEIVED = datetime(2024, 3, 14, 9, 15, 30, 123456, tzinfo=UTC)


def make_event(**overrides: object) -> CloudEvent:
    data = EventData(
        client=Client(
            id="1842",
            full_name="Иванова Анна Сергеевна",
            first_name="Анна",
            last_name="Иванова",
            patronymic="Сергеевна",
            phone="+79991234567",
            email="anna.ivanova@mail.ru",
            deleted=False,
        ),
        appointment=Appointment(
            id="55017",
            start=datetime(2024, 3, 15, 19, 30, tzinfo=MSK),
            status="1",
            total_cost=Decimal("2500.00"),
            services=["Стрижка женская", "Окрашивание корней"],
            executor=Person(name="Смирнова Ольга", phone="+79165554433"),
        ),
        attribution=Attribution(utm={"utm_source": "yandex"}, click_ids={"yclid": "8123456789"}),
        user_position="Администратор",
        extra={"promo": "ВЕСНА2024"},
        missing=["appointment_status"],
    )
    fields: dict[str, object] = {
        "id": "0f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "source": source_uri("salon"),
        "type": EventName.APPOINTMENT_CREATED.ce_type,
        "time": RECEIVED,
        "subject": "client/1842",
        "relayreceivedat": RECEIVED,
        "data": data,
    }
    fields.update(overrides)
    return CloudEvent.model_validate(fields)


def test_kafka_headers_are_binary_mode_ce_attributes() -> None:
    ev = make_event()
    headers = dict(ev.kafka_headers())
    assert headers == {
        "ce_specversion": b"1.0",
        "ce_id": b"0f8e7d6c5b4a39281706f5e4d3c2b1a0",
        "ce_source": b"/klientiks/salon",
        "ce_type": b"ru.klientiks.appointment.created",
        "ce_time": b"2024-03-14T09:15:30.123456Z",
        "ce_subject": b"client/1842",
        "ce_relayreceivedat": b"2024-03-14T09:15:30.123456Z",
        "content-type": b"application/json",
    }
    # Every header is a (str, bytes) pair, as aiokafka wants it.
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in ev.kafka_headers())


def test_kafka_headers_leave_out_absent_subject() -> None:
    names = [k for k, _ in make_event(subject=None).kafka_headers()]
    assert "ce_subject" not in names
    assert "ce_data" not in names
    assert "ce_datacontenttype" not in names


def test_kafka_value_is_only_the_data() -> None:
    value = json.loads(make_event().kafka_value())
    assert value["schema_version"] == 1
    assert value["client"]["phone"] == "+79991234567"
    assert value["client"]["full_name"] == "Иванова Анна Сергеевна"
    assert value["appointment"]["start"] == "2024-03-15T19:30:00+03:00"
    assert value["appointment"]["executor"] == {"name": "Смирнова Ольга", "phone": "+79165554433"}
    assert value["missing"] == ["appointment_status"]
    assert "specversion" not in value
    assert "id" not in value
    # None fields are left out of the wire form.
    assert "invoice" not in value
    assert "email" not in value["appointment"]["executor"]


def test_money_is_serialised_as_a_string_keeping_its_scale() -> None:
    value = json.loads(make_event().kafka_value())
    assert value["appointment"]["total_cost"] == "2500.00"
    assert isinstance(value["appointment"]["total_cost"], str)
    inv = Invoice(amount=Decimal("1500.50"), paid_sum=Decimal("0.10"), left_to_pay=Decimal("1500.40"))
    dumped = json.loads(inv.model_dump_json(exclude_none=True))
    assert dumped == {"amount": "1500.50", "paid_sum": "0.10", "left_to_pay": "1500.40"}
    # In Python mode it stays a Decimal: only the wire form is a string.
    assert inv.model_dump()["amount"] == Decimal("1500.50")


def test_money_accepts_a_decimal_string_and_rejects_junk() -> None:
    assert Invoice.model_validate({"amount": "2500.00"}).amount == Decimal("2500.00")
    with pytest.raises(ValidationError):
        Invoice.model_validate({"amount": "две тысячи"})


def test_round_trip_through_kafka() -> None:
    ev = make_event()
    back = CloudEvent.from_kafka(ev.kafka_headers(), ev.kafka_value())
    assert back == ev
    assert back.data.appointment is not None
    assert back.data.appointment.total_cost == Decimal("2500.00")
    assert str(back.data.appointment.total_cost) == "2500.00"
    assert back.data.appointment.start == datetime(2024, 3, 15, 19, 30, tzinfo=MSK)
    assert back.time == RECEIVED
    assert back.event_name is EventName.APPOINTMENT_CREATED
    assert back.source_name == "salon"


def test_round_trip_of_a_thin_event_without_subject() -> None:
    ev = make_event(
        subject=None,
        type=EventName.APPOINTMENT_CHANGED.ce_type,
        data=EventData(appointment=Appointment(id="55020", status="1")),
    )
    back = CloudEvent.from_kafka(ev.kafka_headers(), ev.kafka_value())
    assert back == ev
    assert back.subject is None
    assert back.data.client is None


def test_from_kafka_ignores_foreign_headers_and_reads_content_type() -> None:
    ev = make_event()
    headers = [*ev.kafka_headers(), ("traceparent", b"00-abc-def-01")]
    headers = [(k, v) if k != "content-type" else (k, b"application/json; charset=utf-8") for k, v in headers]
    back = CloudEvent.from_kafka(headers, ev.kafka_value())
    assert back.datacontenttype == "application/json; charset=utf-8"
    assert back.data == ev.data


@pytest.mark.parametrize("missing", ["ce_id", "ce_source", "ce_type", "ce_time", "ce_relayreceivedat"])
def test_from_kafka_missing_required_header_fails(missing: str) -> None:
    ev = make_event()
    headers = [(k, v) for k, v in ev.kafka_headers() if k != missing]
    with pytest.raises(ValidationError) as e:
        CloudEvent.from_kafka(headers, ev.kafka_value())
    assert missing.removeprefix("ce_") in str(e.value)


def test_from_kafka_naive_time_fails() -> None:
    ev = make_event()
    headers = [(k, b"2024-03-14T09:15:30" if k == "ce_time" else v) for k, v in ev.kafka_headers()]
    with pytest.raises(ValidationError):
        CloudEvent.from_kafka(headers, ev.kafka_value())


def test_from_kafka_wrong_specversion_fails() -> None:
    ev = make_event()
    headers = [(k, b"0.3" if k == "ce_specversion" else v) for k, v in ev.kafka_headers()]
    with pytest.raises(ValidationError):
        CloudEvent.from_kafka(headers, ev.kafka_value())


def test_from_kafka_bad_value() -> None:
    ev = make_event()
    with pytest.raises(ValueError, match="Expecting"):
        CloudEvent.from_kafka(ev.kafka_headers(), b"{not json")
    with pytest.raises(ValidationError):
        CloudEvent.from_kafka(ev.kafka_headers(), b'{"schema_version": 2}')
    with pytest.raises(ValidationError):  # unknown payload fields are refused, not dropped
        CloudEvent.from_kafka(ev.kafka_headers(), b'{"client": {"id": "1", "telephone": "+79991234567"}}')


@pytest.mark.parametrize("name", list(EventName))
def test_every_event_name_has_a_ce_type_and_back(name: EventName) -> None:
    ce_type = name.ce_type
    assert ce_type.startswith("ru.klientiks.")
    assert EVENT_BY_CE_TYPE[ce_type] is name
    assert make_event(type=ce_type).event_name is name


def test_ce_types_match_the_design_table() -> None:
    assert {n.value: t for n, t in CE_TYPES.items()} == {
        "client-created": "ru.klientiks.client.created",
        "appointment-created": "ru.klientiks.appointment.created",
        "online-booking": "ru.klientiks.appointment.booked_online",
        "appointment-changed": "ru.klientiks.appointment.changed",
        "invoice-created": "ru.klientiks.invoice.created",
        "visit-paid": "ru.klientiks.visit.paid",
    }
    assert len(set(CE_TYPES.values())) == len(EventName)


def test_kafka_key_rules() -> None:
    assert kafka_key("salon", "1842", "55017") == "salon:1842"
    assert kafka_key("salon", "1842", None) == "salon:1842"
    assert kafka_key("salon", None, "55017") == "salon:appointment:55017"
    assert kafka_key("salon", "", "55017") == "salon:appointment:55017"
    assert kafka_key("salon", None, None) == "salon"
    # Same client, different appointments: same key, so one client's events stay in order.
    assert kafka_key("salon", "1842", "1") == kafka_key("salon", "1842", "2")
    # Same client id in two sources: different keys.
    assert kafka_key("salon", "1842", None) != kafka_key("clinic", "1842", None)


def test_source_uri_and_source_name() -> None:
    assert source_uri("salon-center") == "/klientiks/salon-center"
    assert make_event(source=source_uri("salon-center")).source_name == "salon-center"


def test_payload_models_are_frozen_and_strict() -> None:
    c = Client(id="1842")
    with pytest.raises(ValidationError):
        c.id = "1843"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        Client.model_validate({"id": "1842", "phone_number": "+79991234567"})


def test_aware_start_required() -> None:
    with pytest.raises(ValidationError):
        Appointment(start=datetime(2024, 3, 15, 19, 30))


def test_header_lookup_and_new_event_id() -> None:
    headers = make_event().kafka_headers()
    assert header(headers, "ce_type") == "ru.klientiks.appointment.created"
    assert header(headers, "ce_nope") is None
    a, b = new_event_id(), new_event_id()
    assert a != b
    assert len(a) == 32
    int(a, 16)


def test_from_kafka_requires_specversion() -> None:
    ev = make_event()
    headers = [(k, v) for k, v in ev.kafka_headers() if k != "ce_specversion"]
    with pytest.raises(ValueError, match="ce_specversion"):
        CloudEvent.from_kafka(headers, ev.kafka_value())


def test_from_kafka_accepts_extension_attributes_of_other_producers() -> None:
    ev = make_event()
    back = CloudEvent.from_kafka([*ev.kafka_headers(), ("ce_partitionkey", b"salon:1")], ev.kafka_value())
    assert back == ev
