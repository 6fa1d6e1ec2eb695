"""Unit tests for services.ingest.parsing and services.ingest.inbox: raw Klientiks requests to typed events.

The URL templates below are copied from the seed guides (shared/seeds/000_*, 004_*), mistakes included:
`appointment.time={{appointment_time}}` (a dot in the key) and `appointment_status={appointment.status}}`
(one brace missing, so Klientiks leaves it unrendered).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import phonenumbers
import pytest

from services.common.events import Client
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import (
    Normalized,
    Params,
    ParamsError,
    Rejected,
    canonical_key,
    is_placeholder,
    normalize,
    normalize_phone,
    parse_bool,
    parse_date,
    parse_datetime,
    parse_money,
    parse_time,
    request_params,
    split_name,
    split_services,
)

MSK = ZoneInfo("Europe/Moscow")
RECEIVED_AT = datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC)

# ---------------------------------------------------------------------------------------------------------
# Seed URL templates (parameter strings exactly as users copy them).

TPL_CLIENT_CREATED = (
    "client_id={{id}}&client_phone={{phone}}&client_name={{name}}&client_first_name={{first_name}}"
    "&client_patron_name={{patron_name}}&client_second_name={{second_name}}&client_deleted={{deleted}}"
    "&client_email={{email}}"
)
TPL_APPOINTMENT_CREATED = (
    "client_id={{client.id}}&client_phone={{client.phone}}&client_name={{client.name}}"
    "&appointment_id={{appointment.id}}&appointment_date={{appointment.date}}"
    "&appointment.time={{appointment_time}}&executor_name={{executor_name}}&executor_phone={{executor_phone}}"
    "&services={{services}}&appointment_total_cost={{appointment.total_cost}}&user_position={{user.position}}"
)
TPL_INVOICE_CREATED = (
    "client_id={{client_id}}&client_name={{client.name}}&client_phone={{client.phone}}"
    "&appointment_id={{object_id}}&appointment_amount={{amount}}&appointment_paid={{paid}}"
    "&appointment_name={{name}}&appointment_description={{description}}&appointment_paid_sum={{paid_sum}}"
    "&appointment_left_to_pay={{left_to_pay}}"
)
TPL_VISIT_PAID = (
    "client_id={{client_id}}&appointment_id={{appointment.id}}&appointment_account_id={{appointment.account_id}}"
    "&appointment_created={{appointment.created}}&appointment_appointment_id={{appointment.appointment_id}}"
    "&appointment_status={appointment.status}}&appointment_paid={{appointment.paid}}"
)
# Seed 004: the thin form for "Онлайн-запись через виджет" / "Запись клиента на прием" ...
TPL_THIN_BOOKING = (
    "appointment_id={{#appointment}}{{id}}{{/appointment}}&status={{#new_data}}{{status}}{{/new_data}}"
)
# ... and for "Перенос визита, изменение длительности, изменение статуса".
TPL_THIN_CHANGED = (
    "appointment_id={{#new_data}}{{id}}{{/new_data}}&status={{#new_data}}{{status}}{{/new_data}}"
)

_SECTION = re.compile(r"\{\{#([\w.]+)\}\}(.*?)\{\{/\1\}\}")
_VAR = re.compile(r"\{\{([\w.]+)\}\}")


def render(template: str, ctx: Mapping[str, Any]) -> str:
    """A tiny Mustache as Klientiks applies it: known variables are URL-encoded, unknown ones left as they are.

    `{{#name}}...{{/name}}` renders its inside with ``ctx[name]`` (a dict); a single-brace typo such as
    `{appointment.status}}` is no tag at all and stays in the URL literally.
    """

    def section(m: re.Match[str]) -> str:
        inner = ctx.get(m.group(1))
        return render(m.group(2), inner) if isinstance(inner, Mapping) else m.group(0)

    def var(m: re.Match[str]) -> str:
        name = m.group(1)
        return quote(str(ctx[name]), safe="") if name in ctx else m.group(0)

    return _VAR.sub(var, _SECTION.sub(section, template))


def record(event: str, query: str, *, body: bytes = b"", content_type: str | None = None) -> InboxRecord:
    return InboxRecord.build(
        id="evt-0001",
        source="salon",
        event=event,
        received_at=RECEIVED_AT,
        method="POST" if body else "GET",
        query=query,
        content_type=content_type,
        body=body,
    )


def ok(result: Normalized | Rejected) -> Normalized:
    assert isinstance(result, Normalized), result
    return result


def run(event: str, query: str, **kw: Any) -> Normalized | Rejected:
    return normalize(record(event, query, **kw), zone=MSK, phone_region="RU")


def value_json(n: Normalized) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(n.event.kafka_value())
    return data


# ---------------------------------------------------------------------------------------------------------
# request_params


def test_request_params_query_only() -> None:
    q = urlencode({"client_id": "1842", "client_name": "Иванова Анна Сергеевна"})
    assert request_params(q, None, b"") == [("client_id", "1842"), ("client_name", "Иванова Анна Сергеевна")]


def test_request_params_keeps_blank_values_and_repeats_in_order() -> None:
    assert request_params("client_email=&client_id=1&client_id=2", None, b"") == [
        ("client_email", ""),
        ("client_id", "1"),
        ("client_id", "2"),
    ]


def test_request_params_merges_query_then_form_body() -> None:
    body = urlencode({"client_name": "Иванова Анна Сергеевна", "client_phone": "8 (999) 123-45-67"}).encode()
    pairs = request_params("client_id=1842", "application/x-www-form-urlencoded; charset=UTF-8", body)
    assert pairs == [
        ("client_id", "1842"),
        ("client_name", "Иванова Анна Сергеевна"),
        ("client_phone", "8 (999) 123-45-67"),
    ]


def test_request_params_text_plain_body_is_read_as_a_form() -> None:
    assert request_params("", "text/plain", b"client_id=7&status=1") == [("client_id", "7"), ("status", "1")]


def test_request_params_merges_query_then_json_body_with_non_string_values() -> None:
    body = json.dumps(
        {
            "client_id": 1842,
            "client_name": "Иванова Анна Сергеевна",
            "client_deleted": False,
            "appointment_total_cost": 2500.5,
            "services": ["Стрижка женская", "Укладка"],
            "client_email": None,
        },
        ensure_ascii=False,
    ).encode()
    pairs = request_params("utm_source=yandex", "application/json", body)
    assert pairs == [
        ("utm_source", "yandex"),
        ("client_id", "1842"),
        ("client_name", "Иванова Анна Сергеевна"),
        ("client_deleted", "false"),
        ("appointment_total_cost", "2500.5"),
        ("services", '["Стрижка женская", "Укладка"]'),
        ("client_email", ""),
    ]


def test_request_params_sniffs_json_without_content_type() -> None:
    assert request_params("", None, b'  {"client_id": "77"}') == [("client_id", "77")]


def test_request_params_empty_body_ignores_content_type() -> None:
    assert request_params("client_id=5", "application/xml", b"  \n") == [("client_id", "5")]


def test_request_params_malformed_json_names_line_and_column() -> None:
    with pytest.raises(ParamsError, match=r"JSON body is malformed at line 2, column \d+"):
        request_params("", "application/json", b'{"client_id": "1",\n "client_name": }')


def test_request_params_json_must_be_an_object() -> None:
    with pytest.raises(ParamsError, match="must be an object"):
        request_params("", "application/json", b'["client_id", "1"]')


def test_a_form_value_that_is_not_utf8_is_invalid_and_the_others_stay() -> None:
    body = "client_name=Иванова".encode("cp1251") + b"&client_id=7"
    params = Params.of(request_params("", "application/x-www-form-urlencoded", body))
    assert params.values == {"client_id": "7"}
    assert params.missing == {"client_name": "invalid"}


def test_a_json_body_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ParamsError, match="not UTF-8"):
        request_params("", "application/json", '{"client_name": "Иванова"}'.encode("cp1251"))


@pytest.mark.parametrize(
    "body",
    [
        b'{"client_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # RecursionError in json.loads
        b'{"client_id": ' + b"1" * 5000 + b"}",  # ValueError: over the 4,300-digit int limit
    ],
)
def test_request_params_json_python_cannot_read_is_a_params_error(body: bytes) -> None:
    with pytest.raises(ParamsError, match="JSON body"):
        request_params("", "application/json", body)


def test_request_params_unsupported_content_type_says_what_to_send() -> None:
    with pytest.raises(ParamsError) as e:
        request_params("", "application/xml", b"<client id='1'/>")
    assert "'application/xml'" in str(e.value)
    assert "query string" in str(e.value)
    assert "JSON object" in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# canonical_key, is_placeholder, Params


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("appointment.time", "appointment_time"),
        ("appointment_time", "appointment_time"),
        (" Client_ID ", "client_id"),
        ("utm-source", "utm_source"),
    ],
)
def test_canonical_key(raw: str, key: str) -> None:
    assert canonical_key(raw) == key


@pytest.mark.parametrize(
    "value",
    [
        "{{phone}}",
        "{{client.phone}}",
        "{appointment.status}}",
        "{{#new_data}}{{status}}{{/new_data}}",
        "{{#appointment}}{{id}}{{/appointment}}",
        "{id}",
        "{client.id}",
        " {{name}} ",
        "{{phone}",
    ],
)
def test_is_placeholder_true(value: str) -> None:
    assert is_placeholder(value)


@pytest.mark.parametrize(
    "value",
    ["Иванова", "Иванова Анна Сергеевна", "{весна}", "Акция {весна} -20%", "100", "79991234567", "", "a{b}"],
)
def test_is_placeholder_false(value: str) -> None:
    assert not is_placeholder(value)


def test_params_records_empty_and_placeholder_as_missing_never_as_values() -> None:
    p = Params.of(
        [
            ("client_id", "1842"),
            ("client_phone", "{{phone}}"),
            ("client_email", ""),
            ("appointment_status", "{appointment.status}}"),
            ("appointment.time", "  "),
        ]
    )
    assert p.values == {"client_id": "1842"}
    assert p.missing == {
        "client_phone": "placeholder",
        "client_email": "empty",
        "appointment_status": "placeholder",
        "appointment_time": "empty",
    }
    assert p.get("client_phone") is None


def test_params_first_value_wins() -> None:
    p = Params.of([("client_name", "Иванова Анна"), ("client_name", "Петрова Мария")])
    assert p.get("client_name") == "Иванова Анна"


def test_params_a_later_real_value_replaces_a_missing_one() -> None:
    p = Params.of([("client_phone", "{{phone}}"), ("client_phone", "79991234567")])
    assert p.get("client_phone") == "79991234567"
    assert "client_phone" not in p.missing


def test_params_a_later_placeholder_does_not_mark_a_present_value_missing() -> None:
    p = Params.of([("client_phone", "79991234567"), ("client_phone", "{{phone}}"), ("client_phone", "")])
    assert p.get("client_phone") == "79991234567"
    assert "client_phone" not in p.missing


def test_params_strips_values_and_merges_dotted_keys() -> None:
    p = Params.of([("appointment.time", " 19:30 ")])
    assert p.get("appointment_time") == "19:30"


# ---------------------------------------------------------------------------------------------------------
# Value parsers


@pytest.mark.parametrize(
    "raw",
    [
        "79991234567",
        "89991234567",
        "9991234567",
        "+79991234567",
        "8 (999) 123-45-67",
        "+7 999 123 45 67",
        "+7 (999) 123-45-67",
        "7-999-123-45-67",
    ],
)
def test_normalize_phone_ru_spellings(raw: str) -> None:
    assert normalize_phone(raw, "RU") == "+79991234567"


def test_normalize_phone_moscow_landline() -> None:
    assert normalize_phone("8 (495) 123-45-67", "RU") == "+74951234567"


@pytest.mark.parametrize("raw", ["87011234567", "8 (701) 123-45-67", "+7 701 123 45 67", "7011234567"])
def test_normalize_phone_kz_region(raw: str) -> None:
    assert normalize_phone(raw, "KZ") == "+77011234567"


@pytest.mark.parametrize(
    "raw", ["", "12345", "abc", "{{phone}}", "+7 999 123", "8 (999) 123-45-6789", "нет телефона", "0000000"]
)
def test_normalize_phone_invalid_is_none(raw: str) -> None:
    assert normalize_phone(raw, "RU") is None


def test_normalize_phone_refuses_what_e164_cannot_hold() -> None:
    # libphonenumber calls this German service number valid, but it has 16 digits.
    assert normalize_phone("+49 18000 000000000", "RU") is None


def test_unassigned_russian_block_is_not_a_phone() -> None:
    assert normalize_phone("79300000000", "RU") is None
    assert normalize_phone("+7 (930) 123-45-67", "RU") == "+79301234567"


@pytest.mark.parametrize(
    "raw",
    [
        *("1", "true", "True", "t", "yes", "Y", "on", "да", "Да", "ДА", "д", "истина", " 1 "),
        *("TRUE", "tRuE", "T", "YES", "On", "ON", "оплачен", "Оплачено", "оплачена", "paid", "PAID"),
    ],
)
def test_parse_bool_true(raw: str) -> None:
    assert parse_bool(raw) is True


@pytest.mark.parametrize(
    "raw",
    [
        *("0", "false", "FALSE", "f", "no", "n", "off", "нет", "Нет", "н", "ложь", "null", "None"),
        *(
            "False",
            "F",
            "No",
            "OFF",
            "НЕТ",
            "не оплачен",
            "Не  оплачено",
            "не\u00a0оплачена",
            "unpaid",
            "Unpaid",
        ),
    ],
)
def test_parse_bool_false(raw: str) -> None:
    assert parse_bool(raw) is False


@pytest.mark.parametrize("raw", ["", "может быть", "2", "оплачено частично"])
def test_parse_bool_unknown_is_none(raw: str) -> None:
    assert parse_bool(raw) is None


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("1 500,50", Decimal("1500.50")),
        ("1\u00a0500,50", Decimal("1500.50")),
        ("1500.00", Decimal("1500.00")),
        ("2500", Decimal("2500")),
        ("2 500 ₽", Decimal("2500")),
        ("2500₽", Decimal("2500")),
        ("2 500 руб.", Decimal("2500")),
        ("0", Decimal("0")),
        ("1500", Decimal("1500")),
        ("1500.5 руб.", Decimal("1500.5")),
        ("1 500 ₽", Decimal("1500")),
        ("-200", Decimal("-200")),  # a refund
        ("\u2212200 руб", Decimal("-200")),  # a typographic minus
        ("1\u2009500,50", Decimal("1500.50")),  # thin space
        ("1\u202f500\u00a0₽", Decimal("1500")),  # narrow no-break space
        ("12 345 678,9", Decimal("12345678.9")),
        ("0.125", Decimal("0.125")),  # not rounded to kopecks
    ],
)
def test_parse_money(raw: str, value: Decimal) -> None:
    parsed = parse_money(raw)
    assert parsed == value
    assert str(parsed) == str(value)  # the scale (trailing zeros) is kept


@pytest.mark.parametrize(
    "raw",
    [
        *("", "abc", "две тысячи", "NaN", "nan", "sNaN", "Infinity", "-Infinity", "inf"),
        *("1e3", "1E3", "1.5e2", "2500e-2", "0x10", "1_500"),  # exponents and Python-only spellings
        *("12 34", "1,500.50", "1.500,50", "1500.", ".5", "--200", "+-200", "1500 $", "1500 руб 50 коп"),
    ],
)
def test_parse_money_junk_is_none(raw: str) -> None:
    assert parse_money(raw) is None


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("2024-03-15", date(2024, 3, 15)),
        ("15.03.2024", date(2024, 3, 15)),
        ("15/03/2024", date(2024, 3, 15)),
        ("2024-03-15 19:30:00", date(2024, 3, 15)),
        ("15.03.2024 19:30", date(2024, 3, 15)),
        ("2024-03-15T19:30:00+05:00", date(2024, 3, 15)),
    ],
)
def test_parse_date(raw: str, value: date) -> None:
    assert parse_date(raw) == value


@pytest.mark.parametrize(
    "raw", ["", "вчера", "2024-13-01", "32.01.2024", "2024-03-15 вечером", "2024-03-15abc", "15.03/2024"]
)
def test_parse_date_junk(raw: str) -> None:
    assert parse_date(raw) is None


def test_parse_time() -> None:
    assert parse_time("19:30") == time(19, 30)
    assert parse_time(" 09:05:07 ") == time(9, 5, 7)
    assert parse_time("25:00") is None
    assert parse_time("вечером") is None
    assert parse_time("19:30:00.5") == time(19, 30, 0, 500000)
    assert parse_time("19:30 вечера") is None


def test_parse_datetime_klientiks_format_is_local_time_in_the_given_zone() -> None:
    dt = parse_datetime("2021-09-28 19:26:04.295301", MSK)
    assert dt == datetime(2021, 9, 28, 19, 26, 4, 295301, tzinfo=MSK)
    assert dt is not None
    assert dt.utcoffset() == timedelta(hours=3)
    assert dt.astimezone(UTC) == datetime(2021, 9, 28, 16, 26, 4, 295301, tzinfo=UTC)


def test_parse_datetime_zone_matters() -> None:
    almaty = parse_datetime("2021-09-28 19:26:04", ZoneInfo("Asia/Almaty"))
    moscow = parse_datetime("2021-09-28 19:26:04", MSK)
    assert almaty is not None
    assert moscow is not None
    assert moscow - almaty == timedelta(hours=3)


def test_parse_datetime_keeps_an_explicit_offset() -> None:
    dt = parse_datetime("2021-09-28T19:26:04+05:00", MSK)
    assert dt is not None
    assert dt.utcoffset() == timedelta(hours=5)


@pytest.mark.parametrize(
    "raw", ["2024-05-01 14:30", "01.05.2024 14:30:00", "2024-05-01T14:30:00", "01/05/2024 14:30"]
)
def test_parse_datetime_keeps_the_time_of_every_date_spelling(raw: str) -> None:
    assert parse_datetime(raw, MSK) == datetime(2024, 5, 1, 14, 30, tzinfo=MSK)


def test_parse_datetime_date_alone_and_junk() -> None:
    assert parse_datetime("28.09.2021", MSK) == datetime(2021, 9, 28, tzinfo=MSK)
    assert parse_datetime("когда-то", MSK) is None


@pytest.mark.parametrize(
    ("raw", "items"),
    [
        ("Стрижка женская, Окрашивание", ["Стрижка женская", "Окрашивание"]),
        ("Маникюр;Педикюр\nУкладка", ["Маникюр", "Педикюр", "Укладка"]),
        ('["Стрижка женская", "Укладка"]', ["Стрижка женская", "Укладка"]),
        ("Стрижка, , ", ["Стрижка"]),
        ("", []),
        ("[не JSON", ["[не JSON"]),
    ],
)
def test_split_services(raw: str, items: list[str]) -> None:
    assert split_services(raw) == items


@pytest.mark.parametrize(
    ("full", "parts"),
    [
        ("Анна", (None, "Анна", None)),
        ("Иванова Анна Сергеевна", ("Иванова", "Анна", "Сергеевна")),
        ("Анна Сергеевна Иванова", ("Иванова", "Анна", "Сергеевна")),
        ("Петров Иван Ильич", ("Петров", "Иван", "Ильич")),
        ("Ульянова Мария Ильинична", ("Ульянова", "Мария", "Ильинична")),
        ("Салтыков-Щедрин Михаил Евграфович", ("Салтыков-Щедрин", "Михаил", "Евграфович")),
        ("иванов иван иванович", ("иванов", "иван", "иванович")),
    ],
)
def test_split_name_unambiguous(full: str, parts: tuple[str | None, ...]) -> None:
    assert split_name(full) == parts


@pytest.mark.parametrize(
    "full",
    [
        "Анна Иванова",  # two words: which is the first name?
        "Иванова Анна",
        "Иван Петрович Бабич",  # both the middle and the last word end like a patronymic
        "Иванова Анна Мария",  # no patronymic at all
        "Иванова Анна Сергеевна Петровна",
        "Иван 2 Петрович",
        "Иван {x} Петрович",
        "",
    ],
)
def test_split_name_ambiguous_is_none(full: str) -> None:
    assert split_name(full) is None


# ---------------------------------------------------------------------------------------------------------
# normalize: every seed template, rendered with realistic values

CLIENT_CTX = {
    "id": "1842",
    "phone": "79991234567",
    "name": "Иванова Анна Сергеевна",
    "first_name": "Анна",
    "patron_name": "Сергеевна",
    "second_name": "Иванова",
    "deleted": "0",
    "email": "anna.ivanova@mail.ru",
}


def test_normalize_client_created() -> None:
    query = render(TPL_CLIENT_CREATED, CLIENT_CTX) + "&utm_source=yandex&utm_campaign=vesna&yclid=8123456789"
    n = ok(run("client-created", query))
    ev = n.event
    assert ev.type == "ru.klientiks.client.created"
    assert ev.id == "evt-0001"
    assert ev.source == "/klientiks/salon"
    assert ev.subject == "client/1842"
    assert ev.time == RECEIVED_AT
    assert n.key == "salon:1842"
    c = ev.data.client
    assert c is not None
    assert c.id == "1842"
    assert c.phone == "+79991234567"
    assert c.full_name == "Иванова Анна Сергеевна"
    assert (c.last_name, c.first_name, c.patronymic) == ("Иванова", "Анна", "Сергеевна")
    assert c.email == "anna.ivanova@mail.ru"
    assert c.deleted is False
    assert ev.data.appointment is None
    assert ev.data.invoice is None
    attr = ev.data.attribution
    assert attr is not None
    assert attr.utm == {"utm_source": "yandex", "utm_campaign": "vesna"}
    assert attr.click_ids == {"yclid": "8123456789"}
    assert ev.data.extra == {}
    assert ev.data.missing == []
    assert n.missing == []


def test_normalize_client_created_full_name_from_parts_when_name_is_missing() -> None:
    ctx = {k: v for k, v in CLIENT_CTX.items() if k != "name"}
    n = ok(run("client-created", render(TPL_CLIENT_CREATED, ctx)))
    assert n.event.data.client is not None
    assert n.event.data.client.full_name == "Иванова Анна Сергеевна"
    assert n.missing == [("client_name", "placeholder")]


def test_normalize_client_created_leftover_placeholders_never_become_data() -> None:
    # Only id and name rendered: Klientiks left {{phone}}, {{email}}, ... in the URL.
    query = render(TPL_CLIENT_CREATED, {"id": "1842", "name": "Иванова Анна Сергеевна"})
    assert "{{phone}}" in query
    n = ok(run("client-created", query))
    c = n.event.data.client
    assert c is not None
    assert c.phone is None
    assert c.email is None
    assert c.deleted is None
    for field in ("client_phone", "client_email", "client_first_name", "client_deleted"):
        assert (field, "placeholder") in n.missing
        assert field in n.event.data.missing
    raw = n.event.kafka_value().decode()
    assert "{{" not in raw
    assert "phone}}" not in raw
    for _, v in n.event.kafka_headers():
        assert b"{{" not in v


@pytest.mark.parametrize("phone", ["79991234567", "8 (999) 123-45-67", "+7 999 123 45 67"])
def test_normalize_client_phone_spellings(phone: str) -> None:
    n = ok(run("client-created", render(TPL_CLIENT_CREATED, {**CLIENT_CTX, "phone": phone})))
    assert n.event.data.client is not None
    assert n.event.data.client.phone == "+79991234567"


def test_normalize_invalid_phone_and_email_are_reported_not_sent() -> None:
    ctx = {**CLIENT_CTX, "phone": "12-34", "email": "anna.ivanova(at)mail.ru"}
    n = ok(run("client-created", render(TPL_CLIENT_CREATED, ctx)))
    c = n.event.data.client
    assert c is not None
    assert c.phone is None
    assert c.email is None
    assert ("client_phone", "invalid") in n.missing
    assert ("client_email", "invalid") in n.missing
    assert {"client_phone", "client_email"} <= set(n.event.data.missing)
    assert "12-34" not in n.event.kafka_value().decode()


APPOINTMENT_CTX = {
    "client.id": "1842",
    "client.phone": "8 (999) 123-45-67",
    "client.name": "Иванова Анна Сергеевна",
    "appointment.id": "55017",
    "appointment.date": "2024-03-15",
    "appointment_time": "19:30",
    "executor_name": "Смирнова Ольга",
    "executor_phone": "+7 916 555 44 33",
    "services": "Стрижка женская, Окрашивание корней",
    "appointment.total_cost": "2500.00",
    "user.position": "Администратор",
}


def test_normalize_appointment_created_with_the_dotted_time_key() -> None:
    query = render(TPL_APPOINTMENT_CREATED, APPOINTMENT_CTX)
    assert "appointment.time=19%3A30" in query  # the seed typo survives rendering
    n = ok(run("appointment-created", query))
    ev = n.event
    assert ev.type == "ru.klientiks.appointment.created"
    assert n.key == "salon:1842"
    assert ev.subject == "client/1842"
    c = ev.data.client
    assert c is not None
    assert (c.id, c.phone, c.full_name) == ("1842", "+79991234567", "Иванова Анна Сергеевна")
    a = ev.data.appointment
    assert a is not None
    assert a.id == "55017"
    assert a.start == datetime(2024, 3, 15, 19, 30, tzinfo=MSK)
    assert a.start is not None
    assert a.start.utcoffset() == timedelta(hours=3)
    assert a.total_cost == Decimal("2500.00")
    assert a.services == ["Стрижка женская", "Окрашивание корней"]
    assert a.executor is not None
    assert a.executor.name == "Смирнова Ольга"
    assert a.executor.phone == "+79165554433"
    assert ev.data.user_position == "Администратор"
    assert ev.data.missing == []
    assert ev.data.extra == {}

    data = value_json(n)
    assert data["appointment"]["total_cost"] == "2500.00"
    assert data["appointment"]["start"] == "2024-03-15T19:30:00+03:00"
    assert data["client"]["phone"] == "+79991234567"
    assert data["appointment"]["services"] == ["Стрижка женская", "Окрашивание корней"]


def test_normalize_appointment_created_unrendered_time_is_missing() -> None:
    # `{{appointment_time}}` is not a Klientiks variable in that event: it may stay in the URL.
    ctx = {k: v for k, v in APPOINTMENT_CTX.items() if k != "appointment_time"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    assert ("appointment_time", "placeholder") in n.missing
    assert "appointment_time" in n.event.data.missing
    a = n.event.data.appointment
    assert a is not None
    assert a.start == datetime(2024, 3, 15, 0, 0, tzinfo=MSK)


def test_normalize_appointment_created_unparsable_time_is_reported() -> None:
    n = ok(
        run(
            "appointment-created",
            render(TPL_APPOINTMENT_CREATED, {**APPOINTMENT_CTX, "appointment_time": "вечером"}),
        )
    )
    assert ("appointment_time", "invalid") in n.missing
    assert "appointment_time" in n.event.data.missing


def test_normalize_appointment_created_russian_money_and_bad_date() -> None:
    ctx = {**APPOINTMENT_CTX, "appointment.total_cost": "2 500,00 ₽", "appointment.date": "31.02.2024"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    a = n.event.data.appointment
    assert a is not None
    assert a.total_cost == Decimal("2500.00")
    assert a.start is None
    assert ("appointment_date", "invalid") in n.missing


def test_normalize_appointment_created_junk_cost_is_invalid_not_zero() -> None:
    ctx = {**APPOINTMENT_CTX, "appointment.total_cost": "NaN"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.total_cost is None
    assert ("appointment_total_cost", "invalid") in n.missing
    assert "NaN" not in n.event.kafka_value().decode()


def test_normalize_placeholder_inside_a_services_list_is_not_a_service() -> None:
    ctx = {**APPOINTMENT_CTX, "services": "Стрижка женская, {service.name}"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.services == ["Стрижка женская"]
    assert "services" in n.event.data.missing
    assert "{service.name}" not in n.event.kafka_value().decode()


INVOICE_CTX = {
    "client_id": "1842",
    "client.name": "Иванова Анна Сергеевна",
    "client.phone": "+7 999 123 45 67",
    "object_id": "55017",
    "amount": "2500.00",
    "paid": "0",
    "name": "Счёт № 318",
    "description": "Стрижка женская, Окрашивание корней",
    "paid_sum": "1 000,00",
    "left_to_pay": "1500.00",
}


def test_normalize_invoice_created() -> None:
    n = ok(run("invoice-created", render(TPL_INVOICE_CREATED, INVOICE_CTX)))
    ev = n.event
    assert ev.type == "ru.klientiks.invoice.created"
    assert n.key == "salon:1842"
    assert ev.data.client is not None
    assert ev.data.client.phone == "+79991234567"
    assert ev.data.client.full_name == "Иванова Анна Сергеевна"
    inv = ev.data.invoice
    assert inv is not None
    assert inv.object_id == "55017"
    assert inv.name == "Счёт № 318"
    assert inv.description == "Стрижка женская, Окрашивание корней"
    assert (inv.amount, inv.paid_sum, inv.left_to_pay) == (
        Decimal("2500.00"),
        Decimal("1000.00"),
        Decimal("1500.00"),
    )
    assert inv.paid is False
    # appointment_paid belongs to the invoice here, not to a visit.
    assert ev.data.appointment is not None
    assert ev.data.appointment.paid is None
    assert ev.data.appointment.id == "55017"
    data = value_json(n)
    assert data["invoice"]["amount"] == "2500.00"
    assert data["invoice"]["paid_sum"] == "1000.00"
    assert data["invoice"]["left_to_pay"] == "1500.00"
    assert ev.data.missing == []


def test_normalize_invoice_created_bad_amount_is_reported() -> None:
    n = ok(run("invoice-created", render(TPL_INVOICE_CREATED, {**INVOICE_CTX, "amount": "две тысячи"})))
    assert n.event.data.invoice is not None
    assert n.event.data.invoice.amount is None
    assert ("appointment_amount", "invalid") in n.missing
    assert "appointment_amount" in n.event.data.missing


VISIT_CTX = {
    "client_id": "1842",
    "appointment.id": "55017",
    "appointment.account_id": "3301",
    "appointment.created": "2021-09-28 19:26:04.295301",
    "appointment.appointment_id": "55016",
    "appointment.status": "completed",  # never used: the template's `{appointment.status}}` is no tag
    "appointment.paid": "1",
}


def test_normalize_visit_paid_with_the_broken_status_placeholder() -> None:
    query = render(TPL_VISIT_PAID, VISIT_CTX)
    assert "appointment_status={appointment.status}}" in query
    n = ok(run("visit-paid", query))
    ev = n.event
    assert ev.type == "ru.klientiks.visit.paid"
    assert n.key == "salon:1842"
    a = ev.data.appointment
    assert a is not None
    assert a.id == "55017"
    assert a.account_id == "3301"
    assert a.parent_id == "55016"
    assert a.paid is True
    assert a.status is None
    assert a.created == datetime(2021, 9, 28, 19, 26, 4, 295301, tzinfo=MSK)
    assert a.created is not None
    assert a.created.utcoffset() == timedelta(hours=3)
    assert ev.data.client is not None
    assert ev.data.client.id == "1842"
    assert ev.data.client.phone is None
    assert n.missing == [("appointment_status", "placeholder")]
    assert ev.data.missing == ["appointment_status"]
    assert "appointment.status" not in ev.kafka_value().decode()
    assert value_json(n)["appointment"]["created"] == "2021-09-28T19:26:04.295301+03:00"


@pytest.mark.parametrize(
    ("event", "template", "ctx", "ce_type"),
    [
        (
            "online-booking",
            TPL_THIN_BOOKING,
            {"appointment": {"id": "55020"}, "new_data": {"status": "1"}},
            "ru.klientiks.appointment.booked_online",
        ),
        (
            "appointment-created",
            TPL_THIN_BOOKING,
            {"appointment": {"id": "55020"}, "new_data": {"status": "1"}},
            "ru.klientiks.appointment.created",
        ),
        (
            "appointment-changed",
            TPL_THIN_CHANGED,
            {"new_data": {"id": "55020", "status": "1"}},
            "ru.klientiks.appointment.changed",
        ),
    ],
)
def test_normalize_thin_seed_004_form(event: str, template: str, ctx: dict[str, Any], ce_type: str) -> None:
    query = render(template, ctx)
    assert query == "appointment_id=55020&status=1"
    n = ok(run(event, query))
    ev = n.event
    assert ev.type == ce_type
    assert n.key == "salon:appointment:55020"
    assert ev.subject == "appointment/55020"
    assert ev.data.client is None
    assert ev.data.appointment is not None
    assert ev.data.appointment.id == "55020"
    assert ev.data.appointment.status == "1"
    assert n.missing == []


def test_normalize_thin_form_with_unrendered_status() -> None:
    query = render(TPL_THIN_CHANGED, {"new_data": {"id": "55020"}})
    # The section rendered but `{{status}}` inside it had no value: Klientiks leaves the tag.
    assert "status=%7B%7B" in query or "status={{" in query
    n = ok(run("appointment-changed", query))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.status is None
    assert ("status", "placeholder") in n.missing


def test_normalize_unknown_params_go_to_extra() -> None:
    query = (
        render(TPL_CLIENT_CREATED, CLIENT_CTX) + "&promo=" + quote("ВЕСНА2024") + "&Filial=Центр&gclid=Cj0KCQ"
    )
    n = ok(run("client-created", query))
    assert n.event.data.extra == {"promo": "ВЕСНА2024", "filial": "Центр"}
    assert n.event.data.attribution is not None
    assert n.event.data.attribution.click_ids == {"gclid": "Cj0KCQ"}


def test_normalize_attribution_ip_and_user_agent() -> None:
    query = "client_id=1842&ip=95.31.18.119&user_agent=" + quote("Mozilla/5.0 (iPhone)") + "&utm_medium=cpc"
    n = ok(run("client-created", query))
    attr = n.event.data.attribution
    assert attr is not None
    assert (attr.ip, attr.user_agent, attr.utm) == (
        "95.31.18.119",
        "Mozilla/5.0 (iPhone)",
        {"utm_medium": "cpc"},
    )
    assert n.event.data.extra == {}


def test_normalize_json_body() -> None:
    body = json.dumps(
        {"client_id": 1842, "client_phone": "+7 999 123 45 67", "client_name": "Иванова Анна Сергеевна"}
    )
    n = ok(run("client-created", "", body=body.encode(), content_type="application/json"))
    assert n.key == "salon:1842"
    assert n.event.data.client is not None
    assert n.event.data.client.phone == "+79991234567"
    assert n.event.data.client.full_name == "Иванова Анна Сергеевна"


def test_normalize_event_round_trips_through_kafka() -> None:
    from services.common.events import CloudEvent

    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, APPOINTMENT_CTX)))
    back = CloudEvent.from_kafka(n.event.kafka_headers(), n.event.kafka_value())
    assert back == n.event


# ---------------------------------------------------------------------------------------------------------
# normalize: values present but unparseable are reported, never data; dates with a time; names


@pytest.mark.parametrize("deleted", ["может быть", "2", "deleted"])
def test_normalize_unrecognised_client_deleted_is_invalid(deleted: str) -> None:
    n = ok(run("client-created", render(TPL_CLIENT_CREATED, {**CLIENT_CTX, "deleted": deleted})))
    assert n.event.data.client is not None
    assert n.event.data.client.deleted is None
    assert ("client_deleted", "invalid") in n.missing
    assert "client_deleted" in n.event.data.missing


def test_normalize_empty_client_deleted_is_empty_not_invalid() -> None:
    n = ok(run("client-created", render(TPL_CLIENT_CREATED, {**CLIENT_CTX, "deleted": ""})))
    assert n.event.data.client is not None
    assert n.event.data.client.deleted is None
    assert n.missing == [("client_deleted", "empty")]


@pytest.mark.parametrize(("paid", "value"), [("оплачен", True), ("не оплачен", False), ("TRUE", True)])
def test_normalize_visit_paid_spellings(paid: str, value: bool) -> None:
    n = ok(run("visit-paid", render(TPL_VISIT_PAID, {**VISIT_CTX, "appointment.paid": paid})))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.paid is value


def test_normalize_visit_paid_unrecognised_paid_is_invalid() -> None:
    n = ok(run("visit-paid", render(TPL_VISIT_PAID, {**VISIT_CTX, "appointment.paid": "частично"})))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.paid is None
    assert ("appointment_paid", "invalid") in n.missing
    assert "частично" not in n.event.kafka_value().decode()


def test_normalize_invoice_unrecognised_paid_is_invalid_once() -> None:
    n = ok(run("invoice-created", render(TPL_INVOICE_CREATED, {**INVOICE_CTX, "paid": "частично"})))
    assert n.event.data.invoice is not None
    assert n.event.data.invoice.paid is None
    assert n.missing.count(("appointment_paid", "invalid")) == 1


def test_normalize_invalid_executor_phone_is_reported_not_sent() -> None:
    ctx = {**APPOINTMENT_CTX, "executor_phone": "12-34"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    a = n.event.data.appointment
    assert a is not None
    assert a.executor is not None
    assert (a.executor.name, a.executor.phone) == ("Смирнова Ольга", None)
    assert ("executor_phone", "invalid") in n.missing
    assert "executor_phone" in n.event.data.missing
    assert "12-34" not in n.event.kafka_value().decode()


def test_normalize_only_an_invalid_executor_phone_makes_no_executor() -> None:
    ctx = {**APPOINTMENT_CTX, "executor_name": "", "executor_phone": "нет"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.executor is None
    assert ("executor_phone", "invalid") in n.missing


def _without_time(date_value: str) -> dict[str, str]:
    """The appointment template with `{{appointment_time}}` left unrendered, as Klientiks does."""
    ctx = {k: v for k, v in APPOINTMENT_CTX.items() if k != "appointment_time"}
    return {**ctx, "appointment.date": date_value}


@pytest.mark.parametrize(
    "date_value",
    ["2024-05-01 14:30", "01.05.2024 14:30:00", "2024-05-01T14:30:00", "2024-05-01 14:30:00.000"],
)
def test_normalize_time_inside_appointment_date_is_used(date_value: str) -> None:
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, _without_time(date_value))))
    a = n.event.data.appointment
    assert a is not None
    assert a.start == datetime(2024, 5, 1, 14, 30, tzinfo=MSK)
    assert a.start is not None
    assert a.start.tzinfo == MSK
    assert ("appointment_time", "placeholder") in n.missing
    assert ("appointment_date", "invalid") not in n.missing


def test_normalize_appointment_time_wins_over_a_time_inside_the_date() -> None:
    ctx = {**APPOINTMENT_CTX, "appointment.date": "2024-05-01 00:00:00", "appointment_time": "19:30"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.start == datetime(2024, 5, 1, 19, 30, tzinfo=MSK)
    assert n.event.data.missing == []


def test_normalize_invalid_appointment_time_falls_back_to_the_time_inside_the_date() -> None:
    ctx = {**APPOINTMENT_CTX, "appointment.date": "2024-05-01 14:30", "appointment_time": "вечером"}
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, ctx)))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.start == datetime(2024, 5, 1, 14, 30, tzinfo=MSK)
    assert ("appointment_time", "invalid") in n.missing


def test_normalize_appointment_date_with_an_offset_is_read_on_the_source_clock() -> None:
    n = ok(
        run(
            "appointment-created", render(TPL_APPOINTMENT_CREATED, _without_time("2024-05-01T14:30:00+05:00"))
        )
    )
    a = n.event.data.appointment
    assert a is not None
    assert a.start is not None
    assert a.start.tzinfo == MSK
    assert a.start == datetime(2024, 5, 1, 12, 30, tzinfo=MSK)
    assert value_json(n)["appointment"]["start"] == "2024-05-01T12:30:00+03:00"


@pytest.mark.parametrize(
    "date_value", ["2024-05-01 вечером", "2024-05-01 25:00", "0001-01-01T00:00:00+05:00"]
)
def test_normalize_appointment_date_with_junk_after_it_is_invalid(date_value: str) -> None:
    n = ok(run("appointment-created", render(TPL_APPOINTMENT_CREATED, _without_time(date_value))))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.start is None
    assert ("appointment_date", "invalid") in n.missing


def test_normalize_appointment_created_in_dotted_form_keeps_its_time() -> None:
    query = render(TPL_VISIT_PAID, {**VISIT_CTX, "appointment.created": "28.09.2021 19:26:04"})
    n = ok(run("visit-paid", query))
    assert n.event.data.appointment is not None
    assert n.event.data.appointment.created == datetime(2021, 9, 28, 19, 26, 4, tzinfo=MSK)


@pytest.mark.parametrize(
    ("amount", "value"),
    [("-200", "-200"), ("1 500 ₽", "1500"), ("1\u202f500,50", "1500.50"), ("1500.5 руб.", "1500.5")],
)
def test_normalize_invoice_money_spellings(amount: str, value: str) -> None:
    n = ok(run("invoice-created", render(TPL_INVOICE_CREATED, {**INVOICE_CTX, "paid_sum": amount})))
    assert value_json(n)["invoice"]["paid_sum"] == value


@pytest.mark.parametrize("amount", ["1e3", "Infinity", "12 34"])
def test_normalize_invoice_exponent_or_junk_money_is_invalid(amount: str) -> None:
    n = ok(run("invoice-created", render(TPL_INVOICE_CREATED, {**INVOICE_CTX, "amount": amount})))
    assert n.event.data.invoice is not None
    assert n.event.data.invoice.amount is None
    assert ("appointment_amount", "invalid") in n.missing


def _client_of(**params: str) -> Client:
    n = ok(run("client-created", urlencode({"client_id": "1842", **params})))
    assert n.event.data.client is not None
    return n.event.data.client


@pytest.mark.parametrize(
    ("name", "parts"),
    [
        ("Анна", (None, "Анна", None)),
        ("Иванова Анна Сергеевна", ("Иванова", "Анна", "Сергеевна")),
        ("Анна Сергеевна Иванова", ("Иванова", "Анна", "Сергеевна")),
        ("Иванова Анна", (None, None, None)),
        ("Иван Петрович Бабич", (None, None, None)),
    ],
)
def test_normalize_parts_from_client_name_only_when_unambiguous(
    name: str, parts: tuple[str | None, ...]
) -> None:
    c = _client_of(client_name=name)
    assert c.full_name == name
    assert (c.last_name, c.first_name, c.patronymic) == parts


def test_normalize_given_parts_are_never_contradicted_by_client_name() -> None:
    c = _client_of(client_name="Иванова Анна Сергеевна", client_first_name="Мария")
    assert (c.last_name, c.first_name, c.patronymic) == (None, "Мария", None)
    assert c.full_name == "Иванова Анна Сергеевна"


def test_normalize_client_name_fills_the_parts_that_agree_with_the_given_ones() -> None:
    c = _client_of(client_name="Иванова Анна Сергеевна", client_first_name="анна", client_second_name="{{x}}")
    assert (c.last_name, c.first_name, c.patronymic) == ("Иванова", "анна", "Сергеевна")


def test_normalize_one_word_client_name_is_not_a_first_name_when_one_was_given() -> None:
    c = _client_of(client_name="Иванова", client_first_name="Анна")
    assert (c.last_name, c.first_name, c.patronymic) == (None, "Анна", None)


@pytest.mark.parametrize(
    ("parts", "full"),
    [
        ({"client_second_name": "Иванова", "client_first_name": "Анна"}, "Иванова Анна"),
        ({"client_first_name": "Анна", "client_patron_name": "Сергеевна"}, "Анна Сергеевна"),
        (
            {"client_patron_name": "Сергеевна", "client_first_name": "Анна", "client_second_name": "Иванова"},
            "Иванова Анна Сергеевна",
        ),
    ],
)
def test_normalize_full_name_from_parts_is_last_first_patronymic(parts: dict[str, str], full: str) -> None:
    assert _client_of(**parts).full_name == full


@pytest.mark.parametrize("phone", ["+7 701 123 45 67", "8 (701) 123-45-67", "77011234567"])
def test_normalize_kazakh_phone_stays_kazakh_in_a_russian_source(phone: str) -> None:
    e164 = _client_of(client_phone=phone).phone
    assert e164 == "+77011234567"
    assert phonenumbers.region_code_for_number(phonenumbers.parse(e164)) == "KZ"


@pytest.mark.parametrize("phone", ["8 (999) 123-45-67", "79991234567", "+7 999 123 45 67", "89991234567"])
def test_normalize_russian_phone_spellings_agree(phone: str) -> None:
    assert _client_of(client_phone=phone).phone == "+79991234567"


def test_normalize_deeply_nested_json_body_is_rejected_not_raised() -> None:
    body = b'{"client_id": "1842", "services": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    r = run("client-created", "", body=body, content_type="application/json")
    assert isinstance(r, Rejected)
    assert r.reason == "bad_body"


# ---------------------------------------------------------------------------------------------------------
# normalize: rejections


def test_normalize_unknown_event() -> None:
    r = run("client-deleted", "client_id=1842")
    assert isinstance(r, Rejected)
    assert r.reason == "unknown_event"
    assert "client-deleted" in r.detail


@pytest.mark.parametrize(
    "query",
    [
        "",
        "client_phone=79991234567",
        render(TPL_CLIENT_CREATED, {"phone": "79991234567"}),  # {{id}} left unrendered
        "client_id=&appointment_id=",
        render(TPL_THIN_CHANGED, {}),
    ],
)
def test_normalize_no_id(query: str) -> None:
    r = run("client-created", query)
    assert isinstance(r, Rejected)
    assert r.reason == "no_id"
    assert "URL template" in r.detail


def test_normalize_malformed_json_body() -> None:
    r = run("client-created", "", body=b'{"client_id": 1842,', content_type="application/json")
    assert isinstance(r, Rejected)
    assert r.reason == "bad_body"
    assert "malformed" in r.detail


def test_normalize_non_utf8_form_body_lists_the_value_invalid() -> None:
    r = run("client-created", "", body="client_id=1842&client_name=Иванова".encode("cp1251"))
    assert isinstance(r, Normalized)
    assert r.event.data.client is not None
    assert r.event.data.client.full_name is None
    assert ("client_name", "invalid") in r.missing


# ---------------------------------------------------------------------------------------------------------
# InboxRecord


def test_inbox_build_utf8_body() -> None:
    rec = record("client-created", "", body="client_name=Иванова".encode(), content_type="text/plain")
    assert rec.body == "client_name=Иванова"
    assert rec.body_b64 is None
    assert rec.body_bytes() == "client_name=Иванова".encode()


def test_inbox_build_non_utf8_body_round_trips_bytes() -> None:
    raw = "client_name=Иванова Анна".encode("cp1251") + b"\xff\x00"
    rec = record(
        "client-created", "client_id=1842", body=raw, content_type="application/x-www-form-urlencoded"
    )
    assert rec.body == ""
    assert rec.body_b64 is not None
    assert rec.body_bytes() == raw
    back = InboxRecord.from_bytes(rec.to_bytes())
    assert back == rec
    assert back.body_bytes() == raw


def test_inbox_to_bytes_from_bytes_round_trip() -> None:
    rec = record("appointment-created", render(TPL_APPOINTMENT_CREATED, APPOINTMENT_CTX))
    wire = rec.to_bytes()
    assert json.loads(wire)["received_at"].startswith("2024-03-14T09:15:30")
    back = InboxRecord.from_bytes(wire)
    assert back == rec
    assert back.received_at == RECEIVED_AT
    # The replayed record normalizes to the same event.
    assert (
        ok(normalize(back, zone=MSK, phone_region="RU")).event
        == ok(normalize(rec, zone=MSK, phone_region="RU")).event
    )


def test_inbox_rejects_naive_received_at() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        InboxRecord(
            id="e", source="salon", event="client-created", received_at=datetime(2024, 3, 14), method="GET"
        )
