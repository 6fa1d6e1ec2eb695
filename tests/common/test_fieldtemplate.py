"""Unit tests for services.common.fieldtemplate: connection templates such as ``"klientiks-{client.id}"``.

``problems`` is what the config check says of a template; ``render`` fills a checked template from an event,
all or nothing.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import (
    Appointment,
    Attribution,
    Client,
    CloudEvent,
    EventData,
    EventName,
    Invoice,
    Person,
    source_uri,
)
from services.common.fieldtemplate import fields, problems, render
from services.ingest.parsing import clean_text

MSK = ZoneInfo("Europe/Moscow")
RECEIVED = datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC)
MAP_PATHS = ("extra.promo", "attribution.utm.utm_source", "attribution.click_ids.yclid")


def event(data: EventData | None = None, *, subject: str | None = "client/1842") -> CloudEvent:
    return CloudEvent(
        id="0f8e7d6c5b4a39281706f5e4d3c2b1a0",
        source=source_uri("salon"),
        type=EventName.ONLINE_BOOKING.ce_type,
        time=RECEIVED,
        subject=subject,
        relayreceivedat=RECEIVED,
        data=data if data is not None else EventData(),
    )


def full_event() -> CloudEvent:
    """An event carrying a value for every path a template may name."""
    return event(
        EventData(
            client=Client(
                id="1842", full_name="Иванова Анна Сергеевна", first_name="Анна", last_name="Иванова",
                patronymic="Сергеевна", phone="+79161234567", email="anna.ivanova@mail.ru", deleted=False,
            ),
            appointment=Appointment(
                id="55017", start=datetime(2024, 3, 20, 14, 30, tzinfo=MSK), status="подтверждена",
                total_cost=Decimal("2500.00"), services=["Стрижка", "Укладка"],
                executor=Person(name="Мария Петрова", phone="+79160000002"),
                created=datetime(2024, 3, 14, 12, 15, 30, tzinfo=MSK), paid=True, parent_id="55000",
                account_id="7", executor_id="113423", author_id="113421", by_subscription=False,
            ),
            invoice=Invoice(
                object_id="55017", name="Счёт 12", description="Стрижка и укладка", amount=Decimal("2500.00"),
                paid_sum=Decimal("0"), left_to_pay=Decimal("2500.00"), paid=False,
            ),
            attribution=Attribution(
                utm={"utm_source": "yandex", "utm_campaign": "весна"}, ip="203.0.113.10",
                user_agent="Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0", click_ids={"yclid": "7364527"},
            ),
            user_position="Администратор",
            extra={"promo": "SPRING24"},
        )
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# problems


def test_fields_lists_the_scalar_paths_of_the_event() -> None:
    paths = fields()
    assert paths == sorted(paths)
    assert {"client.id", "client.full_name", "client.phone", "client.deleted", "appointment.start",
            "appointment.total_cost", "appointment.executor.name", "invoice.amount", "attribution.ip",
            "attribution.user_agent", "event.id", "event.time", "user_position"} <= set(paths)  # fmt: skip
    # Nested models and lists of records are not one value; the service names are, joined.
    assert not {"appointment.lines", "appointment.executor", "client", "extra"} & set(paths)
    assert "appointment.services" in paths


@pytest.mark.parametrize("path", fields())
def test_every_listed_path_is_accepted(path: str) -> None:
    assert problems(f"{{{path}}}") == []
    assert problems(f"klientiks-{{{path}}}/x") == []


@pytest.mark.parametrize("path", fields())
def test_every_listed_path_renders_from_a_full_event(path: str) -> None:
    # What the check accepts, render can read: no listed path is a dead end.
    value = render(f"{{{path}}}", full_event())
    assert value
    assert "{" not in value


@pytest.mark.parametrize(
    "template",
    [
        "{extra.promo}",
        "{extra.a-b_1}",
        "{extra." + "k" * 64 + "}",
        "{attribution.utm.utm_source}",
        "{attribution.utm.utm_campaign}",
        "{attribution.click_ids.yclid}",
        "{attribution.click_ids.gclid}",
        "static text",
        "",
        "{{client.id}}",
        "{{{client.id}}}",
        "a {{ b }} c",
        "klientiks-{client.id}-{appointment.id}",
        "{{utm}}: {attribution.utm.utm_source} / {attribution.utm.utm_medium}",
    ],
)
def test_accepted_templates(template: str) -> None:
    assert problems(template) == []


@pytest.mark.parametrize(
    "path",
    [
        "client.nope",
        "client",
        "appointment",
        "appointment.lines",
        "appointment.executor",
        "missing",
        "extra",
        "extra.",
        "extra.a.b",
        "extra.a b",
        "extra.ключ",
        "extra." + "k" * 65,
        "attribution.utm",
        "attribution.utm.",
        "attribution.click_ids",
        "data.client.id",
        "event.data",
        "event.relayreceivedat",
        "client.id[0]",
        "attribution.utm.utm_source[0]",
        " client.id",
        "",
        "0",
    ],
)
def test_unknown_paths_are_refused(path: str) -> None:
    found = problems(f"x-{{{path}}}")
    assert len(found) == 1
    assert "unknown field" in found[0]
    assert "extra.NAME" in found[0]  # the problem says what to write instead


@pytest.mark.parametrize(
    "template",
    ["{client.id!r}", "{client.id!s}", "{client.id:>5}", "{event.time!r}", "{client.id:{client.phone}}"],
)
def test_conversions_and_format_specs_are_refused(template: str) -> None:
    found = problems(template)
    assert len(found) == 1
    assert "without a conversion" in found[0]


def test_a_date_time_takes_a_format_and_services_are_joined() -> None:
    template = "{appointment.services} — {appointment.start:%d.%m.%Y %H:%M}"
    assert problems(template) == []
    assert render(template, full_event()) == "Стрижка, Укладка — 20.03.2024 14:30"
    no_services = full_event().data.model_copy(update={"appointment": Appointment(id="1", start=RECEIVED)})
    assert render(template, event(no_services)) is None


@pytest.mark.parametrize(
    "template", ["{client.id", "client.id}", "{", "}", "a}b", "{client.id}}", "{{client.id}"]
)
def test_unbalanced_braces_are_refused(template: str) -> None:
    [found] = problems(template)
    assert "malformed template" in found
    assert "{{" in found  # the fix: write literal braces doubled


def test_every_problem_is_listed() -> None:
    found = problems("{nope}-{client.id:>5}-{appointment.lines}")
    assert len(found) == 3
    assert sum("unknown field {nope}" in p for p in found) == 1
    assert sum("unknown field {appointment.lines}" in p for p in found) == 1


# ---------------------------------------------------------------------------------------------------------
# render


def test_render_fills_strings() -> None:
    ev = full_event()
    assert render("klientiks-{client.id}", ev) == "klientiks-1842"
    assert render("{client.full_name}", ev) == "Иванова Анна Сергеевна"
    assert render("{attribution.utm.utm_source}/{attribution.utm.utm_campaign}", ev) == "yandex/весна"
    assert render("{attribution.click_ids.yclid}", ev) == "7364527"
    assert render("{extra.promo}", ev) == "SPRING24"
    assert render("{appointment.executor.name}", ev) == "Мария Петрова"
    assert render("{user_position}", ev) == "Администратор"
    assert render("{event.id}", ev) == "0f8e7d6c5b4a39281706f5e4d3c2b1a0"
    assert render("{event.type}", ev) == "ru.klientiks.appointment.booked_online"
    assert render("{event.source}", ev) == "/klientiks/salon"
    assert render("{event.subject}", ev) == "client/1842"


def test_render_writes_money_as_its_decimal_string() -> None:
    ev = full_event()
    assert render("{appointment.total_cost}", ev) == "2500.00"  # the scale is kept, never a float
    assert render("{invoice.paid_sum}", ev) == "0"  # zero is a value, not an absent one
    ev = event(EventData(invoice=Invoice(amount=Decimal("1234567.89"))))
    assert render("{invoice.amount} RUB", ev) == "1234567.89 RUB"


def test_render_writes_datetimes_as_iso() -> None:
    ev = full_event()
    assert render("{appointment.start}", ev) == "2024-03-20T14:30:00+03:00"
    assert render("{event.time}", ev) == "2024-03-14T09:15:30+00:00"
    ev = event(EventData(appointment=Appointment(start=datetime(2024, 3, 20, 14, 30, 15, 999, tzinfo=UTC))))
    assert render("{appointment.start}", ev) == "2024-03-20T14:30:15+00:00"
    ev = event(
        EventData(
            appointment=Appointment(start=datetime(2024, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=5))))
        )
    )
    assert render("{appointment.start}", ev) == "2024-01-02T03:04:00+05:00"


def test_render_writes_bools_as_words() -> None:
    ev = full_event()
    assert render("{appointment.paid}", ev) == "true"
    assert render("{invoice.paid}", ev) == "false"  # False is a value, not an absent one
    assert render("{client.deleted}", ev) == "false"


def test_render_keeps_escaped_braces_literal() -> None:
    ev = full_event()
    assert render("{{{client.id}}}", ev) == "{1842}"
    assert render("{{client.id}}", ev) == "{client.id}"
    assert render("static", ev) == "static"


@pytest.mark.parametrize(
    ("template", "data"),
    [
        ("klientiks-{client.id}", EventData()),  # no client at all
        ("klientiks-{client.id}", EventData(client=Client(phone="+79161234567"))),
        ("{client.id}-{client.email}", EventData(client=Client(id="1842"))),
        ("{client.email}", EventData(client=Client(id="1842", email=""))),  # empty is absent
        ("{extra.promo}", EventData(extra={"other": "x"})),
        ("{extra.promo}", EventData(extra={"promo": ""})),
        ("{attribution.utm.utm_source}", EventData()),
        ("{attribution.utm.utm_source}", EventData(attribution=Attribution(ip="203.0.113.10"))),
        ("{attribution.click_ids.yclid}", EventData(attribution=Attribution(click_ids={"gclid": "1"}))),
        ("{appointment.executor.name}", EventData(appointment=Appointment(id="1"))),
        (
            "{appointment.executor.name}",
            EventData(appointment=Appointment(executor=Person(phone="+79160000002"))),
        ),
        ("{appointment.start}", EventData(appointment=Appointment(id="1"))),
        ("{invoice.paid}", EventData(invoice=Invoice(amount=Decimal(1)))),
        ("{user_position}", EventData()),
    ],
)
def test_render_is_none_when_a_named_field_is_absent(template: str, data: EventData) -> None:
    assert render(template, event(data)) is None


def test_render_is_never_half_filled() -> None:
    ev = event(EventData(client=Client(id="1842"), extra={"promo": "SPRING24"}))
    assert render("{client.id}-{extra.promo}", ev) == "1842-SPRING24"
    assert render("{client.id}-{extra.promo}-{client.email}", ev) is None
    assert render("{client.email}-{client.id}", ev) is None
    assert render("{event.subject}", event(subject=None)) is None


def test_render_of_only_whitespace_is_none() -> None:
    assert render("", full_event()) is None
    assert render("   ", full_event()) is None
    assert render("  {client.id}  ", full_event()) == "1842"


# ---------------------------------------------------------------------------------------------------------
# The property: all or nothing, and no field left unfilled.

# Clean text as the normalizer keeps it (services/ingest/parsing.py), without braces so a leftover shows.
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="{}"), max_size=12).map(clean_text)
IDS = st.from_regex(r"[0-9]{1,20}", fullmatch=True)
WHEN = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.sampled_from([UTC, MSK])
)
MONEY = st.decimals(min_value=0, max_value=10**9, places=2, allow_nan=False, allow_infinity=False)


def opt(s: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | s


def _keys(*names: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(names), TEXT.filter(lambda v: v is not None), max_size=len(names))


EVENTS = st.builds(
    lambda data, subject: event(data, subject=subject),
    st.builds(
        EventData,
        client=opt(st.builds(Client, id=opt(IDS), full_name=opt(TEXT), first_name=opt(TEXT), last_name=opt(TEXT),
                             patronymic=opt(TEXT), phone=opt(st.sampled_from(["+79161234567", "+375291234567"])),
                             email=opt(TEXT), deleted=opt(st.booleans()))),
        appointment=opt(st.builds(Appointment, id=opt(IDS), start=opt(WHEN), status=opt(TEXT),
                                  total_cost=opt(MONEY), services=st.lists(TEXT.filter(bool), max_size=2),
                                  executor=opt(st.builds(Person, name=opt(TEXT), phone=opt(TEXT))),
                                  created=opt(WHEN), paid=opt(st.booleans()), parent_id=opt(IDS),
                                  account_id=opt(IDS))),
        invoice=opt(st.builds(Invoice, object_id=opt(IDS), name=opt(TEXT), description=opt(TEXT),
                              amount=opt(MONEY), paid_sum=opt(MONEY), left_to_pay=opt(MONEY),
                              paid=opt(st.booleans()))),
        attribution=opt(st.builds(Attribution, utm=_keys("utm_source", "utm_campaign"), ip=opt(TEXT),
                                  user_agent=opt(TEXT), click_ids=_keys("yclid", "gclid"))),
        user_position=opt(TEXT),
        extra=_keys("promo", "ref"),
    ),
    opt(TEXT),
)  # fmt: skip
PATHS = [*fields(), *MAP_PATHS, "extra.ref", "extra.absent", "attribution.utm.utm_campaign"]
LITERAL = st.text(st.characters(codec="utf-8", exclude_characters="{}"), max_size=6)
PART = st.one_of(
    st.tuples(st.just("literal"), LITERAL),
    st.tuples(st.just("escaped"), st.sampled_from(["{{", "}}"])),
    st.tuples(st.just("field"), st.sampled_from(PATHS)),
)


def _value(ev: CloudEvent, path: str) -> Any:
    """What the event holds at ``path``, read from its dump (not the way ``render`` reads it)."""
    if path.startswith("event."):
        return ev.model_dump()[path.removeprefix("event.")]
    node: Any = ev.data.model_dump()
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


@settings(max_examples=200, deadline=None)
@given(ev=EVENTS, parts=st.lists(PART, max_size=5))
def test_render_of_a_checked_template_is_all_or_nothing(ev: CloudEvent, parts: list[tuple[str, str]]) -> None:
    template = "".join(f"{{{p}}}" if kind == "field" else p for kind, p in parts)
    assert problems(template) == []
    out = render(template, ev)
    named = [p for kind, p in parts if kind == "field"]
    values = {p: _value(ev, p) for p in named}
    if any(v is None or v == "" for v in values.values()):
        assert out is None  # never a half-filled value
        return
    assert out is None or (out and out == out.strip())
    if out is not None and not any(kind == "escaped" for kind, _ in parts):
        # Values and literals hold no brace here, so a brace would be a field left unfilled.
        assert "{" not in out
        assert "}" not in out
    want = "".join(
        _text(values[p]) if kind == "field" else (p[0] if kind == "escaped" else p) for kind, p in parts
    )
    assert out == (want.strip() or None)
