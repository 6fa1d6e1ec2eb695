"""The Weeek deliverer's flows against the sandbox Weeek over HTTP, with a real ledger (steps, entity map).

Each test drives ``services.weeek.plugin.deliverer`` as the runtime does (one call per attempt, the same
idempotency key and a fresh ``Steps`` on a retry) and checks what Weeek holds afterwards.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest

from services.common.config import SourceConfig
from services.common.delivery.steps import Steps
from services.common.events import CloudEvent, EventName, Invoice
from services.common.httpclient import make_transport
from services.common.ledger import Ledger, idempotency_key
from services.common.outcome import Outcome, OutcomeKind
from services.sandbox.weeek import API_PREFIX, Contact, Deal, WeeekSandbox, create_weeek_app
from services.weeek.plugin import deliverer
from services.weeek.settings import WeeekConnection
from tests.support import serve_app
from tests.weeek.support import (
    ADMIN,
    BOOKED,
    CAME,
    MASTER,
    NEW,
    PHONE,
    REFUSED,
    STALE,
    TOKEN,
    VISIT_FIELD,
    appointment,
    booking,
    booking_client,
    changed,
    connection,
    event,
    new_client,
    paid,
)

# The conftest's ledger (migrated with `upgrade`), on SQLite in tmp_path only.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

SOURCE = SourceConfig(name="salon", token="salon-token-0123456789abcdef")
CONTACTS = ("POST", "/crm/contacts")
CONTACT_UPDATE = ("PATCH", "/crm/contacts/{contactId}")
DEAL_CREATE = ("POST", "/crm/statuses/{statusId}/deals")
DEAL_PATCH = ("PATCH", "/crm/deals/{dealId}")
MOVE = ("POST", "/crm/deals/{dealId}/move")
LINK = ("POST", "/crm/deals/{dealId}/contacts")
STATUS_MAP = {"confirmed": BOOKED, "finished": CAME}


class Crash(Exception):
    """The process died at a step's failpoint."""


class CrashingSteps(Steps):
    """Steps that die at ``{step}.sent`` (the call answered, not kept) or ``{step}.kept`` (kept, nothing after)."""

    def __init__(self, *args: Any, crash_at: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at = crash_at

    async def finish(self, step: str, result: str) -> None:
        if self.crash_at == f"{step}.sent":
            raise Crash(self.crash_at)
        await super().finish(step, result)
        if self.crash_at == f"{step}.kept":
            raise Crash(self.crash_at)


@dataclass
class Served:
    sandbox: WeeekSandbox
    url: str


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    sandbox = WeeekSandbox()
    async with serve_app(create_weeek_app({TOKEN}, sandbox)) as url:
        yield Served(sandbox, url)


@pytest.fixture
def sandbox(served: Served) -> Iterator[WeeekSandbox]:
    served.sandbox.reset()
    yield served.sandbox
    served.sandbox.reset()


@pytest.fixture
async def transport() -> AsyncIterator[httpx.AsyncBaseTransport]:
    t = make_transport(10)
    try:
        yield t
    finally:
        await t.aclose()


@dataclass
class Relay:
    """A Weeek connection of source `salon`, delivering as the runtime would."""

    ledger: Ledger
    sandbox: WeeekSandbox
    url: str
    transport: httpx.AsyncBaseTransport

    def conn(self, **over: Any) -> WeeekConnection:
        return connection(base_url=self.url + API_PREFIX, **{"status_map": STATUS_MAP, **over})

    async def deliver(
        self, ev: CloudEvent, conn: WeeekConnection | None = None, *, crash_at: str | None = None
    ) -> Outcome:
        conn = conn or self.conn()
        action = conn.events[ev.event_name]
        key = idempotency_key("weeek", conn.name, action, ev.id)
        where = f"salon/{conn.name}"
        steps = (
            Steps(self.ledger, key, where, target="weeek")
            if crash_at is None
            else CrashingSteps(self.ledger, key, where, target="weeek", crash_at=crash_at)
        )
        return await deliverer(SOURCE, conn, self.transport)(action, ev, key, steps)

    async def entity(self, kind: str, klientiks_id: str, conn: str = "weeek") -> str | None:
        found = await self.ledger.entity(f"salon/{conn}", kind, klientiks_id)
        return found.target_id if found else None

    def calls(self) -> list[tuple[str, str | None]]:
        return [(r.method, r.route) for r in self.sandbox.requests]

    def contact(self) -> Contact:
        [only] = self.sandbox.contacts.values()
        return only

    def deal(self) -> Deal:
        [only] = self.sandbox.deals.values()
        return only


@pytest.fixture
def relay(
    ledger: Ledger, served: Served, sandbox: WeeekSandbox, transport: httpx.AsyncBaseTransport
) -> Relay:
    return Relay(ledger, sandbox, served.url, transport)


def linked_once(deal: Deal, contact: Contact) -> bool:
    links = [h for h in deal.history if h["action"] == "contact_linked" and not h["alreadyLinked"]]
    return deal.contacts == [contact.id] and len(links) == 1


# ---------------------------------------------------------------------------------------------------------
# Contacts


async def test_a_client_event_creates_the_contact_once(relay: Relay) -> None:
    out = await relay.deliver(new_client("c1"))
    assert out.ok, out
    c = relay.contact()
    assert out.target_ref == c.id
    assert (c.first_name, c.last_name, c.middle_name) == ("Анна", "Иванова", "Сергеевна")
    assert [p["phone"] for p in c.phones] == [PHONE]
    assert await relay.entity("client", "1842") == c.id
    # The same delivery again (a retry, a replay) and another event with the same data send nothing.
    assert (await relay.deliver(new_client("c1"))).target_ref == c.id
    again = await relay.deliver(new_client("c2"))
    assert again.ok
    assert again.target_ref == c.id
    assert relay.calls() == [CONTACTS]


async def test_a_contact_is_updated_only_when_its_data_changed(relay: Relay) -> None:
    await relay.deliver(new_client("c1"))
    out = await relay.deliver(new_client("c2", email="anna@yandex.ru", phone="+79160000001"))
    assert out.ok, out
    assert out.reason == "contact updated"
    c = relay.contact()
    assert [e["email"] for e in c.emails] == ["anna@yandex.ru"]
    assert [p["phone"] for p in c.phones] == ["+79160000001"]
    assert c.last_name == "Иванова"
    # The map keeps what was sent: the same data again sends nothing.
    assert (await relay.deliver(new_client("c3", email="anna@yandex.ru", phone="+79160000001"))).ok
    assert relay.calls() == [CONTACTS, CONTACT_UPDATE]
    assert len(relay.sandbox.contacts) == 1


async def test_each_connection_has_its_own_contact(relay: Relay) -> None:
    first, second = relay.conn(name="wk-a"), relay.conn(name="wk-b")
    assert (await relay.deliver(new_client(), first)).ok
    assert (await relay.deliver(new_client(), second)).ok
    assert len(relay.sandbox.contacts) == 2
    assert await relay.entity("client", "1842", "wk-a") != await relay.entity("client", "1842", "wk-b")


async def test_a_client_without_a_name_is_permanent_and_never_sent(relay: Relay) -> None:
    out = await relay.deliver(event(EventName.CLIENT_CREATED, who=booking_client(full_name=None)))
    assert out.kind is OutcomeKind.PERMANENT
    assert out.hint is not None
    assert "client_first_name" in out.hint
    assert relay.calls() == []


async def test_a_contact_weeek_refuses_is_permanent_with_its_message(relay: Relay) -> None:
    out = await relay.deliver(new_client(phone="+7916"))
    assert out.kind is OutcomeKind.PERMANENT
    assert out.http_status == 422
    assert "phones.0" in out.reason
    assert await relay.entity("client", "1842") is None


# ---------------------------------------------------------------------------------------------------------
# Bookings


async def test_a_booking_makes_one_deal_linked_to_a_new_contact(relay: Relay) -> None:
    out = await relay.deliver(booking())
    assert out.ok, out
    d, c = relay.deal(), relay.contact()
    assert out.target_ref == d.id
    assert relay.calls() == [DEAL_CREATE, CONTACTS, LINK]
    assert (d.status_id, d.title, d.amount) == (NEW, "Стрижка женская, Окрашивание — 20.03.2024 14:30", 2500)
    assert d.description == "Запись в Klientiks №55017"
    assert c.first_name == "Иванова Анна Сергеевна"
    assert linked_once(d, c)
    assert await relay.entity("visit", "55017") == d.id
    assert await relay.entity("client", "1842") == c.id
    assert await relay.entity("visit-status", "55017") == NEW


async def test_a_booking_links_the_contact_the_map_holds(relay: Relay) -> None:
    # The contact made from a client event with the data a booking carries: nothing to update.
    client_event = event(EventName.CLIENT_CREATED, who=booking_client(), event_id="c1")
    assert (await relay.deliver(client_event)).ok
    assert (await relay.deliver(booking())).ok
    assert relay.calls() == [CONTACTS, DEAL_CREATE, LINK]
    assert linked_once(relay.deal(), relay.contact())


async def test_online_booking_makes_a_deal_too(relay: Relay) -> None:
    ev = event(EventName.ONLINE_BOOKING, who=booking_client(), appt=appointment(), event_id="o1")
    assert (await relay.deliver(ev)).ok
    assert linked_once(relay.deal(), relay.contact())


async def test_a_second_event_of_the_same_visit_makes_no_second_deal(relay: Relay) -> None:
    assert (await relay.deliver(booking("a1"))).ok
    online = event(EventName.ONLINE_BOOKING, who=booking_client(), appt=appointment(), event_id="o1")
    again = await relay.deliver(online)
    assert again.ok
    assert again.target_ref == relay.deal().id
    # A retry of the first delivery finds every step done.
    assert (await relay.deliver(booking("a1"))).target_ref == relay.deal().id
    assert relay.calls() == [DEAL_CREATE, CONTACTS, LINK]
    assert len(relay.sandbox.deals) == 1


async def test_a_booking_without_a_client_is_a_deal_without_a_contact(relay: Relay) -> None:
    out = await relay.deliver(event(EventName.APPOINTMENT_CREATED, appt=appointment()))
    assert out.ok, out
    assert relay.calls() == [DEAL_CREATE]
    assert relay.deal().contacts == []


async def test_a_booking_without_a_visit_is_permanent_and_never_sent(relay: Relay) -> None:
    out = await relay.deliver(
        event(EventName.APPOINTMENT_CREATED, who=booking_client(), appt=appointment(id=None))
    )
    assert out.kind is OutcomeKind.PERMANENT
    assert out.hint is not None
    assert "appointment_id" in out.hint
    assert relay.calls() == []


async def test_assignee_visit_field_and_a_subscription_visit(relay: Relay) -> None:
    conn = relay.conn(
        users={"17": MASTER, "3": ADMIN}, visit_id_field=VISIT_FIELD, subscription_counts_zero=True
    )
    out = await relay.deliver(booking(executor_id="17", author_id="3", by_subscription=True), conn)
    assert out.ok, out
    d = relay.deal()
    assert (d.assignees, d.custom_fields, d.amount) == ([MASTER], {VISIT_FIELD: "55017"}, 0)
    by_author = relay.conn(name="by-author", users={"17": MASTER, "3": ADMIN}, assignee_from="author")
    assert (await relay.deliver(booking("a2", id="55018", executor_id="17", author_id="3"), by_author)).ok
    assert relay.sandbox.deals[str(await relay.entity("visit", "55018", "by-author"))].assignees == [ADMIN]


# ---------------------------------------------------------------------------------------------------------
# Changes


async def test_changes_move_patch_and_lose_the_deal(relay: Relay) -> None:
    await relay.deliver(booking())
    relay.sandbox.clear_requests()
    # Confirmed, nothing else changed: the deal moves to the mapped status, nothing is patched.
    assert (await relay.deliver(changed("x1", "confirmed"))).ok
    assert relay.calls() == [MOVE]
    assert relay.deal().status_id == BOOKED
    # New services and price: the title and amount are patched, the deal stays where it is.
    later = {"services": ["Маникюр"], "total_cost": Decimal("1800.00")}
    assert (await relay.deliver(changed("x2", "Confirmed", **later))).ok
    assert relay.calls()[1:] == [DEAL_PATCH]
    assert relay.sandbox.requests[-1].body == {"title": "Маникюр — 20.03.2024 14:30", "amount": 1800}
    # The same change again: nothing to send.
    assert (await relay.deliver(changed("x3", "confirmed", **later))).ok
    assert len(relay.calls()) == 2
    # Finished: moved on.
    assert (await relay.deliver(changed("x4", "finished", **later))).ok
    assert relay.deal().status_id == CAME
    # Cancelled: the deal is lost.
    assert (await relay.deliver(changed("x5", "cancelled", **later))).ok
    assert relay.sandbox.requests[-1].body == {"winStatus": "lost"}
    d = relay.deal()
    assert (d.title, d.amount, d.win_status, d.status_id) == (
        "Маникюр — 20.03.2024 14:30",
        1800,
        "lost",
        CAME,
    )
    assert relay.calls() == [MOVE, DEAL_PATCH, MOVE, DEAL_PATCH]
    assert len(relay.sandbox.deals) == 1


@pytest.mark.parametrize("status", ["cancelled", "cancelled_by_sms", "missed", " MISSED "])
async def test_each_cancelling_status_loses_the_deal(relay: Relay, status: str) -> None:
    await relay.deliver(booking())
    assert (await relay.deliver(changed("x1", status))).ok
    assert relay.deal().win_status == "lost"
    # The same cancellation again sends nothing.
    before = len(relay.calls())
    assert (await relay.deliver(changed("x2", status))).ok
    assert len(relay.calls()) == before


async def test_an_unmapped_status_with_the_same_data_sends_nothing(relay: Relay) -> None:
    await relay.deliver(booking())
    out = await relay.deliver(changed("x1", "arrived"))
    assert out.ok
    assert out.target_ref == relay.deal().id
    assert relay.calls() == [DEAL_CREATE, CONTACTS, LINK]


async def test_a_change_for_a_visit_without_a_deal_creates_it_first(relay: Relay) -> None:
    out = await relay.deliver(changed("x1", "confirmed"))
    assert out.ok, out
    # Created straight in the mapped status and linked: nothing left to move or patch.
    assert relay.calls() == [DEAL_CREATE, CONTACTS, LINK]
    d = relay.deal()
    assert d.status_id == BOOKED
    assert linked_once(d, relay.contact())
    assert await relay.entity("visit-status", "55017") == BOOKED


async def test_a_cancellation_for_a_visit_without_a_deal_creates_and_loses_it(relay: Relay) -> None:
    assert (await relay.deliver(changed("x1", "cancelled"))).ok
    assert relay.calls() == [DEAL_CREATE, CONTACTS, LINK, DEAL_PATCH]
    d = relay.deal()
    assert (d.status_id, d.win_status) == (NEW, "lost")


async def test_a_lost_status_that_is_mapped_moves_an_existing_deal_too(relay: Relay) -> None:
    conn = relay.conn(status_map={**STATUS_MAP, "cancelled": REFUSED})
    await relay.deliver(booking(), conn)
    assert (await relay.deliver(changed("x1", "cancelled"), conn)).ok
    d = relay.deal()
    assert (d.win_status, d.status_id) == ("lost", REFUSED)


# ---------------------------------------------------------------------------------------------------------
# Paid


async def test_a_paid_visit_wins_its_deal_with_the_paid_amount(relay: Relay) -> None:
    await relay.deliver(booking())
    relay.sandbox.clear_requests()
    out = await relay.deliver(paid("p1", total_cost=Decimal("3100.50")))
    assert out.ok, out
    assert out.target_ref == relay.deal().id
    assert relay.calls() == [DEAL_PATCH]
    assert relay.sandbox.requests[0].body == {"winStatus": "won", "amount": 3100.5}
    d = relay.deal()
    assert (d.win_status, d.amount) == ("won", 3100.5)
    # Paid again (another event of the same visit): nothing to send.
    assert (await relay.deliver(paid("p2", total_cost=Decimal("3100.50")))).ok
    assert len(relay.calls()) == 1


async def test_a_paid_visit_with_the_booked_amount_sends_only_won(relay: Relay) -> None:
    await relay.deliver(booking())
    assert (await relay.deliver(paid())).ok
    assert relay.sandbox.requests[-1].body == {"winStatus": "won"}


async def test_a_paid_visit_without_a_deal_creates_links_and_wins_it(relay: Relay) -> None:
    assert (await relay.deliver(paid())).ok
    assert relay.calls() == [DEAL_CREATE, CONTACTS, LINK, DEAL_PATCH]
    d = relay.deal()
    assert (d.win_status, d.amount, d.status_id) == ("won", 2500, NEW)
    assert linked_once(d, relay.contact())


async def test_an_invoice_wins_the_deal_with_its_paid_sum(relay: Relay) -> None:
    conn = relay.conn(events={"appointment-created": "deal", "invoice-created": "deal-paid"})
    await relay.deliver(booking(), conn)
    inv = Invoice(object_id="55017", amount=Decimal("3000"), paid_sum=Decimal("1500"))
    ev = event(EventName.INVOICE_CREATED, who=booking_client(), invoice=inv, event_id="i1")
    assert (await relay.deliver(ev, conn)).ok
    assert (relay.deal().win_status, relay.deal().amount) == ("won", 1500)


async def test_a_subscription_visit_is_won_at_zero(relay: Relay) -> None:
    conn = relay.conn(subscription_counts_zero=True)
    await relay.deliver(booking(), conn)
    assert (await relay.deliver(paid(by_subscription=True), conn)).ok
    assert (relay.deal().win_status, relay.deal().amount) == ("won", 0)


# ---------------------------------------------------------------------------------------------------------
# Faults and retries: the saga resumes at the failed step


@pytest.mark.parametrize("route", [DEAL_CREATE, CONTACTS, LINK], ids=["deal", "contact", "link"])
async def test_a_fault_after_each_step_resumes_at_it(relay: Relay, route: tuple[str, str]) -> None:
    method, template = route
    relay.sandbox.add_fault({"mode": "http_status", "status": 503, "method": method, "route": template})
    first = await relay.deliver(booking())
    assert first.kind is OutcomeKind.RETRYABLE
    assert first.http_status == 503
    second = await relay.deliver(booking())  # the same key: the runtime's retry
    assert second.ok, second
    d, c = relay.deal(), relay.contact()
    assert linked_once(d, c)
    calls = relay.calls()
    assert calls.count(route) == 2  # the failed step, and its retry
    assert len(calls) == 4
    assert [x for x in calls if x != route] == [s for s in [DEAL_CREATE, CONTACTS, LINK] if s != route]


async def test_429_is_retryable_with_retry_after(relay: Relay) -> None:
    relay.sandbox.add_fault({"mode": "http_status", "status": 429, "retry_after": 9, "route": DEAL_CREATE[1]})
    out = await relay.deliver(booking())
    assert (out.kind, out.retry_after, out.throttle) == (OutcomeKind.RETRYABLE, 9.0, True)
    assert not relay.sandbox.deals


@pytest.mark.parametrize("crash_at", ["deal.kept", "contact.kept", "link.kept", "link.sent"])
async def test_a_crash_at_a_step_resumes_without_a_second_contact_or_deal(
    relay: Relay, crash_at: str
) -> None:
    with pytest.raises(Crash):
        await relay.deliver(booking(), crash_at=crash_at)
    out = await relay.deliver(booking())
    assert out.ok, out
    assert linked_once(relay.deal(), relay.contact())


async def test_after_a_crash_at_deal_kept_a_later_event_finds_the_deal(relay: Relay) -> None:
    with pytest.raises(Crash):
        await relay.deliver(booking(), crash_at="deal.kept")
    assert (await relay.deliver(booking())).ok
    assert await relay.entity("visit", "55017") == relay.deal().id
    assert (await relay.deliver(paid())).ok  # a later event of the same visit
    assert len(relay.sandbox.deals) == 1
    assert relay.deal().win_status == "won"


async def test_after_a_crash_at_contact_kept_a_later_event_finds_the_contact(relay: Relay) -> None:
    with pytest.raises(Crash):
        await relay.deliver(booking(), crash_at="contact.kept")
    assert (await relay.deliver(booking())).ok
    assert await relay.entity("client", "1842") == relay.contact().id
    later = event(EventName.CLIENT_CREATED, who=booking_client(), event_id="c9")  # the same data
    assert (await relay.deliver(later)).ok
    assert len(relay.sandbox.contacts) == 1


async def test_a_crash_after_the_deal_was_created_leaves_it_in_doubt_never_sent_twice(relay: Relay) -> None:
    # Weeek made the deal, the relay died before keeping the answer: it cannot know, so it never resends it.
    ev = booking()
    with pytest.raises(Crash):
        await relay.deliver(ev, crash_at="deal.sent")
    out = await relay.deliver(ev)
    assert out.kind is OutcomeKind.PERMANENT
    assert out.reason.startswith("in doubt: the deal was sent")
    assert out.hint is not None
    assert f"relay dlq replay --event-id {ev.id}" in out.hint
    # A later event of the visit is in doubt as well, not a second deal.
    assert (await relay.deliver(paid())).reason.startswith("in doubt: the deal")
    assert relay.calls() == [DEAL_CREATE]
    found = await relay.ledger.entity("salon/weeek", "visit", "55017")
    assert found is not None
    assert found.pending


async def test_a_crash_after_the_contact_was_created_leaves_it_in_doubt_never_sent_twice(
    relay: Relay,
) -> None:
    ev = booking()
    with pytest.raises(Crash):
        await relay.deliver(ev, crash_at="contact.sent")
    out = await relay.deliver(ev)
    assert out.kind is OutcomeKind.PERMANENT
    assert out.reason.startswith("in doubt: the contact was sent")
    # A later event of the client is in doubt as well, not a second contact.
    assert (await relay.deliver(new_client("c9"))).reason.startswith("in doubt: the contact")
    # The visit's deal was kept: a later event of the visit finds it.
    assert (await relay.deliver(paid())).ok
    assert relay.calls() == [DEAL_CREATE, CONTACTS, DEAL_PATCH]
    assert relay.deal().contacts == []


async def test_a_lost_answer_to_a_create_is_in_doubt_and_an_operators_replay_creates_it(relay: Relay) -> None:
    # The connection drops after the request went out: Weeek may have the deal (here it has not).
    relay.sandbox.add_fault({"mode": "drop", "route": DEAL_CREATE[1]})
    ev = booking()
    first = await relay.deliver(ev)
    assert first.kind is OutcomeKind.PERMANENT
    assert first.reason.startswith("in doubt: the deal was sent")
    assert not relay.sandbox.deals
    again = await relay.deliver(ev)  # the runtime never retries it; if it did, still nothing is sent
    assert again.reason.startswith("in doubt: ")
    assert relay.calls() == [DEAL_CREATE]
    # The operator looked in Weeek, found nothing and replayed the dead letter.
    conn = relay.conn()
    key = idempotency_key("weeek", conn.name, "deal", ev.id)
    steps = Steps(relay.ledger, key, "salon/weeek", target="weeek", replay=True)
    replayed = await deliverer(SOURCE, conn, relay.transport)("deal", ev, key, steps)
    assert replayed.ok, replayed
    assert linked_once(relay.deal(), relay.contact())
    assert await relay.entity("visit", "55017") == relay.deal().id


@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ({"mode": "http_status", "status": 503, "route": DEAL_CREATE[1]}, OutcomeKind.RETRYABLE),
        (
            {"mode": "http_status", "status": 422, "route": DEAL_CREATE[1], "body": {"success": False}},
            OutcomeKind.PERMANENT,
        ),
        ({"mode": "error", "message": "Limit", "route": DEAL_CREATE[1]}, OutcomeKind.PERMANENT),
    ],
    ids=["503", "422", "success-false"],
)
async def test_a_create_weeek_answered_as_failed_is_not_left_claimed(
    relay: Relay, fault: dict[str, Any], kind: OutcomeKind
) -> None:
    relay.sandbox.add_fault(fault)
    assert (await relay.deliver(booking("a1"))).kind is kind
    assert await relay.ledger.entity("salon/weeek", "visit", "55017") is None
    # Another event of the visit may create it.
    assert (await relay.deliver(booking("a2"))).ok
    assert len(relay.sandbox.deals) == 1


# ---------------------------------------------------------------------------------------------------------
# A stale config and a refused token


async def test_a_stale_status_id_is_permanent_with_the_hint(relay: Relay) -> None:
    out = await relay.deliver(booking(), relay.conn(status_id=STALE))
    assert out.kind is OutcomeKind.PERMANENT
    assert out.http_status == 404
    assert not out.opens_circuit
    assert out.hint is not None
    assert "relay weeek statuses" in out.hint
    assert relay.calls() == [DEAL_CREATE]
    assert not relay.sandbox.deals
    assert not relay.sandbox.contacts


async def test_a_stale_status_in_status_map_is_permanent_with_the_hint(relay: Relay) -> None:
    conn = relay.conn(status_map={"confirmed": STALE})
    await relay.deliver(booking(), conn)
    out = await relay.deliver(changed("x1", "confirmed"), conn)
    assert (out.kind, out.http_status) == (OutcomeKind.PERMANENT, 404)
    assert out.hint is not None
    assert "relay weeek statuses" in out.hint


async def test_a_refused_token_opens_the_circuit(relay: Relay) -> None:
    conn = relay.conn(token="revoked-token-0123456789")
    for ev in (new_client(), booking(), changed(), paid()):
        out = await relay.deliver(ev, conn)
        assert (out.kind, out.http_status, out.opens_circuit) == (OutcomeKind.PERMANENT, 401, True)
    assert not relay.sandbox.contacts
    assert not relay.sandbox.deals


# ---------------------------------------------------------------------------------------------------------
# Bugs


async def test_a_booking_does_not_erase_what_the_client_event_gave_the_contact(relay: Relay) -> None:
    assert (await relay.deliver(new_client())).ok
    assert (await relay.deliver(booking())).ok
    c = relay.contact()
    assert [e["email"] for e in c.emails] == ["anna.ivanova@mail.ru"]
    assert (c.first_name, c.last_name, c.middle_name) == ("Анна", "Иванова", "Сергеевна")


async def test_a_known_contact_is_linked_when_the_event_carries_only_the_client_id(relay: Relay) -> None:
    assert (await relay.deliver(new_client())).ok
    ev = event(EventName.VISIT_PAID, who=booking_client(full_name=None, phone=None), appt=appointment())
    out = await relay.deliver(ev)
    assert out.ok, out
    assert linked_once(relay.deal(), relay.contact())
