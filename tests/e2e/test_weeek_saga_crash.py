"""The weeek process dies inside the booking saga (deal, contact, link), is restarted, and finishes it once.

`relay weeek` runs as a subprocess role with a step failpoint (``weeek.step.{step}.sent|kept``, see
services/common/delivery/steps.py); one appointment-created event goes to Kafka; the process exits at the
failpoint; restarted without it, it resumes the saga: one contact, one deal, linked once, delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.common.embedded import EmbeddedBroker
from services.common.events import Appointment, Client, CloudEvent, EventData, EventName, source_uri
from services.common.failpoints import EXIT_CODE
from services.common.kafka import EVENTS
from services.common.ledger import DeliveryStatus, Ledger, idempotency_key, upgrade
from services.sandbox.weeek import SEED_FUNNEL_NAME, WeeekSandbox, create_weeek_app, status_id
from tests.support import Roles, committed, eventually, publish_events, role_env, serve_app, write_config

TOKEN = "weeek-e2e-token-0123456789abcdef"
EVENT_ID = "evt-weeek-booking"
NEW = status_id(SEED_FUNNEL_NAME, "Новая заявка")


@dataclass
class Weeek:
    sandbox: WeeekSandbox
    ledger: Ledger
    db_url: str
    config: Path


@pytest.fixture
async def weeek(tmp_path: Path) -> AsyncIterator[Weeek]:
    sandbox = WeeekSandbox()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    ledger = Ledger.from_url(db_url)
    await upgrade(ledger.engine)
    try:
        async with serve_app(create_weeek_app({TOKEN}, sandbox)) as url:
            yield Weeek(sandbox, ledger, db_url, write_config(tmp_path / "relay.yaml", urls={"weeek": url}))
    finally:
        await ledger.close()


def appointment_created() -> CloudEvent:
    now = datetime.now(UTC)
    appt = Appointment(
        id="91017",
        start=datetime(2024, 3, 20, 14, 30, tzinfo=ZoneInfo("Europe/Moscow")),
        services=["Стрижка женская"],
        total_cost=Decimal("2500.00"),
    )
    who = Client(id="6439302", full_name="Смирнова Ольга Петровна", phone="+79031112233")
    return CloudEvent(
        id=EVENT_ID, source=source_uri("salon"), type=EventName.APPOINTMENT_CREATED.ce_type, time=now,
        relayreceivedat=now, subject=f"client/{who.id}", data=EventData(client=who, appointment=appt),
    )  # fmt: skip


async def _committed_one(bootstrap: str) -> bool:
    return sum((await committed(bootstrap, "relay-weeek", EVENTS)).values()) == 1


# Tansu lets a consumer join its group in session_timeout_ms / 2: a short session keeps each start short.
FAST_JOIN = {"RELAY_KAFKA__SESSION_TIMEOUT_MS": "2000", "RELAY_KAFKA__HEARTBEAT_INTERVAL_MS": "500"}


# What Weeek holds when the process dies there: (contacts, deals, links).
BEFORE_RESTART = {
    "weeek.step.deal.sent": (0, 1, 0),
    "weeek.step.deal.kept": (0, 1, 0),
    "weeek.step.contact.kept": (1, 1, 0),
    "weeek.step.link.sent": (1, 1, 1),
    "weeek.step.link.kept": (1, 1, 1),
}


def _roles(broker: EmbeddedBroker, tmp_path: Path, weeek: Weeek) -> Roles:
    env = role_env(
        weeek.config, broker.bootstrap_servers, weeek.db_url, RELAY_TEST_WEEEK_KEY=TOKEN, **FAST_JOIN
    )
    return Roles(env, tmp_path)


async def _crash_and_restart(roles: Roles, broker: EmbeddedBroker, weeek: Weeek, failpoint: str) -> None:
    """Kill `relay weeek` at ``failpoint`` on one booking, restart it, wait until the event is settled."""
    sandbox = weeek.sandbox
    roles.start("weeek", "weeek", env={"RELAY_FAILPOINTS": f'["{failpoint}"]'})
    await roles.ready("weeek")
    await publish_events(broker.bootstrap_servers, appointment_created())

    assert await roles.wait_exit("weeek") == EXIT_CODE, roles.log("weeek")[-2000:]
    assert f"failpoint {failpoint}: exiting" in roles.log("weeek")
    links = sum(len(d.contacts) for d in sandbox.deals.values())
    assert (len(sandbox.contacts), len(sandbox.deals), links) == BEFORE_RESTART[failpoint]
    # The event's offset (0) was not committed past.
    assert sum((await committed(broker.bootstrap_servers, "relay-weeek", EVENTS)).values()) == 0

    roles.start("weeek", "weeek")
    await roles.ready("weeek")
    await eventually(
        lambda: _committed_one(broker.bootstrap_servers), timeout=30, what="the restarted service to commit"
    )
    await asyncio.sleep(0.3)  # nothing more may arrive


def _creates(sandbox: WeeekSandbox) -> list[str | None]:
    return [
        r.route for r in sandbox.requests if r.method == "POST" and r.route != "/crm/deals/{dealId}/contacts"
    ]


@pytest.mark.parametrize(
    "failpoint",
    [
        "weeek.step.deal.kept",
        "weeek.step.contact.kept",
        "weeek.step.link.kept",
    ],
)
async def test_killed_inside_the_saga_resumes_with_one_contact_and_one_deal(
    broker: EmbeddedBroker, kafka: object, tmp_path: Path, weeek: Weeek, failpoint: str
) -> None:
    sandbox = weeek.sandbox
    roles = _roles(broker, tmp_path, weeek)
    try:
        await _crash_and_restart(roles, broker, weeek, failpoint)
        [contact] = sandbox.contacts.values()
        [deal] = sandbox.deals.values()
        assert (contact.first_name, [p["phone"] for p in contact.phones]) == (
            "Смирнова Ольга Петровна",
            ["+79031112233"],
        )
        assert (deal.status_id, deal.title, deal.amount) == (NEW, "Стрижка женская — 20.03.2024 14:30", 2500)
        assert deal.contacts == [contact.id]
        new_links = [h for h in deal.history if h["action"] == "contact_linked" and not h["alreadyLinked"]]
        assert len(new_links) == 1
        assert sorted(map(str, _creates(sandbox))) == ["/crm/contacts", "/crm/statuses/{statusId}/deals"]
        delivery = await weeek.ledger.get(idempotency_key("weeek", "weeek", "deal", EVENT_ID))
        assert delivery is not None
        assert delivery.status is DeliveryStatus.DELIVERED
        # The entity map knows both, for the visit's and the client's later events.
        visit = await weeek.ledger.entity("salon/weeek", "visit", "91017")
        client = await weeek.ledger.entity("salon/weeek", "client", "6439302")
        assert (visit and visit.target_id, client and client.target_id) == (deal.id, contact.id)
    finally:
        roles.stop_all()


async def test_killed_after_the_deal_was_created_leaves_it_in_doubt_never_sent_twice(
    broker: EmbeddedBroker, kafka: object, tmp_path: Path, weeek: Weeek
) -> None:
    # Weeek made the deal; the process died before keeping its id. Weeek cannot dedupe a create, so the
    # restarted process does not send it again: the delivery is a dead letter for an operator to check.
    sandbox = weeek.sandbox
    roles = _roles(broker, tmp_path, weeek)
    try:
        await _crash_and_restart(roles, broker, weeek, "weeek.step.deal.sent")
        assert len(sandbox.deals) == 1
        assert not sandbox.contacts
        assert _creates(sandbox) == ["/crm/statuses/{statusId}/deals"]
        delivery = await weeek.ledger.get(idempotency_key("weeek", "weeek", "deal", EVENT_ID))
        assert delivery is not None
        assert delivery.status is DeliveryStatus.FAILED
        assert delivery.error is not None
        assert delivery.error.startswith("in doubt: the deal was sent")
    finally:
        roles.stop_all()
