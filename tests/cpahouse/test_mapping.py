"""Unit tests for services.cpahouse.mapping: a normalized event to the form of CPA.House's send_order."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import Appointment, Attribution, Client, EventName
from services.cpahouse.mapping import REQUIRED, SUB_ID_MAX, MappingError, country_code, lead_form, lead_key
from services.ingest.parsing import CAPS, clean_text, is_placeholder
from services.sandbox.cpahouse import OPTIONAL_FIELDS, REQUIRED_FIELDS, CpaHouseError, validate_order
from tests.cpahouse.support import CONN_IP, CONN_UA, KEY, OFFER, WEBMASTER, client, connection, event

ACCOUNTS = {KEY: WEBMASTER}
UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148"


def accepted(form: dict[str, str]) -> dict[str, str]:
    """The form as the strict sandbox validates it (raises CpaHouseError with its msg)."""
    return validate_order(list(form.items()), ACCOUNTS)


# ---------------------------------------------------------------------------------------------------------
# The form


def test_typical_client_created_event() -> None:
    form = lead_form(event(client()), connection())
    assert form == {
        "api_key": KEY,
        "id_webmaster": WEBMASTER,
        "name": "Иванова Анна Сергеевна",
        "phone": "+79161234567",
        "id_offer": OFFER,
        "id_source": "11",
        "id_stream": "21",
        "user_agent": CONN_UA,
        "ip_address": CONN_IP,
        "county_code": "RU",
        "sub_id_1": "1842",
    }
    assert list(form)[: len(REQUIRED)] == list(REQUIRED)
    assert set(REQUIRED) == set(REQUIRED_FIELDS)  # the mapping and the sandbox agree on the API's fields
    assert accepted(form)["name"] == "Иванова Анна Сергеевна"


def test_online_booking_event_with_an_appointment() -> None:
    ev = event(
        client(),
        name=EventName.ONLINE_BOOKING,
        appointment=Appointment(id="55017", start=datetime(2024, 3, 20, 14, 30, tzinfo=ZoneInfo("Europe/Moscow")),
                                total_cost=Decimal("2500.00")),
    )  # fmt: skip
    form = lead_form(ev, connection(sub_ids={"sub_id_1": "{client.id}", "sub_id_2": "{appointment.id}"}))
    assert (form["sub_id_1"], form["sub_id_2"]) == ("1842", "55017")
    accepted(form)


@pytest.mark.parametrize(
    ("first", "last", "name"),
    [("Анна", "Иванова", "Анна Иванова"), ("Анна", None, "Анна"), (None, "Иванова", "Иванова")],
)
def test_name_from_first_and_last_without_a_full_name(first: str | None, last: str | None, name: str) -> None:
    who = client(full_name=None, first_name=first, last_name=last)
    assert lead_form(event(who), connection())["name"] == name


def test_full_name_wins_over_the_parts() -> None:
    who = client(full_name="Анна Сергеевна Иванова", first_name="Аня", last_name="Иванова")
    assert lead_form(event(who), connection())["name"] == "Анна Сергеевна Иванова"


def test_empty_full_name_falls_back_to_the_parts() -> None:
    who = client(full_name="", first_name="Анна", last_name="Иванова")
    assert lead_form(event(who), connection())["name"] == "Анна Иванова"


@pytest.mark.parametrize(
    ("phone", "region"),
    [
        ("+79161234567", "RU"),  # +7 9xx: a Russian mobile
        ("+74951234567", "RU"),  # Moscow landline
        ("+77012345678", "KZ"),  # +7 7xx: Kazakhstan
        ("+375291234567", "BY"),
        ("+380501234567", "UA"),
    ],
)
def test_county_code_is_the_phones_region(phone: str, region: str) -> None:
    assert country_code(phone) == region
    form = lead_form(event(client(phone=phone)), connection())
    assert (form["phone"], form["county_code"]) == (phone, region)
    accepted(form)  # the sandbox checks that the phone is valid for that region


@pytest.mark.parametrize("phone", ["", "garbage", "+", "+80012345678", "+8821234567"])
def test_country_code_is_none_without_a_two_letter_region(phone: str) -> None:
    # +800 (freephone) and +882 (international networks) belong to no country.
    assert country_code(phone) is None


def test_a_phone_of_no_country_is_a_mapping_error() -> None:
    with pytest.raises(MappingError, match="no country"):
        lead_form(event(client(phone="+80012345678")), connection())


def test_user_agent_and_ip_come_from_the_events_attribution() -> None:
    ev = event(client(), attribution=Attribution(user_agent=UA, ip="198.51.100.7"))
    form = lead_form(ev, connection())
    assert (form["user_agent"], form["ip_address"]) == (UA, "198.51.100.7")
    accepted(form)


def test_the_connections_user_agent_and_ip_fill_what_the_event_lacks() -> None:
    only_ip = lead_form(event(client(), attribution=Attribution(ip="198.51.100.7")), connection())
    assert (only_ip["user_agent"], only_ip["ip_address"]) == (CONN_UA, "198.51.100.7")
    only_ua = lead_form(event(client(), attribution=Attribution(user_agent=UA)), connection())
    assert (only_ua["user_agent"], only_ua["ip_address"]) == (UA, CONN_IP)
    utm_only = lead_form(event(client(), attribution=Attribution(utm={"utm_source": "yandex"})), connection())
    assert (utm_only["user_agent"], utm_only["ip_address"]) == (CONN_UA, CONN_IP)


def test_an_ipv6_address_from_the_event() -> None:
    form = lead_form(event(client(), attribution=Attribution(ip="2001:db8::7")), connection())
    assert form["ip_address"] == "2001:db8::7"
    accepted(form)


# ---------------------------------------------------------------------------------------------------------
# sub_id templates


def test_default_sub_id_1_is_the_client_id() -> None:
    assert connection().sub_ids == {"sub_id_1": "{client.id}"}
    form = lead_form(event(client(id="99017")), connection())
    assert form["sub_id_1"] == "99017"
    assert not {"sub_id_2", "sub_id_3", "sub_id_4"} & set(form)


def test_sub_id_templates_over_event_fields() -> None:
    sub_ids = {
        "sub_id_1": "klientiks-{client.id}",
        "sub_id_2": "{attribution.utm.utm_source}",
        "sub_id_3": "{attribution.utm.utm_campaign}/{attribution.click_ids.yclid}",
        "sub_id_4": "{extra.promo}",
    }
    ev = event(
        client(),
        attribution=Attribution(
            utm={"utm_source": "yandex", "utm_campaign": "весна"}, click_ids={"yclid": "73645"}
        ),
        extra={"promo": "SPRING24"},
    )
    form = lead_form(ev, connection(sub_ids=sub_ids))
    assert {k: form[k] for k in OPTIONAL_FIELDS} == {
        "sub_id_1": "klientiks-1842",
        "sub_id_2": "yandex",
        "sub_id_3": "весна/73645",
        "sub_id_4": "SPRING24",
    }
    accepted(form)


def test_a_sub_id_whose_field_is_missing_is_left_out() -> None:
    sub_ids = {
        "sub_id_1": "{client.id}",
        "sub_id_2": "{attribution.utm.utm_source}",
        "sub_id_3": "x-{extra.promo}",
    }
    form = lead_form(event(client()), connection(sub_ids=sub_ids))
    assert form["sub_id_1"] == "1842"
    assert "sub_id_2" not in form  # never "" (the sandbox refuses an empty sub_id)
    assert "sub_id_3" not in form  # never a half-filled "x-"
    accepted(form)


def test_no_sub_ids_at_all() -> None:
    form = lead_form(event(client()), connection(sub_ids={}))
    assert not set(OPTIONAL_FIELDS) & set(form)
    accepted(form)


@pytest.mark.parametrize(("length", "kept"), [(SUB_ID_MAX, True), (SUB_ID_MAX + 1, False), (1000, False)])
def test_a_sub_id_over_255_characters_is_left_out_never_cut(length: int, kept: bool) -> None:
    value = "я" * length
    form = lead_form(event(client(), extra={"ref": value}), connection(sub_ids={"sub_id_2": "{extra.ref}"}))
    assert form.get("sub_id_2") == (value if kept else None)
    accepted(form)


def test_sub_ids_are_written_in_order() -> None:
    sub_ids = {"sub_id_3": "{client.phone}", "sub_id_1": "{client.id}"}
    form = lead_form(event(client()), connection(sub_ids=sub_ids))
    assert list(form)[-2:] == ["sub_id_1", "sub_id_3"]


# ---------------------------------------------------------------------------------------------------------
# What a lead cannot do without


@pytest.mark.parametrize(
    "who",
    [
        client(full_name=None, first_name=None, last_name=None),
        client(full_name="", first_name="", last_name=""),
        client(full_name=None, first_name=None, last_name=None, patronymic="Сергеевна"),
        None,
    ],
)
def test_no_name_is_a_mapping_error_with_a_hint(who: Client | None) -> None:
    with pytest.raises(MappingError, match="no name") as e:
        lead_form(event(who), connection())
    assert e.value.hint is not None
    assert "client_name" in e.value.hint


@pytest.mark.parametrize("phone", [None, ""])
def test_no_phone_is_a_mapping_error_with_a_hint(phone: str | None) -> None:
    with pytest.raises(MappingError, match="phone") as e:
        lead_form(event(client(phone=phone)), connection())
    assert e.value.hint is not None
    assert "client_phone" in e.value.hint


def test_no_user_agent_is_a_mapping_error_with_a_hint() -> None:
    with pytest.raises(MappingError, match="user agent") as e:
        lead_form(event(client(), attribution=Attribution(ip="198.51.100.7")), connection(user_agent=None))
    assert e.value.hint is not None
    assert "user_agent" in e.value.hint


def test_no_ip_is_a_mapping_error_with_a_hint() -> None:
    with pytest.raises(MappingError, match="IP") as e:
        lead_form(event(client(), attribution=Attribution(user_agent=UA)), connection(ip_address=None))
    assert e.value.hint is not None
    assert "ip_address" in e.value.hint


def test_the_event_alone_is_enough_without_connection_defaults() -> None:
    ev = event(client(), attribution=Attribution(user_agent=UA, ip="198.51.100.7"))
    form = lead_form(ev, connection(user_agent=None, ip_address=None))
    assert (form["user_agent"], form["ip_address"]) == (UA, "198.51.100.7")


def test_mapping_error_is_a_value_error() -> None:
    assert issubclass(MappingError, ValueError)
    assert MappingError("x").hint is None


# ---------------------------------------------------------------------------------------------------------
# lead_key


def test_lead_key_is_offer_and_client() -> None:
    assert lead_key(event(client(id="1842")), connection()) == f"{OFFER}:1842"
    assert lead_key(event(client(id="1842")), connection(offer_id="502")) == "502:1842"
    # The same client under another event is the same lead.
    assert lead_key(event(client(id="1842"), name=EventName.ONLINE_BOOKING), connection()) == f"{OFFER}:1842"


@pytest.mark.parametrize("who", [client(id=None), client(id=""), None])
def test_no_client_id_is_a_mapping_error_with_a_hint(who: Client | None) -> None:
    with pytest.raises(MappingError, match="no client") as e:
        lead_key(event(who), connection())
    assert e.value.hint is not None
    assert "client_id" in e.value.hint


# ---------------------------------------------------------------------------------------------------------
# Whatever clean names come, the form is clean (and the strict sandbox takes it)

_BAD = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _clean(cap: int, exclude: str = "") -> st.SearchStrategy[str | None]:
    """A name part as the normalizer keeps it: cleaned text within its cap and no leftover placeholder, or absent."""
    raw = st.text(st.characters(codec="utf-8", exclude_characters=exclude), max_size=cap + 20).map(clean_text)
    return st.none() | raw.filter(lambda v: v is None or (len(v) <= cap and not is_placeholder(v)))


@settings(max_examples=200, deadline=None)
@given(
    full=_clean(CAPS["client_name"]),
    first=_clean(CAPS["client_first_name"]),
    last=_clean(CAPS["client_second_name"]),
    phone=st.sampled_from(["+79161234567", "+77012345678", "+375291234567"]),
)
def test_no_value_is_empty_or_has_a_control_character(
    full: str | None, first: str | None, last: str | None, phone: str
) -> None:
    who = client(full_name=full, first_name=first, last_name=last, phone=phone)
    try:
        form = lead_form(event(who), connection())
    except MappingError:
        # Only a client without any name is refused.
        assert not full
        assert not first
        assert not last
        return
    for name, value in form.items():
        assert value, name
        assert value == value.strip(), name
        assert not any(unicodedata.category(ch) in _BAD for ch in value), (name, value)
    assert form["name"] in (full, f"{first or ''} {last or ''}".strip())


@settings(max_examples=200, deadline=None)
@given(
    first=_clean(CAPS["client_first_name"], exclude="\ufffd"),
    last=_clean(CAPS["client_second_name"], exclude="\ufffd"),
    full=_clean(255, exclude="\ufffd"),
)
def test_the_strict_sandbox_accepts_the_form_of_clean_names(
    first: str | None, last: str | None, full: str | None
) -> None:
    # A name of at most 255 characters (what the sandbox takes; longer ones below), and no
    # U+FFFD, which the sandbox refuses as the trace of undecodable bytes.
    try:
        form = lead_form(event(client(full_name=full, first_name=first, last_name=last)), connection())
    except MappingError:
        return
    try:
        accepted(form)
    except CpaHouseError as e:
        raise AssertionError(f"refused {form['name']!r}: {e.msg}") from None


# ---------------------------------------------------------------------------------------------------------
# Values the normalizer keeps that the API cannot take: the mapping refuses the event (MappingError) or
# sends what is accepted (the connection's user agent or IP instead of the event's).


def _refused_or_accepted(ev_client: Client, attribution: Attribution | None = None) -> None:
    try:
        form = lead_form(event(ev_client, attribution=attribution), connection())
    except MappingError:
        return
    accepted(form)


def test_a_full_name_the_normalizer_keeps_is_refused_or_accepted() -> None:
    # client_name may be 302 characters after cleaning (services/ingest/parsing.py CAPS).
    _refused_or_accepted(client(full_name="Анна " + "я" * 295))


def test_a_user_agent_the_normalizer_keeps_is_refused_or_accepted() -> None:
    # user_agent may be 1000 characters after cleaning; the connection's own is capped at 512.
    _refused_or_accepted(client(), Attribution(user_agent="Mozilla/5.0 " + "x" * 600, ip="198.51.100.7"))


def test_a_scoped_ipv6_address_the_normalizer_keeps_is_refused_or_accepted() -> None:
    # ipaddress.ip_address accepts "fe80::1%eth0" (Python >= 3.9), so the normalizer keeps it.
    _refused_or_accepted(client(), Attribution(user_agent=UA, ip="fe80::1%eth0"))
