"""Property tests of services.ingest.parsing: whatever Klientiks (or anyone) sends, the parser's promises hold.

Each test draws a few hundred examples at most, so the whole file stays a few seconds long.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import phonenumbers
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.common.events import CloudEvent
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import (
    KNOWN,
    Normalized,
    Params,
    Rejected,
    canonical_key,
    clean_value,
    fits,
    is_placeholder,
    normalize,
    normalize_phone,
    parse_bool,
    parse_money,
    request_params,
    split_name,
)

MSK = ZoneInfo("Europe/Moscow")
RECEIVED_AT = datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC)
EVENTS = [
    "client-created",
    "appointment-created",
    "online-booking",
    "appointment-changed",
    "invoice-created",
    "visit-paid",
]
FAST = settings(max_examples=150, deadline=None)
THOROUGH = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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


def run(
    event: str, query: str, *, zone: ZoneInfo = MSK, region: str = "RU", **kw: Any
) -> Normalized | Rejected:
    return normalize(record(event, query, **kw), zone=zone, phone_region=region)


def data_of(key: str, raw: str) -> str | None:
    """What the parser must keep of ``raw`` as the value of ``key``: its clean text when that is data."""
    value = clean_value(key, raw)
    return value if value and not is_placeholder(value) and fits(key, value, raw) else None


def sent_something(key: str, raw: str) -> bool:
    """``raw`` carried something visible that is not a placeholder (data, or else invalid)."""
    value = clean_value(key, raw)
    return value is None or bool(value and not is_placeholder(value))


def strings_in(node: Any) -> Iterator[str]:
    """Every string value in a JSON document (dict keys are names, not data, and are skipped)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings_in(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings_in(v)


# ---------------------------------------------------------------------------------------------------------
# Strategies

# URL-encoding needs UTF-8, which a lone surrogate is not; everything else is fair game.
_CHARS = st.characters(exclude_categories=["Cs"])
TEXT = st.text(_CHARS)
_KEYS = st.one_of(
    # The keys whose values reach the event most directly, drawn more often.
    st.sampled_from(["client_phone", "client_name", "services", "status", "utm_source", "promo"]),
    st.sampled_from([*sorted(KNOWN), "appointment.time", "utm_source", "gclid", "yclid"]),
    st.from_regex(r"[a-z][a-z0-9_.]{0,15}", fullmatch=True),
)
_ANY_KEYS = st.one_of(_KEYS, TEXT, st.sampled_from(["{{x}}", "Client_ID", " client.phone ", "", "."]))
_NAMES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,12}", fullmatch=True)
PLACEHOLDERS = st.one_of(
    st.sampled_from(
        [
            "{{phone}}",
            "{{client.phone}}",
            "{appointment.status}}",
            "{{#new_data}}{{status}}{{/new_data}}",
            "{{#a}}{{b}}{{/a}}",
            "{x.y}}",
            "{id}",
            "{service.name}",
            "{{",
            "}}",
        ]
    ),
    st.builds(lambda s: "{{" + s + "}}", TEXT),  # `{{anything}}`
    st.builds(lambda n: "{" + n + "}}", _NAMES),
    st.builds(lambda n: "{" + n + "}", _NAMES),
    st.builds(lambda a, b: f"{{{{#{a}}}}}{{{{{b}}}}}{{{{/{a}}}}}", _NAMES, _NAMES),
    st.builds(
        lambda p, pad: pad + p + pad, st.sampled_from(["{{name}}", "{id}"]), st.sampled_from([" ", "\t"])
    ),
)
_RU_WORDS = st.sampled_from(
    ["Иванова", "Анна", "Иванова Анна Сергеевна", "Стрижка женская", "Маникюр", "2500.00", "79991234567", ""]
)
_LONG = st.builds(
    lambda s, n: s * n,
    st.text(_CHARS, min_size=1, max_size=8),
    st.integers(1000, 10_000),
)
VALUES = st.one_of(
    TEXT,
    PLACEHOLDERS,
    _RU_WORDS,
    st.lists(st.one_of(_RU_WORDS, PLACEHOLDERS, TEXT), max_size=4).map(", ".join),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
_CONTENT_TYPES = st.sampled_from(
    [
        None,
        "application/json",
        "application/x-www-form-urlencoded; charset=UTF-8",
        "text/plain",
        "text/xml",
        "x",
    ]
)


# ---------------------------------------------------------------------------------------------------------
# normalize never raises


@THOROUGH
@given(params=st.dictionaries(_KEYS, VALUES, max_size=12), event=st.sampled_from(EVENTS))
def test_normalize_never_raises(params: dict[str, str], event: str) -> None:
    result = run(event, urlencode(params))
    assert isinstance(result, Normalized | Rejected)
    if isinstance(result, Normalized):
        # Whatever came in, the event is valid on the wire and reads back the same.
        back = CloudEvent.from_kafka(result.event.kafka_headers(), result.event.kafka_value())
        assert back == result.event


@FAST
@given(
    pairs=st.lists(st.tuples(_ANY_KEYS, st.one_of(VALUES, _LONG)), max_size=8),
    event=st.one_of(st.sampled_from(EVENTS), TEXT),
    client_id=TEXT,
    mode=st.sampled_from(["query", "form", "json"]),
)
def test_normalize_never_raises_on_any_names_and_values(
    pairs: list[tuple[str, str]], event: str, client_id: str, mode: str
) -> None:
    pairs = [("client_id", client_id), *pairs]
    if mode == "query":
        result = run(event, urlencode(pairs))
    elif mode == "form":
        result = run(
            event, "", body=urlencode(pairs).encode(), content_type="application/x-www-form-urlencoded"
        )
    else:
        result = run(event, "", body=json.dumps(dict(pairs)).encode(), content_type="application/json")
    assert isinstance(result, Normalized | Rejected)
    if event not in EVENTS:
        assert isinstance(result, Rejected)
        assert result.reason == "unknown_event"


@FAST
@given(obj=st.dictionaries(st.one_of(_KEYS, TEXT), _JSON, max_size=8), event=st.sampled_from(EVENTS))
def test_normalize_never_raises_on_json_of_any_shape(obj: dict[str, Any], event: str) -> None:
    body = json.dumps({"client_id": 1842, **obj}).encode()
    result = run(event, "", body=body, content_type="application/json")
    assert isinstance(result, Normalized | Rejected)


@FAST
@given(query=TEXT, body=st.binary(max_size=200), content_type=_CONTENT_TYPES, event=st.sampled_from(EVENTS))
def test_normalize_never_raises_on_raw_bytes(
    query: str, body: bytes, content_type: str | None, event: str
) -> None:
    assert isinstance(run(event, query, body=body, content_type=content_type), Normalized | Rejected)


# ---------------------------------------------------------------------------------------------------------
# A leftover placeholder is never data


@THOROUGH
@given(
    params=st.dictionaries(_KEYS, VALUES, max_size=10),
    leftovers=st.dictionaries(
        st.one_of(st.sampled_from(sorted(KNOWN - {"client_id"})), _KEYS), PLACEHOLDERS, min_size=1, max_size=5
    ),
    event=st.sampled_from(EVENTS),
)
def test_placeholder_is_never_data_and_always_missing(
    params: dict[str, str], leftovers: dict[str, str], event: str
) -> None:
    left = {canonical_key(k) for k in leftovers}
    assume("client_id" not in left)
    real = {k: v for k, v in params.items() if canonical_key(k) not in left | {"client_id"}}
    pairs = [("client_id", "1842"), *real.items(), *leftovers.items()]
    result = run(event, urlencode(pairs))
    assert isinstance(result, Normalized)
    data = json.loads(result.event.data.model_dump_json())
    strings = list(strings_in(data))
    assert [s for s in strings if is_placeholder(s)] == []
    # Not even inside a longer value: a string with a double brace would be a placeholder itself.
    assert [s for s in strings if "{{" in s or "}}" in s] == []
    for key, value in leftovers.items():
        assert (canonical_key(key), "placeholder") in result.missing
        assert canonical_key(key) in result.event.data.missing
        assert value.strip() not in strings
    assert not is_placeholder(result.key.split(":", 1)[1])
    for _, v in result.event.kafka_headers():
        assert b"{{" not in v


# ---------------------------------------------------------------------------------------------------------
# Phones

_PHONE_CHARS = st.text(alphabet="0123456789 +-()x.", max_size=20)
_PHONES = st.one_of(
    _PHONE_CHARS,
    TEXT,
    st.from_regex(r"(\+7|8|7)?[ -]?\(?9[0-9]{2}\)?[ -]?[0-9]{3}[ -]?[0-9]{2}[ -]?[0-9]{2}", fullmatch=True),
    st.from_regex(r"\+[1-9][0-9]{6,14}", fullmatch=True),
)
_REGIONS = st.sampled_from(["RU", "KZ", "BY", "UZ", "US", "DE"])


def _is_valid_e164(phone: str) -> bool:
    return bool(re.fullmatch(r"\+[1-9][0-9]{1,14}", phone)) and phonenumbers.is_valid_number(
        phonenumbers.parse(phone)
    )


@THOROUGH
@given(raw=_PHONES, region=_REGIONS)
def test_normalize_phone_is_none_or_valid_e164_and_stable(raw: str, region: str) -> None:
    phone = normalize_phone(raw, region)
    if phone is not None:
        assert _is_valid_e164(phone)
        # E.164 carries its country: normalizing it again, from any region, changes nothing.
        assert normalize_phone(phone, "RU") == phone
        assert normalize_phone(phone, "US") == phone


@FAST
@given(client_phone=_PHONES, executor_phone=_PHONES, region=_REGIONS)
def test_every_phone_in_the_event_is_valid_e164(client_phone: str, executor_phone: str, region: str) -> None:
    query = urlencode(
        {
            "client_id": "1842",
            "client_phone": client_phone,
            "executor_phone": executor_phone,
            "appointment_id": "5",
        }
    )
    result = run("appointment-created", query, region=region)
    assert isinstance(result, Normalized)
    client, appt = result.event.data.client, result.event.data.appointment
    assert client is not None
    executor = appt.executor if appt else None
    for key, raw, phone in (
        ("client_phone", client_phone, client.phone),
        ("executor_phone", executor_phone, executor.phone if executor else None),
    ):
        if phone is not None:
            assert _is_valid_e164(phone)
        elif sent_something(key, raw):
            assert (
                key,
                "invalid",
            ) in result.missing  # sent but not a phone: reported, never dropped silently


@FAST
@given(
    digits=st.text(alphabet="0123456789", min_size=9, max_size=9),
    spelling=st.sampled_from(["7{d}", "8{d}", "+7 ({a}) {b}-{c}-{e}", "8 ({a}) {b}-{c}-{e}", "+7{d}", "{d}"]),
)
def test_russian_mobiles_normalize_to_e164(digits: str, spelling: str) -> None:
    d = "9" + digits
    raw = spelling.format(d=d, a=d[:3], b=d[3:6], c=d[6:8], e=d[8:])
    # libphonenumber knows a few 9xx blocks as unassigned (e.g. +7 930 0xx): every spelling must then
    # agree on None; everything else (all but ~1 in 20,000) is "+79..." with the same digits.
    expected = "+7" + d if phonenumbers.is_valid_number(phonenumbers.parse("+7" + d)) else None
    assert normalize_phone(raw, "RU") == expected


# ---------------------------------------------------------------------------------------------------------
# Money

_AMOUNTS = st.integers(0, 4).flatmap(
    lambda places: st.decimals(
        min_value=-(10**9), max_value=10**9, places=places, allow_nan=False, allow_infinity=False
    )
)


def _grouped(digits: str, sep: str) -> str:
    head = len(digits) % 3 or 3
    return sep.join([digits[:head], *(digits[i : i + 3] for i in range(head, len(digits), 3))])


@THOROUGH
@given(
    amount=_AMOUNTS,
    group=st.sampled_from(["", " ", "\u00a0", "\u2009", "\u202f"]),
    point=st.sampled_from([".", ","]),
    minus=st.sampled_from(["-", "\u2212"]),
    currency=st.sampled_from(["", " ₽", "₽", "\u00a0₽", " руб.", " руб", "руб.", " р.", " RUB"]),
    pad=st.sampled_from(["", " ", "\u00a0"]),
)
def test_money_round_trips_in_every_spelling(
    amount: Decimal, group: str, point: str, minus: str, currency: str, pad: str
) -> None:
    plain = f"{amount:f}"
    negative = plain.startswith("-")
    whole, _, frac = plain.lstrip("-").partition(".")
    raw = (
        pad
        + (minus if negative else "")
        + _grouped(whole, group)
        + (point + frac if frac else "")
        + currency
        + pad
    )
    parsed = parse_money(raw)
    assert parsed is not None, raw
    # Equal and with the same digits and scale: nothing rounded, nothing quantized.
    assert parsed.as_tuple() == amount.as_tuple()


@FAST
@given(
    mantissa=st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-1000, max_value=1000),
    exponent=st.integers(-10, 10),
    e=st.sampled_from(["e", "E"]),
)
def test_money_refuses_exponents(mantissa: Decimal, exponent: int, e: str) -> None:
    assert parse_money(f"{mantissa:f}{e}{exponent}") is None


@FAST
@given(
    word=st.sampled_from(["nan", "snan", "qnan", "inf", "infinity"]),
    sign=st.sampled_from(["", "-", "+"]),
    flips=st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_money_refuses_nan_and_infinity(word: str, sign: str, flips: list[bool]) -> None:
    spelled = "".join(c.upper() if f else c for c, f in zip(word, flips, strict=False))
    assert parse_money(sign + spelled) is None


@FAST
@given(raw=TEXT)
def test_money_is_finite_or_none(raw: str) -> None:
    parsed = parse_money(raw)
    assert parsed is None or parsed.is_finite()


# ---------------------------------------------------------------------------------------------------------
# Booleans

TRUE = ["1", "true", "t", "yes", "y", "on", "да", "д", "оплачен", "оплачено", "paid"]
FALSE = ["0", "false", "f", "no", "n", "off", "нет", "н", "не оплачен", "не оплачено", "unpaid"]


def _spell(word: str, flips: list[bool], pad: str) -> str:
    return pad + "".join(c.upper() if f else c for c, f in zip(word, flips * len(word), strict=False)) + pad


@FAST
@given(
    value=st.booleans(),
    data=st.data(),
    flips=st.lists(st.booleans(), min_size=1, max_size=12),
    pad=st.sampled_from(["", " ", "\t", "\u00a0"]),
)
def test_parse_bool_of_every_spelling_in_any_case(
    value: bool, data: st.DataObject, flips: list[bool], pad: str
) -> None:
    word = data.draw(st.sampled_from(TRUE if value else FALSE))
    assert parse_bool(_spell(word, flips, pad)) is value


@FAST
@given(raw=TEXT, event=st.sampled_from(["client-created", "visit-paid"]))
def test_a_bool_is_true_false_or_reported_invalid(raw: str, event: str) -> None:
    key = "client_deleted" if event == "client-created" else "appointment_paid"
    result = run(event, urlencode({"client_id": "1842", "appointment_id": "5", key: raw}))
    assert isinstance(result, Normalized)
    data = result.event.data
    value = data.client.deleted if key == "client_deleted" and data.client else None
    if key == "appointment_paid" and data.appointment:
        value = data.appointment.paid
    text = data_of(key, raw)
    expected = parse_bool(text) if text else None
    assert value is expected
    if sent_something(key, raw) and expected is None:
        assert (key, "invalid") in result.missing


# ---------------------------------------------------------------------------------------------------------
# Appointment start

_ZONES = st.sampled_from(
    [
        MSK,
        ZoneInfo("Asia/Almaty"),
        ZoneInfo("Europe/Kaliningrad"),
        ZoneInfo("Asia/Vladivostok"),
        ZoneInfo("America/New_York"),
    ]
)
_TIMES = st.times().map(lambda t: t.replace(microsecond=0))


def _date_spelling(d: date, style: str) -> str:
    return {"iso": d.isoformat(), "dots": d.strftime("%d.%m.%Y"), "slashes": d.strftime("%d/%m/%Y")}[style]


def _time_spelling(t: time, seconds: bool) -> str:
    return t.strftime("%H:%M:%S" if seconds else "%H:%M")


@THOROUGH
@given(
    zone=_ZONES,
    day=st.dates(min_value=date(1950, 1, 1), max_value=date(2100, 12, 31)),
    style=st.sampled_from(["iso", "dots", "slashes"]),
    in_date=st.none() | _TIMES,
    sep=st.sampled_from([" ", "T"]),
    seconds=st.booleans(),
    offset_minutes=st.none() | st.integers(-12 * 60, 14 * 60).map(lambda m: m - m % 15),
    given_time=st.none() | _TIMES,
)
def test_start_is_aware_in_the_source_zone(
    zone: ZoneInfo,
    day: date,
    style: str,
    in_date: time | None,
    sep: str,
    seconds: bool,
    offset_minutes: int | None,
    given_time: time | None,
) -> None:
    raw_date = _date_spelling(day, style)
    if in_date is not None:
        if not seconds:
            in_date = in_date.replace(second=0)
        raw_date += sep + _time_spelling(in_date, seconds)
        if offset_minutes is not None:
            sign, m = ("+" if offset_minutes >= 0 else "-"), abs(offset_minutes)
            raw_date += f"{sign}{m // 60:02d}:{m % 60:02d}"
    params = {"client_id": "1842", "appointment_date": raw_date}
    if given_time is not None:
        params["appointment.time"] = _time_spelling(given_time, True)
    result = run("appointment-created", urlencode(params), zone=zone)
    assert isinstance(result, Normalized)
    assert result.missing == []
    appt = result.event.data.appointment
    assert appt is not None
    start = appt.start
    assert start is not None
    assert start.tzinfo is zone
    assert start.utcoffset() is not None
    if in_date is not None and offset_minutes is not None:
        written = datetime.combine(day, in_date, tzinfo=timezone(timedelta(minutes=offset_minutes)))
        local = written.astimezone(zone)
        assert start.date() == local.date()
        if given_time is None:
            assert start == written
    else:
        assert start.date() == day
    # appointment_time wins over a time inside the date; with neither the start is midnight.
    expected_time = given_time or (in_date if offset_minutes is None else None)
    if expected_time is not None:
        assert start.time() == expected_time


# ---------------------------------------------------------------------------------------------------------
# request_params and Params

_PAIRS = st.lists(st.tuples(TEXT, TEXT), max_size=8)


@FAST
@given(pairs=_PAIRS)
def test_request_params_of_a_urlencoded_query_is_the_pairs_that_built_it(
    pairs: list[tuple[str, str]],
) -> None:
    assert request_params(urlencode(pairs), None, b"") == pairs


@FAST
@given(
    query=_PAIRS,
    form=_PAIRS,
    ctype=st.sampled_from(["application/x-www-form-urlencoded", "text/plain", None]),
)
def test_request_params_of_query_and_form_is_both_in_order(
    query: list[tuple[str, str]], form: list[tuple[str, str]], ctype: str | None
) -> None:
    body = urlencode(form).encode()
    assume(ctype is not None or not body.lstrip().startswith(b"{"))
    expected = query + form if body.strip() else query
    assert request_params(urlencode(query), ctype, body) == expected


@FAST
@given(query=_PAIRS, obj=st.dictionaries(TEXT, TEXT, max_size=8))
def test_request_params_of_query_and_json_object_is_both_in_order(
    query: list[tuple[str, str]], obj: dict[str, str]
) -> None:
    body = json.dumps(obj).encode()
    assert request_params(urlencode(query), "application/json", body) == query + list(obj.items())


def _reference_params(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """What Params.of must give, written the slow obvious way."""
    values: dict[str, str] = {}
    missing: dict[str, str] = {}
    keys = list(dict.fromkeys(canonical_key(k) for k, _ in pairs if canonical_key(k)))
    for key in keys:
        mine = [v for k, v in pairs if canonical_key(k) == key]
        real = [d for v in mine if (d := data_of(key, v))]
        if real:
            values[key] = real[0]
            continue
        first = clean_value(key, mine[0])
        if first is None:
            missing[key] = "invalid"
        elif is_placeholder(first):
            missing[key] = "placeholder"
        else:
            missing[key] = "invalid" if first else "empty"
    return values, missing


@THOROUGH
@given(
    pairs=st.lists(
        st.tuples(
            st.sampled_from(["client_id", "Client_ID", "client.id", " client-id ", "status", "promo", ""]),
            st.one_of(st.sampled_from(["", " ", "1842", " 7 ", "x"]), PLACEHOLDERS, TEXT),
        ),
        max_size=10,
    )
)
def test_params_first_real_value_of_a_repeated_key_wins(pairs: list[tuple[str, str]]) -> None:
    p = Params.of(pairs)
    assert (p.values, p.missing) == _reference_params(pairs)


@FAST
@given(ids=st.lists(st.from_regex(r"[0-9]{1,6}", fullmatch=True), min_size=2, max_size=4))
def test_the_first_client_id_is_the_key(ids: list[str]) -> None:
    result = run("client-created", urlencode([("client_id", i) for i in ids]))
    assert isinstance(result, Normalized)
    assert result.key == f"salon:{ids[0]}"
    assert result.event.data.client is not None
    assert result.event.data.client.id == ids[0]


# ---------------------------------------------------------------------------------------------------------
# Names

_WORDS = st.sampled_from(
    [
        "Иванова",
        "Анна",
        "Сергеевна",
        "Петрович",
        "Ильинична",
        "Бабич",
        "Мария",
        "Smith",
        "Анна-Мария",
        "О'Нил",
    ]
)
_MAYBE = st.none() | _WORDS


@THOROUGH
@given(
    name=st.none() | st.lists(_WORDS, min_size=1, max_size=4).map(" ".join) | TEXT,
    first=_MAYBE,
    last=_MAYBE,
    patronymic=_MAYBE,
)
def test_names_never_contradict_the_given_parts(
    name: str | None, first: str | None, last: str | None, patronymic: str | None
) -> None:
    sent = {
        "client_name": name,
        "client_first_name": first,
        "client_second_name": last,
        "client_patron_name": patronymic,
    }
    result = run("client-created", urlencode({"client_id": "1842", **{k: v for k, v in sent.items() if v}}))
    assert isinstance(result, Normalized)
    c = result.event.data.client
    assert c is not None
    name_value = data_of("client_name", name) if name else None
    for sent_part, got in ((first, c.first_name), (last, c.last_name), (patronymic, c.patronymic)):
        if sent_part:
            assert got == sent_part
        elif got is not None:
            # A part that was not sent can only come from the full name, word for word.
            assert name_value is not None
            assert got in name_value.split()
    if name_value is not None:
        assert c.full_name == name_value
    else:
        assert c.full_name == (" ".join(w for w in (last, first, patronymic) if w) or None)


@FAST
@given(words=st.lists(_WORDS, min_size=1, max_size=4))
def test_split_name_only_reorders_words(words: list[str]) -> None:
    parts = split_name(" ".join(words))
    if parts is not None:
        assert sorted(p for p in parts if p) == sorted(words)
        assert len(words) in (1, 3)


# ---------------------------------------------------------------------------------------------------------
# Email: same verdict as the regex it replaced, without its quadratic backtracking

_OLD_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")


@FAST
@given(email=st.text(alphabet="ab.@ \t\u00a0", max_size=12) | TEXT)
def test_email_is_kept_exactly_when_it_looks_like_one(email: str) -> None:
    result = run("client-created", urlencode({"client_id": "1842", "client_email": email}))
    assert isinstance(result, Normalized)
    value = email.strip()
    assume(value and not is_placeholder(value))
    kept = result.event.data.client is not None and result.event.data.client.email == value
    assert kept == bool(_OLD_EMAIL.fullmatch(value))
