"""Unit tests for services.weeek.mapping: a normalized event to the bodies of Weeek's contact and deal calls.

Each body the mapping makes is also put to the strict sandbox's own validation (``WeeekSandbox.call``).
"""

from __future__ import annotations

import json
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.common.events import Appointment, Client, EventName, Invoice
from services.ingest.parsing import CAPS, SERVICE_CAP, clean_text, is_placeholder
from services.sandbox.weeek import WeeekSandbox
from services.weeek.mapping import (
    TITLE_MAX,
    MappingError,
    assignee,
    change_patch,
    client_id,
    contact_body,
    deal_amount,
    deal_body,
    fingerprint,
    lost,
    moved_to,
    visit_id,
    won_patch,
)
from tests.weeek.support import (
    ADMIN,
    BOOKED,
    CAME,
    EMAIL,
    MASTER,
    MSK,
    NEW,
    PHONE,
    REFUSED,
    VISIT_FIELD,
    accepted,
    appointment,
    booking,
    booking_client,
    client,
    connection,
    event,
    executor,
)

CONTACTS = "/crm/contacts"
DEALS = "/crm/statuses/{statusId}/deals"
DEAL = "/crm/deals/{dealId}"
TITLE = "Стрижка женская, Окрашивание — 20.03.2024 14:30"


def contact_ok(body: dict[str, Any], sandbox: WeeekSandbox | None = None) -> dict[str, Any]:
    return accepted(sandbox or WeeekSandbox(), "POST", CONTACTS, body)["contact"]  # type: ignore[no-any-return]


def deal_ok(body: dict[str, Any], sandbox: WeeekSandbox | None = None) -> dict[str, Any]:
    return accepted(sandbox or WeeekSandbox(), "POST", DEALS, body, statusId=NEW)["deal"]  # type: ignore[no-any-return]


def patch_ok(body: dict[str, Any]) -> dict[str, Any]:
    sandbox = WeeekSandbox()
    deal = deal_ok({"title": "Стрижка"}, sandbox)
    accepted(sandbox, "PATCH", DEAL, body, dealId=deal["id"])
    return sandbox.deals[deal["id"]].to_weeek()


# ---------------------------------------------------------------------------------------------------------
# Ids


def test_client_and_visit_ids() -> None:
    ev = booking()
    assert (client_id(ev), visit_id(ev)) == ("1842", "55017")
    # invoice-created names the visit by the invoice's object.
    inv = event(
        EventName.INVOICE_CREATED, who=client(), invoice=Invoice(object_id="55018", amount=Decimal(10))
    )
    assert visit_id(inv) == "55018"
    both = event(EventName.INVOICE_CREATED, appt=appointment(id="1"), invoice=Invoice(object_id="2"))
    assert visit_id(both) == "1"


@pytest.mark.parametrize("who", [None, Client(phone=PHONE), Client(id="", full_name="Анна")])
def test_no_client_id_is_a_mapping_error_naming_the_parameter(who: Client | None) -> None:
    with pytest.raises(MappingError) as e:
        client_id(event(EventName.CLIENT_CREATED, who=who))
    assert e.value.hint is not None
    assert "client_id" in e.value.hint


@pytest.mark.parametrize(
    ("appt", "invoice"),
    [(None, None), (Appointment(), None), (Appointment(id=""), Invoice(object_id=""))],
)
def test_no_visit_is_a_mapping_error_naming_the_parameter(
    appt: Appointment | None, invoice: Invoice | None
) -> None:
    ev = event(who=client(), appt=appt, invoice=invoice)
    with pytest.raises(MappingError) as e:
        visit_id(ev)
    assert e.value.hint is not None
    assert "appointment_id" in e.value.hint
    with pytest.raises(MappingError):
        deal_body(ev, connection())


# ---------------------------------------------------------------------------------------------------------
# The contact


def test_contact_of_a_client_created_event() -> None:
    body = contact_body(event(EventName.CLIENT_CREATED, who=client()))
    assert body == {
        "firstName": "Анна",
        "lastName": "Иванова",
        "middleName": "Сергеевна",
        "phones": [PHONE],
        "emails": [EMAIL],
    }
    made = contact_ok(body)
    assert (made["firstName"], made["lastName"], made["middleName"]) == ("Анна", "Иванова", "Сергеевна")
    assert [p["phone"] for p in made["phones"]] == [PHONE]
    assert [e["email"] for e in made["emails"]] == [EMAIL]


def test_contact_of_a_client_with_only_a_full_name() -> None:
    # An appointment webhook carries the whole name only: it becomes the first name, nothing is split.
    body = contact_body(booking())
    assert body == {"firstName": "Иванова Анна Сергеевна", "phones": [PHONE]}
    contact_ok(body)
    # The parts of the name are sent only with the first name: a last name alone is not the contact's.
    who = client(first_name=None, patronymic=None, email=None, phone=None)
    assert contact_body(event(who=who)) == {"firstName": "Иванова Анна Сергеевна"}


def test_contact_without_phone_or_email() -> None:
    who = client(last_name=None, patronymic=None, phone=None, email=None)
    assert contact_body(event(who=who)) == {"firstName": "Анна"}
    contact_ok({"firstName": "Анна"})


@pytest.mark.parametrize(
    "who",
    [
        Client(id="1842", phone=PHONE),
        Client(id="1842", last_name="Иванова", phone=PHONE),
        Client(id="1842", full_name="", first_name=""),
    ],
)
def test_a_client_without_a_name_is_a_mapping_error(who: Client) -> None:
    with pytest.raises(MappingError) as e:
        contact_body(event(who=who))
    assert e.value.hint is not None
    assert "client_first_name" in e.value.hint


def test_no_client_and_a_too_long_first_name_are_mapping_errors() -> None:
    with pytest.raises(MappingError):
        contact_body(event(who=None, appt=appointment()))
    with pytest.raises(MappingError):
        contact_body(event(who=client(first_name="А" * 256)))
    assert contact_body(event(who=client(first_name="А" * 255)))["firstName"] == "А" * 255


def test_a_too_long_whole_name_says_it_is_too_long() -> None:
    name = " ".join(["Константинопольская"] * 15)  # 299 characters, within the ingest's cap
    assert len(name) <= CAPS["client_name"]
    with pytest.raises(MappingError) as e:
        contact_body(event(who=booking_client(full_name=name)))
    assert "no name" not in str(e.value)


def test_fingerprint_is_of_the_data_not_its_order() -> None:
    body = contact_body(event(who=client()))
    same = dict(reversed(list(body.items())))
    assert fingerprint(body) == fingerprint(same)
    assert len(fingerprint(body)) == 64
    assert fingerprint(body) != fingerprint({**body, "emails": ["other@mail.ru"]})
    assert fingerprint(body) != fingerprint(contact_body(booking()))


# ---------------------------------------------------------------------------------------------------------
# The deal


def test_deal_of_an_appointment_with_the_defaults() -> None:
    body = deal_body(booking(), connection())
    assert body == {"title": TITLE, "amount": 2500, "description": "Запись в Klientiks №55017"}
    assert isinstance(body["amount"], int)
    assert '"amount": 2500,' in json.dumps(body)  # a JSON number, not a string
    made = deal_ok(body)
    assert (made["title"], made["amount"], made["statusId"]) == (TITLE, 2500, NEW)


def test_the_title_takes_the_start_in_the_sources_time_zone() -> None:
    start = datetime(2024, 12, 31, 23, 5, tzinfo=MSK)
    body = deal_body(booking(start=start, services=["Маникюр"]), connection())
    assert body["title"] == "Маникюр — 31.12.2024 23:05"


@pytest.mark.parametrize(
    "appt",
    [
        {"services": []},  # nothing to name the deal by
        {"start": None},
        {"services": ["Услуга " + "x" * 200, "Ещё " + "y" * 60]},  # over 255 characters
    ],
    ids=["no-services", "no-start", "too-long"],
)
def test_a_title_the_template_cannot_fill_falls_back_to_the_visit(appt: dict[str, Any]) -> None:
    body = deal_body(booking(**appt), connection())
    assert body["title"] == "Запись 55017"
    deal_ok(body)


def test_a_title_at_the_limit_is_kept() -> None:
    name = "x" * (TITLE_MAX - len(" — 20.03.2024 14:30"))
    assert deal_body(booking(services=[name]), connection())["title"] == f"{name} — 20.03.2024 14:30"
    assert deal_body(booking(services=[name + "y"]), connection())["title"] == "Запись 55017"


def test_a_title_template_is_made_one_line() -> None:
    conn = connection(title="Визит\n {appointment.id}\t  {client.full_name} ")
    body = deal_body(booking(), conn)
    assert body["title"] == "Визит 55017 Иванова Анна Сергеевна"
    deal_ok(body)


@pytest.mark.parametrize(
    ("cost", "amount"),
    [
        ("2500.00", 2500),
        ("2500.5", 2500.5),
        ("0.01", 0.01),
        ("0", 0),
        ("999999999999.99", 999999999999.99),
    ],
)
def test_amount_is_a_json_number(cost: str, amount: float) -> None:
    body = deal_body(booking(total_cost=Decimal(cost)), connection())
    assert body["amount"] == amount
    assert type(body["amount"]) is type(amount)
    assert Decimal(json.dumps(body["amount"])) == Decimal(cost)  # the number sent is the price, exactly
    deal_ok(body)


@pytest.mark.parametrize("cost", [None, "-100", "10.005"])
def test_no_amount_when_it_is_not_a_price(cost: str | None) -> None:
    body = deal_body(booking(total_cost=Decimal(cost) if cost else None), connection())
    assert "amount" not in body
    deal_ok(body)


def test_a_subscription_visit_counts_zero_only_when_the_connection_says_so() -> None:
    ev = booking(by_subscription=True)
    assert deal_body(ev, connection(subscription_counts_zero=True))["amount"] == 0
    assert deal_body(ev, connection())["amount"] == 2500
    assert (
        deal_body(booking(by_subscription=False), connection(subscription_counts_zero=True))["amount"] == 2500
    )
    # No price at all: still zero for a subscription visit.
    free = booking(by_subscription=True, total_cost=None)
    assert deal_body(free, connection(subscription_counts_zero=True))["amount"] == 0


def test_invoice_amount_is_the_paid_sum_else_the_amount() -> None:
    conn = connection()
    paid_inv = Invoice(object_id="55017", amount=Decimal("3000"), paid_sum=Decimal("1200.50"))
    ev = event(EventName.INVOICE_CREATED, who=booking_client(), appt=appointment(), invoice=paid_inv)
    assert deal_amount(ev, conn) == Decimal("1200.50")
    unpaid = Invoice(object_id="55017", amount=Decimal("3000"), paid_sum=Decimal(0))
    ev = event(EventName.INVOICE_CREATED, who=booking_client(), appt=appointment(), invoice=unpaid)
    assert deal_amount(ev, conn) == Decimal(3000)
    assert won_patch(ev, conn) == {"winStatus": "won", "amount": 3000}


def test_description() -> None:
    no_description = connection().model_copy(update={"description": None})
    assert "description" not in deal_body(booking(), no_description)
    assert "description" not in deal_body(booking(), connection(description=""))
    assert "description" not in deal_body(booking(), connection(description="{extra.comment}"))
    conn = connection(description="Мастер: {appointment.executor.name}\nКомментарий: {extra.comment}")
    ev = event(
        who=booking_client(),
        appt=appointment(executor=executor("Ирина Мастер")),
        extra={"comment": "перезвонить"},
    )
    body = deal_body(ev, conn)
    assert body["description"] == "Мастер: Ирина Мастер Комментарий: перезвонить"  # one line
    deal_ok(body)


# ---------------------------------------------------------------------------------------------------------
# Assignee


USERS = {"17": MASTER, "Ирина Мастер": MASTER, "3": ADMIN}


@pytest.mark.parametrize(
    ("appt", "conn", "who"),
    [
        ({"executor_id": "17"}, {}, MASTER),
        ({"executor": executor("Ирина Мастер")}, {}, MASTER),  # by name when the id is not mapped
        ({"executor_id": "3", "executor": executor("Ирина Мастер")}, {}, ADMIN),  # the id first
        ({"executor_id": "99", "executor": executor("Ирина Мастер")}, {}, MASTER),
        ({"executor_id": "99", "executor": executor("Кто-то")}, {}, None),  # unmapped: unassigned
        ({}, {}, None),
        ({"author_id": "3", "executor_id": "17"}, {"assignee_from": "author"}, ADMIN),
        ({"executor_id": "17"}, {"assignee_from": "author"}, None),  # the author only
        ({"author_id": "3"}, {"users": {}}, None),
    ],
)
def test_assignee(appt: dict[str, Any], conn: dict[str, Any], who: str | None) -> None:
    c = connection(**{"users": USERS, **conn})
    ev = booking(**appt)
    assert assignee(ev, c) == who
    body = deal_body(ev, c)
    if who is None:
        assert "assignees" not in body
    else:
        assert body["assignees"] == [who]
    assert deal_ok(body)["assignees"] == ([who] if who else [])


def test_no_appointment_no_assignee() -> None:
    assert assignee(event(EventName.CLIENT_CREATED, who=client()), connection(users=USERS)) is None


def test_visit_id_goes_to_the_custom_field() -> None:
    body = deal_body(booking(), connection(visit_id_field=VISIT_FIELD))
    assert body["customFields"] == {VISIT_FIELD: "55017"}
    assert deal_ok(body)["customFields"] == {VISIT_FIELD: "55017"}
    assert "customFields" not in deal_body(booking(), connection())


# ---------------------------------------------------------------------------------------------------------
# Changes, won, lost, moved


def test_change_patch() -> None:
    ev = booking(services=["Маникюр"], total_cost=Decimal("1800.00"))
    patch = change_patch(ev, connection())
    assert patch == {"title": "Маникюр — 20.03.2024 14:30", "amount": 1800}
    assert patch_ok(patch)["amount"] == 1800
    # What cannot be filled is not sent: no title without services, no amount without a price.
    assert change_patch(booking(services=[], total_cost=None), connection()) == {}
    assert change_patch(booking(services=[]), connection()) == {"amount": 2500}
    assert change_patch(booking(services=["x" * 256]), connection()) == {"amount": 2500}
    assert (
        change_patch(booking(by_subscription=True), connection(subscription_counts_zero=True))["amount"] == 0
    )


def test_won_patch() -> None:
    patch = won_patch(booking(total_cost=Decimal("3100.50")), connection())
    assert patch == {"winStatus": "won", "amount": 3100.5}
    assert patch_ok(patch)["winStatus"] == "won"
    assert won_patch(booking(total_cost=None), connection()) == {"winStatus": "won"}
    assert won_patch(booking(by_subscription=True), connection(subscription_counts_zero=True)) == {
        "winStatus": "won",
        "amount": 0,
    }


@pytest.mark.parametrize(
    ("status", "is_lost"),
    [
        ("cancelled", True),
        ("cancelled_by_sms", True),
        ("missed", True),
        (" Cancelled ", True),
        ("MISSED", True),
        ("confirmed", False),
        ("finished", False),
        ("", False),
        (None, False),
    ],
)
def test_lost(status: str | None, is_lost: bool) -> None:
    assert lost(booking(status=status), connection()) is is_lost
    if is_lost:
        patch_ok({"winStatus": "lost"})


def test_lost_by_the_connections_statuses() -> None:
    conn = connection(lost_statuses=["Отменён"])
    assert lost(booking(status="отменён"), conn)
    assert not lost(booking(status="cancelled"), conn)
    assert not lost(event(EventName.APPOINTMENT_CHANGED, who=client()), conn)


def test_moved_to() -> None:
    conn = connection(status_map={"confirmed": BOOKED, "Finished": CAME, "missed": REFUSED})
    assert moved_to(booking(status="confirmed"), conn) == BOOKED
    assert moved_to(booking(status=" FINISHED "), conn) == CAME
    assert moved_to(booking(status="missed"), conn) == REFUSED
    assert moved_to(booking(status="new"), conn) is None
    assert moved_to(booking(status=None), conn) is None
    assert moved_to(event(EventName.APPOINTMENT_CHANGED, who=client()), conn) is None


# ---------------------------------------------------------------------------------------------------------
# Property: a body made of any clean names is one the sandbox accepts


def _clean(raw: str, cap: int) -> str | None:
    """What the ingest would pass on for a parameter: cleaned, not a placeholder, within its cap."""
    text = clean_text(raw)
    if not text or is_placeholder(text) or len(text) > cap:
        return None
    return text


NAME = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40)
PHONES = st.from_regex(r"\+7[0-9]{10}", fullmatch=True)
EMAILS = st.from_regex(r"[a-z][a-z0-9._-]{0,20}@[a-z]{1,10}\.(ru|com|рф)", fullmatch=True)
PRICE = st.decimals(min_value=0, max_value=Decimal("99999999.99"), places=2)
START_TIMES = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(MSK)
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=NAME,
    last=st.none() | NAME,
    middle=st.none() | NAME,
    full=st.none() | NAME,
    phone=st.none() | PHONES,
    email=st.none() | EMAILS,
    services=st.lists(NAME, max_size=4),
    executor_name=st.none() | NAME,
    cost=st.none() | PRICE,
    start=st.none() | START_TIMES,
    subscription=st.none() | st.booleans(),
    author=st.booleans(),
)
def test_bodies_of_clean_names_are_accepted_by_the_sandbox(
    first: str,
    last: str | None,
    middle: str | None,
    full: str | None,
    phone: str | None,
    email: str | None,
    services: list[str],
    executor_name: str | None,
    cost: Decimal | None,
    start: datetime | None,
    subscription: bool | None,
    author: bool,
) -> None:
    first_name = _clean(first, CAPS["client_first_name"])
    assume(first_name is not None)
    names = [s for s in (_clean(s, SERVICE_CAP) for s in services) if s]
    exec_name = _clean(executor_name, CAPS["executor_name"]) if executor_name else None
    who = Client(
        id="1842",
        first_name=first_name,
        last_name=_clean(last, CAPS["client_second_name"]) if last else None,
        patronymic=_clean(middle, CAPS["client_patron_name"]) if middle else None,
        full_name=_clean(full, CAPS["client_name"]) if full else None,
        phone=phone,
        email=email,
    )
    appt = Appointment(
        id="55017",
        start=start,
        services=names,
        total_cost=cost,
        executor=executor(exec_name) if exec_name else None,
        executor_id="17",
        author_id="3",
        by_subscription=subscription,
    )
    conn = connection(
        title="{appointment.services} ({appointment.executor.name}) {appointment.start:%d.%m %H:%M}",
        description="{client.full_name} — {appointment.services}",
        users={"17": MASTER, "3": ADMIN, **({exec_name: ADMIN} if exec_name else {})},
        assignee_from="author" if author else "executor",
        subscription_counts_zero=True,
        visit_id_field=VISIT_FIELD,
    )
    ev = event(EventName.ONLINE_BOOKING, who=who, appt=appt)
    sandbox = WeeekSandbox()
    contact = contact_ok(contact_body(ev), sandbox)
    assert contact["firstName"] == first_name
    deal = deal_ok(deal_body(ev, conn), sandbox)
    for patch in (change_patch(ev, conn), won_patch(ev, conn), {"contacts": [contact["id"]]}):
        if patch:
            accepted(sandbox, "PATCH", DEAL, patch, dealId=deal["id"])
    assert sandbox.deals[deal["id"]].contacts == [contact["id"]]
