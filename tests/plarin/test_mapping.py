"""Unit tests for services.plarin.mapping: a normalized event to one Plarin postback URL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import EventName, Invoice
from services.plarin.mapping import MappingError, click_id, conversion_key, conversion_value, postback_url
from tests.plarin.support import BASE, EVENT_ID, TS, YCLID, connection, event, query_of

DEFAULT_PARAMS = connection().click_id_params
# One event carrying a candidate of every default name, each in the place the normalizer puts it.
ALL_SOURCES = {
    "click_ids": {"yclid": "y-1", "gclid": "g-1"},
    "extra": {"click_id": "c-1"},
    "utm": {"utm_content": "u-1", "utm_source": "yandex"},
}


# ---------------------------------------------------------------------------------------------------------
# The click id


@pytest.mark.parametrize(
    ("drop", "found"),
    [
        ((), "y-1"),
        (("yclid",), "g-1"),
        (("yclid", "gclid"), "c-1"),
        (("yclid", "gclid", "click_id"), "u-1"),
        (("yclid", "gclid", "click_id", "utm_content"), None),
    ],
)
def test_the_default_order_is_yclid_gclid_click_id_utm_content(
    drop: tuple[str, ...], found: str | None
) -> None:
    clicks = {k: v for k, v in ALL_SOURCES["click_ids"].items() if k not in drop}
    extra = {k: v for k, v in ALL_SOURCES["extra"].items() if k not in drop}
    utm = {k: v for k, v in ALL_SOURCES["utm"].items() if k not in drop}
    assert click_id(event(click_ids=clicks, extra=extra, utm=utm), DEFAULT_PARAMS) == found


def test_each_name_is_read_from_click_ids_utm_and_extra() -> None:
    assert click_id(event(click_ids={"yclid": "from-clicks"}), ("yclid",)) == "from-clicks"
    assert click_id(event(utm={"utm_content": "from-utm"}), ("utm_content",)) == "from-utm"
    assert click_id(event(extra={"click_id": "from-extra"}), ("click_id",)) == "from-extra"
    # The same name in several places: click ids, then UTM tags, then the other parameters.
    both = event(click_ids={"yclid": "a"}, utm={"yclid": "b"}, extra={"yclid": "c"})
    assert click_id(both, ("yclid",)) == "a"
    assert click_id(event(utm={"yclid": "b"}, extra={"yclid": "c"}), ("yclid",)) == "b"
    assert click_id(event(extra={"yclid": "c"}), ("yclid",)) == "c"


def test_the_order_of_the_names_wins_over_the_place() -> None:
    ev = event(click_ids={"yclid": "y-1"}, extra={"click_id": "c-1"})
    assert click_id(ev, ("click_id", "yclid")) == "c-1"
    assert click_id(ev, ("yclid", "click_id")) == "y-1"


def test_an_empty_value_is_no_click_id() -> None:
    ev = event(click_ids={"yclid": ""}, extra={"gclid": "g-1"})
    assert click_id(ev, DEFAULT_PARAMS) == "g-1"
    assert click_id(event(click_ids={"yclid": ""}), DEFAULT_PARAMS) is None


def test_no_click_id() -> None:
    assert click_id(event(), DEFAULT_PARAMS) is None
    # Attribution that is not a click id of the connection.
    other = event(utm={"utm_source": "yandex", "utm_campaign": "весна"}, click_ids={"fbclid": "f-1"},
                  extra={"sub1": "x"})  # fmt: skip
    assert click_id(other, DEFAULT_PARAMS) is None


def test_a_connections_own_click_id_params() -> None:
    ev = event(click_ids={"yclid": "y-1", "fbclid": "f-1"}, utm={"utm_term": "t-1"}, extra={"sub1": "s-1"})
    assert click_id(ev, connection(click_id_params=["fbclid"]).click_id_params) == "f-1"
    assert click_id(ev, connection(click_id_params=["utm_term"]).click_id_params) == "t-1"
    assert click_id(ev, connection(click_id_params=["sub1", "yclid"]).click_id_params) == "s-1"
    assert click_id(ev, connection(click_id_params=["vkclid"]).click_id_params) is None


# ---------------------------------------------------------------------------------------------------------
# The URL: every macro filled


def test_every_macro_is_filled() -> None:
    url = postback_url(event(), connection(), YCLID)
    assert url == (
        f"{BASE}?click_id={YCLID}&event=visit-paid&value=1500.00&currency=RUB&event_id={EVENT_ID}"
        f"&client_id=1842&ts={TS}"
    )
    assert query_of(url) == {"click_id": YCLID, "event": "visit-paid", "value": "1500.00", "currency": "RUB",
                             "event_id": EVENT_ID, "client_id": "1842", "ts": TS}  # fmt: skip


def test_macros_anywhere_and_more_than_once() -> None:
    conn = connection(
        postback_url="https://plarin.example/pb/{client_id}/{event}?c={click_id}&t={ts}&again={ts}"
    )
    assert (
        postback_url(event(), conn, "k") == f"https://plarin.example/pb/1842/visit-paid?c=k&t={TS}&again={TS}"
    )


def test_literal_text_and_doubled_braces_are_kept() -> None:
    conn = connection(postback_url=BASE + "?tok=abc%2B1&click_id={click_id}&src={{klientiks}}")
    assert postback_url(event(), conn, "k") == BASE + "?tok=abc%2B1&click_id=k&src={klientiks}"


def test_the_event_name_mapping() -> None:
    conn = connection(event_names={"visit-paid": "Оплата визита", "invoice-created": "invoice"})
    assert query_of(postback_url(event(), conn, "k"))["event"] == "Оплата визита"
    inv = event(name=EventName.INVOICE_CREATED, invoice=Invoice(amount=Decimal("10")))
    assert query_of(postback_url(inv, conn, "k"))["event"] == "invoice"
    # An event without an entry keeps its Klientiks name.
    other = event(name=EventName.APPOINTMENT_CHANGED)
    assert query_of(postback_url(other, conn, "k"))["event"] == "appointment-changed"


@pytest.mark.parametrize(
    ("total", "value"),
    [
        ("1500", "1500.00"),
        ("1500.5", "1500.50"),
        ("1500.50", "1500.50"),
        ("1500.500", "1500.50"),
        ("0", "0.00"),
        ("0.1", "0.10"),
        ("1E+3", "1000.00"),
        ("2.5E+1", "25.00"),
        ("999999999999.99", "999999999999.99"),
    ],
)
def test_the_value_has_two_decimals(total: str, value: str) -> None:
    url = postback_url(event(total=total), connection(), "k")
    assert query_of(url)["value"] == value  # the strict sandbox takes it too


def test_the_invoice_amount_for_an_invoice_and_the_total_for_a_visit() -> None:
    inv = Invoice(amount=Decimal("2500"), paid_sum=Decimal("1000"))
    invoiced = event(name=EventName.INVOICE_CREATED, invoice=inv, total="1500")
    assert conversion_value(invoiced) == Decimal("2500")
    assert query_of(postback_url(invoiced, connection(), "k"))["value"] == "2500.00"
    # Without an amount, what was paid.
    paid_only = event(name=EventName.INVOICE_CREATED, invoice=Invoice(paid_sum=Decimal("999.9")), total=None)
    assert query_of(postback_url(paid_only, connection(), "k"))["value"] == "999.90"
    # A paid visit is worth its total even when the event carries an invoice.
    assert conversion_value(event(invoice=inv, total="1500")) == Decimal("1500")


@pytest.mark.parametrize("currency", ["RUB", "USD", "KZT"])
def test_the_connections_currency(currency: str) -> None:
    assert query_of(postback_url(event(), connection(currency=currency), "k"))["currency"] == currency


def test_event_id_client_id_and_ts() -> None:
    moscow = timezone(timedelta(hours=3))
    ev = event(
        event_id="evt-42", client_id="77", time=datetime(2024, 3, 14, 12, 15, 30, 999000, tzinfo=moscow)
    )
    q = query_of(postback_url(ev, connection(), "k"))
    assert (q["event_id"], q["client_id"], q["ts"]) == ("evt-42", "77", TS)  # whole unix seconds, UTC
    assert int(q["ts"]) == int(datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC).timestamp())


# ---------------------------------------------------------------------------------------------------------
# URL-encoding


@pytest.mark.parametrize(
    ("raw", "encoded"),
    [
        ("Оплата", "%D0%9E%D0%BF%D0%BB%D0%B0%D1%82%D0%B0"),
        ("a b", "a%20b"),
        ("a&b", "a%26b"),
        ("a=b", "a%3Db"),
        ("a#b", "a%23b"),
        ("a/b", "a%2Fb"),
        ("a+b", "a%2Bb"),
        ("100%", "100%25"),
        ("a?b", "a%3Fb"),
        ("{click_id}", "%7Bclick_id%7D"),
        ("Ab-_.~", "Ab-_.~"),
    ],
)
def test_values_are_url_encoded(raw: str, encoded: str) -> None:
    conn = connection(postback_url=BASE + "/{client_id}?click_id={click_id}&event={event}",
                      event_names={"visit-paid": raw})  # fmt: skip
    url = postback_url(event(client_id=raw), conn, raw)
    assert url == f"{BASE}/{encoded}?click_id={encoded}&event={encoded}"
    parts = urlsplit(url)
    assert unquote(parts.path) == f"/postback/{raw}"
    assert dict(parse_qsl(parts.query, strict_parsing=True)) == {"click_id": raw, "event": raw}


def test_encoded_values_pass_the_strict_sandbox() -> None:
    weird = "клик 42/α&x=1#frag+%20"
    conn = connection(event_names={"visit-paid": "Визит оплачен №1"})
    q = query_of(postback_url(event(client_id="id с пробелом&="), conn, weird))
    assert (q["click_id"], q["event"], q["client_id"]) == (weird, "Визит оплачен №1", "id с пробелом&=")


# ---------------------------------------------------------------------------------------------------------
# What the event cannot fill


def test_a_missing_value_is_a_mapping_error_with_a_hint() -> None:
    with pytest.raises(MappingError) as e:
        postback_url(event(total=None), connection(), "k")
    assert "{value}" in str(e.value)
    assert e.value.hint is not None
    assert "appointment_total_cost" in e.value.hint
    # A visit without an appointment at all, and an invoice without an amount.
    with pytest.raises(MappingError, match=r"\{value\}"):
        postback_url(event(visit=None, total=None), connection(), "k")
    with pytest.raises(MappingError, match=r"\{value\}"):
        postback_url(event(name=EventName.INVOICE_CREATED, invoice=Invoice(), total=None), connection(), "k")


def test_a_missing_client_id_is_a_mapping_error_with_a_hint() -> None:
    with pytest.raises(MappingError) as e:
        postback_url(event(client_id=None), connection(), "k")
    assert "{client_id}" in str(e.value)
    assert e.value.hint is not None
    assert "client_id" in e.value.hint


def test_a_macro_the_template_does_not_ask_for_is_not_needed() -> None:
    conn = connection(postback_url=BASE + "?click_id={click_id}&event={event}")
    assert query_of(postback_url(event(total=None, client_id=None), conn, "k")) == {"click_id": "k",
                                                                                    "event": "visit-paid"}  # fmt: skip


@pytest.mark.parametrize("total", ["-200", "-0.01", "0.001", "1500.505"])
def test_a_value_that_is_not_a_price_is_a_mapping_error(total: str) -> None:
    with pytest.raises(MappingError, match=r"\{value\}"):
        postback_url(event(total=total), connection(), "k")


@pytest.mark.parametrize("total", ["-0", "-0.00"])
def test_a_negative_zero_is_sent_as_zero(total: str) -> None:
    assert query_of(postback_url(event(total=total), connection(), "k"))["value"] == "0.00"


def test_an_absurd_value_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match=r"\{value\}"):
        postback_url(event(total="1" * 30), connection(), "k")


# ---------------------------------------------------------------------------------------------------------
# The conversion key: one conversion per event kind and visit


def test_one_conversion_per_visit() -> None:
    first, second = event(event_id="e1"), event(event_id="e2", total="999")
    assert conversion_key(first) == conversion_key(second) == "visit-paid:visit:55017"
    assert conversion_key(event(visit="55018")) == "visit-paid:visit:55018"
    # Another event kind of the same visit is another conversion.
    invoiced = event(name=EventName.INVOICE_CREATED, invoice=Invoice(amount=Decimal("1")))
    assert conversion_key(invoiced) == "invoice-created:visit:55017"


def test_without_a_visit_the_client_then_the_event() -> None:
    assert conversion_key(event(visit=None, total=None)) == "visit-paid:client:1842"
    assert conversion_key(event(visit=None, total="1")) == "visit-paid:client:1842"  # a visit without an id
    assert (
        conversion_key(event(visit=None, total=None, client_id=None, event_id="e9")) == "visit-paid:event:e9"
    )


# ---------------------------------------------------------------------------------------------------------
# Property: whatever the click id, the URL carries exactly it

PRINTABLE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60)


@settings(max_examples=200, deadline=None)
@given(click=PRINTABLE)
def test_the_click_id_parses_back_exactly(click: str) -> None:
    conn = connection(postback_url=BASE + "/{click_id}?click_id={click_id}&event={event}")
    url = postback_url(event(), conn, click)
    assert url.isascii()
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.fragment) == ("https", "plarin.example", "")
    assert dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)) == {
        "click_id": click,
        "event": "visit-paid",
    }
    assert unquote(parts.path, errors="strict") == f"/postback/{click}"
    assert url == f"{BASE}/{quote(click, safe='')}?click_id={quote(click, safe='')}&event=visit-paid"
