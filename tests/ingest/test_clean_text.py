"""Issue 8, part 2: what reaches a vendor is clean text, whatever the webhook (or the Klientiks API) carries."""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, quote_from_bytes
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import CloudEvent
from services.ingest.enrichment import enrich
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import (
    BAD_NAME,
    KNOWN,
    ROUTING,
    Normalized,
    Params,
    ParamsError,
    Rejected,
    cap_of,
    clean_text,
    normalize,
    request_params,
    routing_key,
)
from services.maxma.mapping import MappingError, new_client_body

MSK = ZoneInfo("Europe/Moscow")
HOSTILE = [
    "\x00", "\x1b[2J\x1b[31m", "\x1b]0;title\x07", "\r\n", "\t", "\x7f", "\x85", "\u202e", "\u202d", "\u2066",
    "\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u2028", "\u00a0", "\ue000", "\U000e0041", "e\u0301",
    "\u0301", "{{client_id}}", "{a}}", "Анна", "7", "79169000001", "@", ".", " ",
]  # fmt: skip
TEXTS = st.lists(st.sampled_from(HOSTILE) | st.characters(), max_size=12).map("".join)
# Maxma's fields and the cap each one's source field has.
MAXMA_CAPS = {
    "phoneNumber": 16, "externalId": 20, "fullName": cap_of("client_name"), "surname": cap_of("client_second_name"),
    "name": cap_of("client_first_name"), "patronymicName": cap_of("client_patron_name"),
    "email": cap_of("client_email"),
}  # fmt: skip


def record(query: str = "", *, body: bytes = b"", content_type: str | None = None) -> InboxRecord:
    return InboxRecord.build(
        id="evt-1", source="salon", event="client-created", received_at=datetime(2026, 1, 1, tzinfo=UTC),
        method="POST" if body else "GET", query=query, content_type=content_type, body=body,
    )  # fmt: skip


def run(query: str = "", **kw: Any) -> Normalized | Rejected:
    return normalize(record(query, **kw), zone=MSK, phone_region="RU")


def ok(query: str = "", **kw: Any) -> Normalized:
    result = run(query, **kw)
    assert isinstance(result, Normalized), result
    return result


def q(**params: str) -> str:
    return "&".join(f"{k}={quote(v)}" for k, v in params.items())


def strings_in(node: Any) -> Iterator[str]:
    """Every string in a JSON document, names of members included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from strings_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings_in(v)


def assert_clean(s: str, cap: int = 4000) -> None:
    assert s.isprintable(), repr(s)
    assert unicodedata.is_normalized("NFC", s), repr(s)
    assert s == s.strip(), repr(s)
    assert "  " not in s, repr(s)
    assert len(s) <= cap, len(s)


# ---------------------------------------------------------------------------------------- the cases found


def test_bytes_that_are_not_utf8_make_the_value_invalid_not_a_replacement_character() -> None:
    r = ok("client_id=1&client_phone=79169000001&client_name=%D0%98%D0%B2%D0")
    assert r.event.data.client is not None
    assert r.event.data.client.full_name is None
    assert ("client_name", "invalid") in r.missing
    assert "client_name" in r.event.data.missing
    assert "\ufffd" not in r.event.data.model_dump_json()


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("Ann\x00a", "Anna"),
        ("\x1b[2J\x1b[31mAnna", "[2J[31mAnna"),  # the escape goes; the printable rest is only text now
        ("Anna\r\nIvanova", "Anna Ivanova"),
        ("\u202eanna", "anna"),
        ("An\u200bna\ufeff", "Anna"),
        ("Ива\u0301нова", "Ива́нова"),
        ("Иванова\u00a0\u00a0Анна", "Иванова Анна"),
    ],
)
def test_names_lose_controls_bidi_and_zero_width_characters_and_are_nfc(sent: str, kept: str) -> None:
    r = ok(q(client_id="1", client_name=sent))
    assert r.event.data.client is not None
    assert r.event.data.client.full_name == unicodedata.normalize("NFC", kept)


@pytest.mark.parametrize("sent", ["\u200b", "\x00\x1b", "\u202e\u200d\ufeff", "\r\n\t"])
def test_a_name_of_only_invisible_characters_is_missing(sent: str) -> None:
    r = ok(q(client_id="1", client_name=sent))
    assert r.event.data.client is not None
    assert r.event.data.client.full_name is None
    assert "client_name" in r.event.data.missing


@pytest.mark.parametrize(
    "sent", ["1\u200b", "\u200b1", "1\x00", "٣", "１", "-1", "1.0", "1e3", "x1", "1 2", "0x1f"]
)
def test_an_id_that_is_not_digits_is_invalid(sent: str) -> None:
    r = run(q(client_id=sent, appointment_id="5"))
    assert isinstance(r, Normalized)
    assert r.event.data.client is None or r.event.data.client.id is None
    assert ("client_id", "invalid") in r.missing
    assert r.key == "salon:appointment:5"


def test_an_invalid_id_alone_is_no_id_at_all() -> None:
    r = run(q(client_id="1\u200b", client_phone="79169000001"))
    assert isinstance(r, Rejected)
    assert r.reason == "no_id"


def test_json_integers_are_ids_and_other_json_values_are_not() -> None:
    r = ok(body=b'{"client_id": 42, "appointment_id": true}', content_type="application/json")
    assert r.event.data.client is not None
    assert r.event.data.client.id == "42"
    assert ("appointment_id", "invalid") in r.missing


@pytest.mark.parametrize("value", ['{"a": 1}', "[1, 2]", '{"client_id": "1"}'])
def test_a_json_object_or_array_where_a_scalar_belongs_is_invalid(value: str) -> None:
    body = f'{{"client_id": {value}, "appointment_id": "5", "client_name": {value}, "promo": {value}}}'
    r = ok(body=body.encode(), content_type="application/json")
    for name in ("client_id", "client_name", "promo"):
        assert (name, "invalid") in r.missing
    assert r.event.data.extra == {}
    assert r.key == "salon:appointment:5"


def test_services_may_be_a_json_array_of_names_but_not_of_objects() -> None:
    fine = ok(
        body=b'{"client_id": 1, "appointment_id": 5, "services": ["A", "B"]}', content_type="application/json"
    )
    assert fine.event.data.appointment is not None
    assert fine.event.data.appointment.services == ["A", "B"]
    bad = ok(
        body=b'{"client_id": 1, "appointment_id": 5, "services": [{"a": 1}]}', content_type="application/json"
    )
    assert ("services", "invalid") in bad.missing


def test_services_one_per_line_stay_apart() -> None:
    r = ok(q(client_id="1", appointment_id="5", services="Стрижка\r\nУкладка\nМаникюр"))
    assert r.event.data.appointment is not None
    assert r.event.data.appointment.services == ["Стрижка", "Укладка", "Маникюр"]


@pytest.mark.parametrize(
    ("name", "cap"),
    [("client_name", 302), ("client_first_name", 100), ("client_email", 254), ("appointment_description", 2000),
     ("promo", 1000), ("utm_source", 1000), ("client_phone", 64)],
)  # fmt: skip
def test_a_value_over_its_cap_is_invalid_not_cut_short(name: str, cap: int) -> None:
    assert cap_of(name) == cap
    at_cap = "a" * (cap - 7) + "@ex.com" if name == "client_email" else "a" * cap
    kept = ok(q(client_id="1", **{name: at_cap}))
    assert (name, "invalid") not in kept.missing or name == "client_phone"  # 64 a's are no phone either
    over = ok(q(client_id="1", **{name: at_cap + "a"}))
    assert (name, "invalid") in over.missing
    assert "a" * (cap + 1) not in over.event.data.model_dump_json()


def test_a_60_kb_name_is_invalid() -> None:
    r = ok(q(client_id="1", client_phone="79169000001", client_name="Я" * 60_000))
    assert r.event.data.client is not None
    assert r.event.data.client.full_name is None
    assert ("client_name", "invalid") in r.missing


def test_an_ip_must_be_an_address() -> None:
    assert ok(q(client_id="1", ip="10.0.0.1")).event.data.attribution is not None
    r = ok(q(client_id="1", ip="10.0.0.1\x1b[2J"))
    assert r.event.data.attribution is None or r.event.data.attribution.ip is None
    assert ("ip", "invalid") in r.missing


def test_a_parameter_name_that_is_not_text_is_listed_and_dropped() -> None:
    r = ok("client_id=1&%FF%FE=x&" + "k" * 65 + "=y")
    assert r.event.data.extra == {}
    assert (BAD_NAME, "invalid") in r.missing


@pytest.mark.parametrize(
    "body",
    [
        b'{"client_id": "1", "client_name": "Ann\\ud800a"}',
        b'{"client_id": "\\udfff1"}',
        b'{"\\ud800": "1", "client_id": 1}',
    ],
)
def test_a_lone_surrogate_escape_in_a_json_body_is_a_params_error(body: bytes) -> None:
    with pytest.raises(ParamsError, match="lone surrogate"):
        request_params("", "application/json", body)
    result = run(body=body, content_type="application/json")
    assert isinstance(result, Rejected)
    assert result.reason == "bad_body"


def test_clean_text_keeps_ordinary_text_as_it_is() -> None:
    for text in ("Иванова Анна Сергеевна", "anna@example.ru", "1 500,50 ₽", "О'Нил", "Анна-Мария"):
        assert clean_text(text) == text


# ----------------------------------------------------------------------------------------- the property


def _values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")),
        st.binary(max_size=40),
        st.sampled_from([b"79169000001", b"1842", b"anna@example.ru", b"\xd0\x98\xd0\xb2\xd0"]),
    )


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from(sorted(KNOWN)) | TEXTS.map(lambda t: t.encode("utf-8", "surrogatepass")),
            _values(),
        ),
        max_size=12,
    ),
    phone=st.booleans(),
)
def test_whatever_a_query_carries_every_string_sent_on_is_clean(
    pairs: list[tuple[str | bytes, bytes]], phone: bool
) -> None:
    parts = [("client_id", b"1842"), *(([("client_phone", b"79169000001")]) if phone else []), *pairs]
    query = "&".join(
        f"{quote(k) if isinstance(k, str) else quote_from_bytes(k)}={quote_from_bytes(v)}" for k, v in parts
    )
    result = run(query)
    assert isinstance(result, Normalized)
    _assert_event_clean(result.event)


@settings(max_examples=300, deadline=None)
@given(
    obj=st.dictionaries(
        st.sampled_from(sorted(KNOWN)) | TEXTS,
        TEXTS | st.integers() | st.floats() | st.booleans() | st.none() | st.lists(TEXTS, max_size=3)
        | st.dictionaries(TEXTS, TEXTS, max_size=2),
        max_size=12,
    )
)  # fmt: skip
def test_whatever_a_json_body_carries_every_string_sent_on_is_clean(obj: dict[str, Any]) -> None:
    body = json.dumps({"client_id": 1842, "client_phone": "79169000001", **obj}).encode()
    result = run(body=body, content_type="application/json")
    if isinstance(result, Rejected):
        assert result.reason in ("bad_body", "no_id")
        return
    _assert_event_clean(result.event)


_API_RECORD = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers() | TEXTS, "name": TEXTS, "first_name": TEXTS, "second_name": TEXTS,
        "patron_name": TEXTS, "email": TEXTS, "phone": TEXTS | st.just("79169000001"), "deleted": TEXTS,
    },
)  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    client=_API_RECORD, status=TEXTS, services=st.lists(st.fixed_dictionaries({"name": TEXTS}), max_size=3)
)
def test_whatever_the_klientiks_api_returns_every_string_sent_on_is_clean(
    client: dict[str, Any], status: str, services: list[dict[str, Any]]
) -> None:
    thin = ok(q(appointment_id="5", status="confirmed"))
    appointment = {"id": 5, "status": status, "appointed_services": services,
                   "appointment_client_links": [{"client_id": client.get("id", 7), "client": client}]}  # fmt: skip
    _assert_event_clean(enrich(thin.event, appointment, None, zone=MSK, phone_region="RU"))


def _assert_event_clean(event: CloudEvent) -> None:
    for s in strings_in(json.loads(event.data.model_dump_json())):
        assert_clean(s)
    client = event.data.client
    if client is not None and client.id is not None:
        assert client.id.isascii()
        assert client.id.isdigit()
    try:
        body = new_client_body(event)
    except MappingError:
        return
    for name, value in body["client"].items():
        assert_clean(value, MAXMA_CAPS[name])


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.sampled_from(["client_id", "Client.ID", "appointment_id", "appointment-id", "x"]) | TEXTS,
                  st.sampled_from(["", "7", " 8 ", "{{client_id}}", "1\u200b", "x"]) | TEXTS),
        max_size=8,
    )
)  # fmt: skip
def test_the_api_keys_a_webhook_as_the_full_parameters_would(pairs: list[tuple[str, str]]) -> None:
    # The API reads only the two ids for the inbox key: it must be the key the whole parameters give.
    assert routing_key("salon", Params.of(pairs, ROUTING)) == routing_key("salon", Params.of(pairs))
