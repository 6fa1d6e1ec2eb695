"""Unit tests for services.maxma.mapping: a normalized event to the body of Maxma's POST /new-client."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from services.common.events import Appointment, Client, CloudEvent, EventData, EventName, source_uri
from services.maxma.mapping import MappingError, new_client_body

RECEIVED = datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC)


def event(client: Client | None, *, name: EventName = EventName.CLIENT_CREATED) -> CloudEvent:
    return CloudEvent(
        id="0f8e7d6c5b4a39281706f5e4d3c2b1a0",
        source=source_uri("salon"),
        type=name.ce_type,
        time=RECEIVED,
        subject=f"client/{client.id}" if client and client.id else None,
        relayreceivedat=RECEIVED,
        data=EventData(client=client, appointment=Appointment(id="55017") if client is None else None),
    )


def test_full_client() -> None:
    ev = event(
        Client(
            id="1842",
            full_name="Иванова Анна Сергеевна",
            first_name="Анна",
            last_name="Иванова",
            patronymic="Сергеевна",
            phone="+79991234567",
            email="anna.ivanova@mail.ru",
            deleted=False,
        )
    )
    assert new_client_body(ev) == {
        "client": {
            "phoneNumber": "+79991234567",
            "externalId": "1842",
            "fullName": "Иванова Анна Сергеевна",
            "surname": "Иванова",
            "name": "Анна",
            "patronymicName": "Сергеевна",
            "email": "anna.ivanova@mail.ru",
        }
    }


def test_absent_fields_are_omitted_not_null() -> None:
    body = new_client_body(event(Client(id="1842", phone="+79991234567", full_name="Петров Иван")))
    assert body == {
        "client": {"phoneNumber": "+79991234567", "externalId": "1842", "fullName": "Петров Иван"}
    }
    # Nothing that would overwrite Maxma's data with null or "".
    assert None not in body["client"].values()
    assert "" not in body["client"].values()


def test_body_is_json_serialisable_with_cyrillic() -> None:
    body = new_client_body(event(Client(id="1842", phone="+79991234567", last_name="Иванова")))
    assert json.loads(json.dumps(body, ensure_ascii=False)) == body
    assert body["client"]["surname"] == "Иванова"


def test_works_for_any_event_carrying_a_client() -> None:
    ev = event(Client(id="1842", phone="+79991234567"), name=EventName.APPOINTMENT_CREATED)
    assert new_client_body(ev) == {"client": {"phoneNumber": "+79991234567", "externalId": "1842"}}


def test_no_phone_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="phone"):
        new_client_body(event(Client(id="1842", full_name="Иванова Анна Сергеевна")))


def test_empty_phone_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="phone"):
        new_client_body(event(Client(id="1842", phone="")))


def test_no_client_id_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="externalId"):
        new_client_body(event(Client(phone="+79991234567", full_name="Иванова Анна Сергеевна")))


def test_no_client_at_all_is_a_mapping_error() -> None:
    # The thin seed-004 form: an appointment id only.
    with pytest.raises(MappingError, match="client id"):
        new_client_body(event(None, name=EventName.ONLINE_BOOKING))


def test_mapping_error_is_a_value_error() -> None:
    assert issubclass(MappingError, ValueError)
