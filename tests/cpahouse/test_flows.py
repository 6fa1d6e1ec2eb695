"""The CPA.House deliverer end to end: the plugin's ``deliver`` with a real ``Steps`` on a migrated SQLite ledger,
sending over the service's pooled transport to the strict sandbox on real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import pytest

from services.common.config import SourceConfig
from services.common.delivery.steps import Steps
from services.common.events import Appointment, Attribution, Client, CloudEvent, EventName
from services.common.httpclient import make_transport
from services.common.ledger import PENDING, Ledger, idempotency_key
from services.common.outcome import Outcome, OutcomeKind
from services.cpahouse.plugin import deliverer
from services.cpahouse.settings import CpaHouseConnection
from services.sandbox.cpahouse import CpaHouseSandbox, create_cpahouse_app
from tests.cpahouse.support import CONN_IP, CONN_UA, KEY, OFFER, WEBMASTER, client, connection, event
from tests.support import serve_app

# The conftest's ledger (migrated with `upgrade`), on SQLite in tmp_path only.
pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)

SOURCE = SourceConfig(name="salon", token="salon-token-0123456789abcdef")
UA = "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 Chrome/124.0 Mobile Safari/537.36"


@dataclass
class Served:
    sandbox: CpaHouseSandbox
    url: str


@pytest.fixture(scope="module")
async def served() -> AsyncIterator[Served]:
    sandbox = CpaHouseSandbox()
    async with serve_app(create_cpahouse_app({KEY: WEBMASTER}, sandbox)) as url:
        yield Served(sandbox, url)


@pytest.fixture
def sandbox(served: Served) -> Iterator[CpaHouseSandbox]:
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
    """One or more CPA.House connections of source `salon`, delivering as the runtime would."""

    ledger: Ledger
    url: str
    transport: httpx.AsyncBaseTransport

    def conn(self, **over: object) -> CpaHouseConnection:
        return connection(base_url=self.url, **over)

    async def deliver(
        self, ev: CloudEvent, conn: CpaHouseConnection | None = None, *, replay: bool = False
    ) -> Outcome:
        conn = conn or self.conn()
        action = conn.events[ev.event_name]
        key = idempotency_key("cpahouse", conn.name, action, ev.id)
        steps = Steps(self.ledger, key, conn.name, target="cpahouse", replay=replay)
        return await deliverer(SOURCE, conn, self.transport)(action, ev, key, steps)

    async def lead(self, conn_name: str, lead_key: str) -> str | None:
        entity = await self.ledger.entity(conn_name, "lead", lead_key)
        return entity.target_id if entity else None


@pytest.fixture
def relay(
    ledger: Ledger, served: Served, sandbox: CpaHouseSandbox, transport: httpx.AsyncBaseTransport
) -> Relay:
    return Relay(ledger, served.url, transport)


# ---------------------------------------------------------------------------------------------------------
# One lead per client and offer


async def test_a_lead_is_sent_once_and_remembered(relay: Relay, sandbox: CpaHouseSandbox) -> None:
    out = await relay.deliver(event(client()))
    assert out.kind is OutcomeKind.SUCCESS
    assert out.skipped is None
    assert out.target_ref == "1"
    [lead] = sandbox.leads
    assert (lead.name, lead.phone, lead.county_code) == ("Иванова Анна Сергеевна", "+79161234567", "RU")
    assert (lead.id_webmaster, lead.id_offer, lead.id_source, lead.id_stream) == (
        WEBMASTER,
        OFFER,
        "11",
        "21",
    )
    assert (lead.user_agent, lead.ip_address, lead.sub_id_1) == (CONN_UA, CONN_IP, "1842")
    assert await relay.lead("cpahouse", f"{OFFER}:1842") == "1"  # the sandbox's lead id, in the entity map


async def test_a_second_event_of_the_same_client_and_offer_is_skipped(
    relay: Relay, sandbox: CpaHouseSandbox
) -> None:
    assert (await relay.deliver(event(client(), event_id="e1"))).ok
    # Another event, another webhook (online booking): the same client for the same offer.
    again = await relay.deliver(
        event(client(phone="+79160000009"), name=EventName.ONLINE_BOOKING, event_id="e2")
    )
    assert again == Outcome.skip("lead_already_sent", again.reason)
    assert again.ok
    assert again.skipped == "lead_already_sent"
    assert again.reason
    assert len(sandbox.leads) == 1
    assert len(sandbox.requests) == 1  # nothing was sent for the second event
    # The same event delivered again (a replay) is skipped as well.
    assert (await relay.deliver(event(client(), event_id="e1"))).skipped == "lead_already_sent"
    assert len(sandbox.requests) == 1


async def test_another_offer_gets_its_own_lead(relay: Relay, sandbox: CpaHouseSandbox) -> None:
    first, second = relay.conn(name="cpa-501"), relay.conn(name="cpa-502", offer_id="502")
    ev = event(client())
    assert (await relay.deliver(ev, first)).target_ref == "1"
    assert (await relay.deliver(ev, second)).target_ref == "2"
    assert [lead.id_offer for lead in sandbox.leads] == ["501", "502"]
    assert (await relay.lead("cpa-501", "501:1842"), await relay.lead("cpa-502", "502:1842")) == ("1", "2")
    # Each connection remembers its own lead.
    assert (await relay.deliver(ev, first)).skipped == "lead_already_sent"
    assert (await relay.deliver(ev, second)).skipped == "lead_already_sent"
    assert len(sandbox.leads) == 2


async def test_another_client_gets_its_own_lead(relay: Relay, sandbox: CpaHouseSandbox) -> None:
    assert (await relay.deliver(event(client(id="1842"), event_id="e1"))).ok
    out = await relay.deliver(event(client(id="1843", phone="+79160000002"), event_id="e2"))
    assert out.skipped is None
    assert [lead.sub_id_1 for lead in sandbox.leads] == ["1842", "1843"]


# ---------------------------------------------------------------------------------------------------------
# The strict sandbox takes whatever the relay sends

# (what, client, attribution): Russian and neighbours' names, +7 and +375 phones, with and without attribution.
EVENTS: list[tuple[str, Client, Attribution | None]] = [
    ("full-name", client(), None),
    ("first-last", client(full_name=None, first_name="Пётр", last_name="Сидоров"), None),
    ("first-only", client(full_name=None, first_name="Анна", last_name=None), None),
    ("hyphen-yo", client(full_name="Ёлкина-Щукина Юлия Эдуардовна"), None),
    ("one-word", client(full_name="Анна", last_name=None, patronymic=None), None),
    ("kz-phone-kazakh-letters", client(phone="+77012345678", full_name="Нұрлан Әбенов"), None),
    ("by-phone", client(phone="+375291234567", full_name="Алесь Лукашэвіч"), None),
    ("landline-punctuation", client(phone="+74951234567", full_name="O'Brien & Co «Сити» №1"), None),
    ("attribution-ua-ip", client(), Attribution(user_agent=UA, ip="198.51.100.7")),
    ("attribution-ipv6", client(phone="+375291234567"), Attribution(ip="2001:db8::7")),
    (
        "utm-only",
        client(full_name="Мария Кузнецова"),
        Attribution(utm={"utm_source": "yandex", "utm_campaign": "весна 2024"}, click_ids={"yclid": "73645"}),
    ),
]


async def test_the_sandbox_accepts_every_lead_the_relay_sends(relay: Relay, sandbox: CpaHouseSandbox) -> None:
    # One ledger for the whole range (a migrated ledger per case would cost more than the cases).
    sub_ids = {"sub_id_1": "{client.id}", "sub_id_2": "{attribution.utm.utm_source}",
               "sub_id_3": "{attribution.utm.utm_campaign}", "sub_id_4": "{appointment.id}"}  # fmt: skip
    conn = relay.conn(sub_ids=sub_ids)
    cases = [(case, name) for case in EVENTS for name in (EventName.CLIENT_CREATED, EventName.ONLINE_BOOKING)]
    for n, ((label, base, attribution), name) in enumerate(cases):
        what = f"{label} / {name}"
        who = base.model_copy(update={"id": str(2000 + n)})  # a new client each time
        appointment = Appointment(id=str(55000 + n)) if name is EventName.ONLINE_BOOKING else None
        sandbox.reset()
        out = await relay.deliver(event(who, name=name, attribution=attribution, appointment=appointment,
                                        event_id=f"e{n}"), conn)  # fmt: skip
        [rec] = sandbox.requests
        assert out.ok, (what, out.reason, rec.fields)
        assert out.skipped is None, what
        assert rec.status_field == "success", what
        [lead] = sandbox.leads
        assert lead.phone == who.phone, what
        assert lead.name == (who.full_name or " ".join(p for p in (who.first_name, who.last_name) if p)), what
        assert lead.user_agent == ((attribution and attribution.user_agent) or CONN_UA), what
        assert lead.ip_address == ((attribution and attribution.ip) or CONN_IP), what
        utm = attribution.utm if attribution else {}
        assert (lead.sub_id_1, lead.sub_id_2, lead.sub_id_3) == (who.id, utm.get("utm_source"),
                                                                 utm.get("utm_campaign")), what  # fmt: skip
        assert lead.sub_id_4 == (appointment.id if appointment else None), what
        assert await relay.lead(conn.name, f"{OFFER}:{who.id}") == "1", what


# ---------------------------------------------------------------------------------------------------------
# Failures


async def test_an_error_msg_is_permanent_and_nothing_is_remembered(
    relay: Relay, sandbox: CpaHouseSandbox
) -> None:
    sandbox.add_fault({"mode": "error_msg", "msg": "Лид отклонён: дубль по телефону"})
    out = await relay.deliver(event(client()))
    assert out.kind is OutcomeKind.PERMANENT
    assert "Лид отклонён: дубль по телефону" in out.reason
    assert out.opens_circuit is False
    assert sandbox.leads == []
    assert await relay.lead("cpahouse", f"{OFFER}:1842") is None


async def test_a_msg_about_the_credentials_opens_the_circuit(relay: Relay, sandbox: CpaHouseSandbox) -> None:
    out = await relay.deliver(event(client()), relay.conn(api_key="cpa-revoked-key-00000000"))
    assert out.kind is OutcomeKind.PERMANENT
    assert out.opens_circuit is True
    assert "api_key" in out.reason
    assert sandbox.leads == []


async def test_a_503_is_retryable_and_the_retry_sends_the_lead(
    relay: Relay, sandbox: CpaHouseSandbox
) -> None:
    sandbox.add_fault({"mode": "http_status", "status": 503})
    ev = event(client())
    out = await relay.deliver(ev)
    assert out.kind is OutcomeKind.RETRYABLE
    assert out.http_status == 503
    assert sandbox.leads == []
    assert await relay.lead("cpahouse", f"{OFFER}:1842") is None  # a retry must not be taken for a sent lead
    retried = await relay.deliver(ev)
    assert retried.ok
    assert retried.skipped is None
    assert len(sandbox.leads) == 1
    assert await relay.lead("cpahouse", f"{OFFER}:1842") == "1"


async def test_a_dropped_connection_leaves_the_lead_in_doubt_never_sent_twice(
    relay: Relay, sandbox: CpaHouseSandbox
) -> None:
    # CPA.House may have made the lead before the connection dropped: a second send could double it.
    sandbox.add_fault({"mode": "drop"})
    ev = event(client())
    out = await relay.deliver(ev)
    assert out.kind is OutcomeKind.PERMANENT
    assert out.reason.startswith("in doubt")
    assert out.hint is not None
    assert f"relay dlq replay --event-id {ev.id}" in out.hint
    assert sandbox.leads == []
    assert await relay.lead("cpahouse", f"{OFFER}:1842") == PENDING  # in doubt for every later event too
    assert (await relay.deliver(ev)).reason.startswith("in doubt")  # the retry sends nothing
    assert len(sandbox.requests) == 1
    # The operator found no lead in CPA.House and replays the dead letter: one lead.
    assert (await relay.deliver(ev, replay=True)).ok
    assert len(sandbox.leads) == 1
    assert await relay.lead("cpahouse", f"{OFFER}:1842") == "1"


@pytest.mark.parametrize(
    ("who", "hint"),
    [
        (client(phone=None), "client_phone"),
        (client(full_name=None, first_name=None, last_name=None), "client_name"),
        (client(id=None), "client_id"),
        (None, "client_id"),
    ],
)
async def test_an_event_without_what_a_lead_needs_is_permanent_and_not_sent(
    relay: Relay, sandbox: CpaHouseSandbox, who: Client | None, hint: str
) -> None:
    out = await relay.deliver(event(who))
    assert out.kind is OutcomeKind.PERMANENT
    assert out.hint is not None
    assert hint in out.hint
    assert sandbox.requests == []


async def test_no_user_agent_anywhere_is_permanent_with_a_hint(
    relay: Relay, sandbox: CpaHouseSandbox
) -> None:
    out = await relay.deliver(event(client()), relay.conn(user_agent=None))
    assert out.kind is OutcomeKind.PERMANENT
    assert out.hint == "set user_agent on the connection"
    assert sandbox.requests == []


async def test_a_known_lead_is_skipped_even_if_the_event_could_not_be_sent(
    relay: Relay, sandbox: CpaHouseSandbox
) -> None:
    # Once the client was sent, a later event lacking a phone is no error: nothing is to be sent.
    assert (await relay.deliver(event(client(), event_id="e1"))).ok
    out = await relay.deliver(event(client(phone=None), event_id="e2"))
    assert out.skipped == "lead_already_sent"
    assert len(sandbox.requests) == 1
