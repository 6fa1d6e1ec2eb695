"""services.common.masking: the pure masking of personal data and secrets (logs and operator output)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretBytes, SecretStr

from services.common import logging as relay_logging
from services.common import ops
from services.common.masking import (
    SECRET_PLACEHOLDER,
    mask_data,
    mask_email,
    mask_field,
    mask_name,
    mask_pairs,
    mask_phone,
    mask_text,
    redact_url,
)

RAW_PHONE = "79991234567"
RAW_EMAIL = "anna.ivanova@example.com"
RAW_NAME = "Иванова Анна Сергеевна"
RAW_TOKEN = "src-tok-9f8e7d6c5b4a"
RAW_ACCESS_TOKEN = "a1b2c3d4e5f6a7b8c9d0"
RAW_SECRET = "s3cr3t-pydantic-value"


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


def test_old_import_places_still_work() -> None:
    # The operator commands and older code import these from logging and ops.
    assert relay_logging.mask_phone is mask_phone
    assert relay_logging.mask_email is mask_email
    assert relay_logging.mask_name is mask_name
    assert relay_logging.redact_url is redact_url
    assert relay_logging.SECRET_PLACEHOLDER == SECRET_PLACEHOLDER == "[secret]"
    assert ops.mask_text is mask_text
    assert ops.mask_pairs is mask_pairs
    assert ops.mask_data is mask_data


# ---------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("+79991234567", "+7*******67"),
        ("79991234567", "7*******67"),
        ("89991234567", "8*******67"),
        ("+7 (999) 123-45-67", "+7*******67"),
        ("8 999 123 45 67", "8*******67"),
        ("8(916)555-12-34", "8*******34"),
        ("9161234567", "*******67"),
        ("+380501234567", "+380*******67"),
        ("+1 415 555 2671", "+1*******71"),
        ("+7*******67", "+7*******67"),  # masking twice changes nothing
        ("12345", "***"),
        ("1234567890123456", "***"),
        ("позвонить вечером", "***"),
        ("79991234567 доб. 12", "***"),
        ("", ""),
    ],
)
def test_mask_phone(raw: str, masked: str) -> None:
    assert mask_phone(raw) == masked


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("anna.ivanova@example.com", "a***@example.com"),
        ("Sergey.Petrov+crm@yandex.ru", "S***@yandex.ru"),
        ("info@салон-красоты.рф", "i***@салон-красоты.рф"),
        ("@example.com", "***@example.com"),
        ("не email", "***"),
        ("", ""),
    ],
)
def test_mask_email(raw: str, masked: str) -> None:
    assert mask_email(raw) == masked


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("Иванова Анна Сергеевна", "И*** А*** С***"),
        ("Иванова Анна", "И*** А***"),
        ("  Пётр  ", "П***"),
        ("Римский-Корсаков Николай Андреевич", "Р*** Н*** А***"),
        ("Anna Ivanova", "A*** I***"),
        ("И*** А***", "И*** А***"),
        ("", ""),
    ],
)
def test_mask_name(raw: str, masked: str) -> None:
    assert mask_name(raw) == masked


# ------------------------------------------------------------------------------------------ by key


@pytest.mark.parametrize(
    ("key", "value", "masked"),
    [
        ("token", RAW_TOKEN, SECRET_PLACEHOLDER),
        ("X-Processing-Key", "mx-key", SECRET_PLACEHOLDER),
        ("api_key", 12345, SECRET_PLACEHOLDER),
        ("client_secret", {"nested": "x"}, SECRET_PLACEHOLDER),
        ("databaseDsn", "postgresql://u:p@h/db", SECRET_PLACEHOLDER),
        ("idempotency_key", "maxma:new-client:42", "maxma:new-client:42"),
        ("key", "salon:123", "salon:123"),
        ("client_phone", RAW_PHONE, "7*******67"),
        ("executor_phone", 79161234567, "7*******67"),
        ("phoneNumber", "89991234567", "8*******67"),
        ("client_phones", ["79991234567", "+79161234567"], ["7*******67", "+7*******67"]),
        ("email", RAW_EMAIL, "a***@example.com"),
        ("fullName", RAW_NAME, "И*** А*** С***"),
        ("client_first_name", "Анна", "А***"),
        ("executor_name", "Петрова Мария", "П*** М***"),
        ("path", f"/hooks/klientiks/{RAW_TOKEN}/record_created", "/hooks/klientiks/***/record_created"),
        ("client_id", 42, 42),
        ("service", "Стрижка", "Стрижка"),
        ("comment", f"звонить {RAW_PHONE}", "звонить 7*******67"),
        ("phone", None, None),
        ("name", "", ""),
    ],
)
def test_mask_field_by_key_and_content(key: str, value: Any, masked: Any) -> None:
    assert mask_field(key, value) == masked


def test_secret_values_are_dropped_under_any_key() -> None:
    class Creds(BaseModel):
        api_secret: SecretStr
        client_phone: str
        salon: int

    @dataclass
    class Call:
        url: str
        phone: str

    data = {
        "plain": SecretStr(RAW_SECRET),
        "raw": SecretBytes(b"raw-bytes-secret"),
        "deep": {"a": {"b": [SecretStr(RAW_SECRET)]}},
        "creds": Creds(api_secret=SecretStr(RAW_SECRET), client_phone=RAW_PHONE, salon=7),
        "call": Call(url=f"https://x.example/?access_token={RAW_TOKEN}", phone=RAW_PHONE),
    }
    masked = mask_data(data)
    assert masked["plain"] == masked["raw"] == SECRET_PLACEHOLDER
    assert masked["deep"] == {"a": {"b": [SECRET_PLACEHOLDER]}}
    assert masked["creds"] == {"api_secret": SECRET_PLACEHOLDER, "client_phone": "7*******67", "salon": 7}
    assert masked["call"] == {"url": "https://x.example/?access_token=***", "phone": "7*******67"}
    assert data["plain"] == SecretStr(RAW_SECRET)  # the input is left as it was


def test_mask_pairs_by_name_and_by_content() -> None:
    pairs = [
        ("client_phone", RAW_PHONE),
        ("client_name", "Иванова Анна"),
        ("token", RAW_TOKEN),
        ("comment", f"пишите на {RAW_EMAIL}"),
        ("salon_id", "15"),
    ]
    assert mask_pairs(pairs) == [
        ("client_phone", "7*******67"),
        ("client_name", "И*** А***"),
        ("token", SECRET_PLACEHOLDER),
        ("comment", "пишите на a***@example.com"),
        ("salon_id", "15"),
    ]


def test_mask_data_keeps_structure_and_scalars() -> None:
    data = {
        "client": {"phone": f"+{RAW_PHONE}", "name": "Анна", "id": "1842", "vip": True},
        "amounts": [1500, 2.5, None],
        "note": f"перезвонить {RAW_PHONE}",
    }
    assert mask_data(data) == {
        "client": {"phone": "+7*******67", "name": "А***", "id": "1842", "vip": True},
        "amounts": [1500, 2.5, None],
        "note": "перезвонить 7*******67",
    }


def test_mask_data_cuts_off_deep_structures() -> None:
    deep: Any = RAW_PHONE
    for _ in range(40):
        deep = [deep]
    rendered = repr(mask_data(deep))
    assert "[truncated]" in rendered
    assert RAW_PHONE not in rendered


# ---------------------------------------------------------------------------------------------- URLs


def test_webhook_url_loses_token_and_personal_query_values() -> None:
    url = (
        f"https://relay.example.ru/hooks/klientiks/{RAW_TOKEN}/record_created"
        f"?client_phone=%2B{RAW_PHONE}&client_email=anna.ivanova%40example.com"
        "&client_name=%D0%98%D0%B2%D0%B0%D0%BD%D0%BE%D0%B2%D0%B0+%D0%90%D0%BD%D0%BD%D0%B0"
        "&salon_id=15&access_token=qwerty12345"
    )
    redacted = redact_url(url)
    assert redacted == (
        "https://relay.example.ru/hooks/klientiks/***/record_created"
        "?client_phone=+7*******67&client_email=a***@example.com"
        "&client_name=И***+А***&salon_id=15&access_token=***"
    )
    # relative paths (as uvicorn and FastAPI see them) too
    assert redact_url(f"/hooks/klientiks/{RAW_TOKEN}") == "/hooks/klientiks/***"
    assert redact_url(f"/hooks/klientiks/{RAW_TOKEN}/visit_deleted?phone={RAW_PHONE}") == (
        "/hooks/klientiks/***/visit_deleted?phone=7*******67"
    )


def test_klientiks_restapi_url_loses_access_token() -> None:
    url = (
        f"https://klientiks.ru/clientix/Restapi/list/a/1234/u/5678/t/{RAW_ACCESS_TOKEN}/app/clients?limit=50"
    )
    redacted = redact_url(url)
    assert RAW_ACCESS_TOKEN not in redacted
    assert redacted == "https://klientiks.ru/clientix/Restapi/list/a/1234/u/5678/t/***/app/clients?limit=50"


@pytest.mark.parametrize(
    ("raw", "redacted"),
    [
        (
            "https://api.cpa.house/v1/lead?api_key=abc123&order=5",
            "https://api.cpa.house/v1/lead?api_key=***&order=5",
        ),
        (
            "https://x.example/?key=abc&secret=s&password=p",
            "https://x.example/?key=***&secret=***&password=***",
        ),
        ("https://x.example/?processing_key=abc&token=t", "https://x.example/?processing_key=***&token=***"),
        ("postgresql+asyncpg://relay:pa55w0rd@db:5432/relay", "postgresql+asyncpg://relay:***@db:5432/relay"),
        (
            "https://x.example/api/clients?page=2&first_name=Anna",
            "https://x.example/api/clients?page=2&first_name=A***",
        ),
        (
            "https://api.weeek.com/public/v1/tm/tasks?perPage=10",
            "https://api.weeek.com/public/v1/tm/tasks?perPage=10",
        ),
    ],
)
def test_redact_url_query_parameters(raw: str, redacted: str) -> None:
    assert redact_url(raw) == redacted


# ----------------------------------------------------------------------------------------- free text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Клиент +7 (999) 123-45-67 записан", "Клиент +7*******67 записан"),
        ("перезвонить: 8 999 123 45 67, спасибо", "перезвонить: 8*******67, спасибо"),
        (f"client {RAW_PHONE} not found", "client 7*******67 not found"),
        ("тел.89991234567.", "тел.8*******67."),
        ("международный +380 50 123 45 67", "международный +380*******67"),
        (
            "пишите на anna.ivanova@example.com или petrov@mail.ru",
            "пишите на a***@example.com или p***@mail.ru",
        ),
        (
            f"POST /hooks/klientiks/{RAW_TOKEN}/record_created?client_phone={RAW_PHONE} HTTP/1.1",
            "POST /hooks/klientiks/***/record_created?client_phone=7*******67 HTTP/1.1",
        ),
        (
            f"GET https://klientiks.ru/clientix/Restapi/list/a/1/u/2/t/{RAW_ACCESS_TOKEN}/app/clients failed",
            "GET https://klientiks.ru/clientix/Restapi/list/a/1/u/2/t/***/app/clients failed",
        ),
        (
            "uuid 123e4567-e89b-12d3-a456-789012345678 +7 999 123 45 67",
            "uuid 123e4567-e89b-12d3-a456-789012345678 +7*******67",
        ),
        (
            "key 78123456-1234-4567-8901-234567890123 89991234567",
            "key 78123456-1234-4567-8901-234567890123 8*******67",
        ),
        ("Authorization: Bearer abcdef1234567890", "Authorization: Bearer ***"),
        ("sent with X-Processing-Key: mx-12345", "sent with X-Processing-Key: ***"),
        ("payload {'api_key': 'cpa123', 'lead': 5}", "payload {'api_key': '***', 'lead': 5}"),
    ],
)
def test_free_text_personal_data_and_secrets_masked(text: str, expected: str) -> None:
    assert mask_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "at 2024-05-01T12:34:56.789012+03:00 done",
        "at 2024-08-17 18:30:00+07:00 done",
        "request 550e8400-e29b-41d4-a716-446655440000 done",
        "request 78123456-1234-4567-8901-234567890123 done",
        "paid 1500.00 RUB, total 78000000000.50",
        "record 123456 salon 42 visit 987654321",
        "since epoch 1714567890",
        "kafka key salon:123 offset 15",
        "idempotency_key=record:42:created",
    ],
)
def test_free_text_without_personal_data_is_kept(text: str) -> None:
    assert mask_text(text) == text


# -------------------------------------------------------------------------------------------- property

SEPARATORS = ["", "", "", " ", "-", " (", ") ", "(", ")", "  ", " - "]
CONTEXTS = [
    ("Клиент ", " записан"),
    ("перезвонить на ", ", спасибо"),
    ("тел.", "."),
    ("phone=", "&salon_id=15"),
    ('{"comment": "', '"}'),
    ("", ""),
    ("GET /hooks/klientiks/abc/record_created?client_phone=", " HTTP/1.1"),
]


@st.composite
def russian_mobiles(draw: st.DrawFn) -> tuple[str, str]:
    """(formatted phone, its ten national digits)."""
    prefix = draw(st.sampled_from(["7", "+7", "8"]))
    national = draw(st.text(alphabet="0123456789", min_size=10, max_size=10))
    parts = [prefix]
    for digit in national:
        parts.append(draw(st.sampled_from(SEPARATORS)))
        parts.append(digit)
    return "".join(parts), national


@settings(max_examples=300, deadline=None)
@given(phone=russian_mobiles(), context=st.sampled_from(CONTEXTS))
def test_property_masked_line_never_contains_the_phone(
    phone: tuple[str, str], context: tuple[str, str]
) -> None:
    formatted, national = phone
    before, after = context
    line = f"{before}{formatted}{after}"
    for value in (mask_text(line), mask_field("note", line), mask_field("client_phone", formatted)):
        assert formatted not in value
        assert national not in digits(value)
        assert national[:-2] not in digits(value)
