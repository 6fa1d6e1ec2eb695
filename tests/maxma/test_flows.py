"""The Maxma deliverer's flows against the sandbox Maxma over HTTP, with a real ledger (steps, entity map).

Each test drives ``services.maxma.plugin.deliverer`` as the runtime does (one call per attempt, the same
idempotency key on a retry) and checks what Maxma holds afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from services.common.config import SourceConfig
from services.common.delivery.steps import Steps
from services.common.events import Appointment, Client, CloudEvent, EventData, EventName, Invoice, source_uri
from services.common.httpclient import make_transport
from services.common.ledger import Ledger, upgrade
from services.common.outcome import Outcome, OutcomeKind
from services.common.targets import Deliver
from services.maxma.plugin import deliverer
from services.maxma.settings import MaxmaConnection
from services.sandbox.maxma import MaxmaSandbox, create_maxma_app
from tests.support import serve_app

KEY = "flow-processing-key-0123456789"
SOURCE = SourceConfig(name="salon", token="salon-token-0123456789abcdef")
PHONE = "+79031112233"


@dataclass
class Flow:
    sandbox: MaxmaSandbox
    ledger: Ledger
    deliver: Deliver
    conn: MaxmaConnection

    async def run(self, action: str, event: CloudEvent, key: str | None = None) -> Outcome:
        key = key or f"maxma:{self.conn.name}:{action}:{event.id}"
        out = await self.deliver(action, event, key, Steps(self.ledger, key, f"salon/{self.conn.name}"))
        await self.ledger.flush()  # as the runtime's record of the delivery would, right after
        return out

    def paths(self) -> list[str]:
        return [r.path for r in self.sandbox.requests]

    def order(self, order_id: str) -> dict[str, Any]:
        return self.sandbox.orders[order_id].to_dict()


@contextlib.asynccontextmanager
async def flow(tmp_path: Path, **conn: Any) -> AsyncIterator[Flow]:
    sandbox = MaxmaSandbox()
    ledger = Ledger.from_url(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    await upgrade(ledger.engine)
    transport = make_transport(10)
    async with serve_app(create_maxma_app({KEY}, sandbox)) as url:
        model = MaxmaConnection.model_validate(
            {"target": "maxma", "name": "maxma", "base_url": url, "processing_key": KEY,
             "shop_code": "main", "shop_name": "Салон на Тверской",
             "events": {"client-created": "new-client", "visit-paid": "set-order", "invoice-created": "set-order",
                        "appointment-changed": "cancel-order"}, **conn}
        )  # fmt: skip
        try:
            yield Flow(sandbox, ledger, deliverer(SOURCE, model, transport), model)
        finally:
            await transport.aclose()
            await ledger.close()


def event(
    name: EventName,
    event_id: str,
    *,
    client: Client | None = None,
    appt: Appointment | None = None,
    invoice: Invoice | None = None,
) -> CloudEvent:
    now = datetime.now(UTC)
    return CloudEvent(
        id=event_id, source=source_uri("salon"), type=name.ce_type, time=now, relayreceivedat=now,
        data=EventData(client=client, appointment=appt, invoice=invoice),
    )  # fmt: skip


def new_client(event_id: str = "c1", **fields: Any) -> CloudEvent:
    client = Client(id="1842", full_name="Смирнова Ольга", phone=PHONE, **fields)
    return event(EventName.CLIENT_CREATED, event_id, client=client)


def paid(event_id: str = "v1", visit: str = "55017", amount: str | None = "2500.00") -> CloudEvent:
    appt = Appointment(id=visit, total_cost=Decimal(amount) if amount else None, services=["Стрижка"])
    return event(EventName.VISIT_PAID, event_id, client=Client(id="1842", phone=PHONE), appt=appt)


def cancelled(event_id: str = "x1", visit: str = "55017", status: str = "cancelled") -> CloudEvent:
    appt = Appointment(id=visit, status=status)
    return event(EventName.APPOINTMENT_CHANGED, event_id, client=Client(id="1842", phone=PHONE), appt=appt)


# -- clients -----------------------------------------------------------------------------------------


async def test_an_existing_client_with_the_same_data_is_not_updated(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        assert (await f.run("new-client", new_client("c1"))).ok
        again = await f.run("new-client", new_client("c2"))  # a second event for the same client
        assert again.ok
        assert again.vendor_code in ("24", "30")
        assert f.paths() == ["/new-client", "/new-client"]  # no update-client


async def test_an_existing_client_with_new_data_is_updated(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        assert (await f.run("new-client", new_client("c1"))).ok
        out = await f.run("new-client", new_client("c2", email="olga@example.ru"))
        assert out.ok
        assert "updated" in out.reason
        assert f.paths() == ["/new-client", "/new-client", "/update-client"]
        (client,) = f.sandbox.clients.values()
        assert client.email == "olga@example.ru"
        # The map now holds the new data: a third identical event updates nothing.
        assert (await f.run("new-client", new_client("c3", email="olga@example.ru"))).ok
        assert f.paths()[-1] == "/new-client"


async def test_a_client_created_elsewhere_is_updated_once(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        f.sandbox.run_operation("/new-client", {"client": {"phoneNumber": PHONE, "name": "Ольга"}})
        assert (await f.run("new-client", new_client("c1"))).ok
        assert f.paths() == ["/new-client", "/update-client"]
        (client,) = f.sandbox.clients.values()
        assert client.full_name == "Смирнова Ольга"
        assert client.external_id is None  # found by phone: its identity is not rewritten


# -- orders ------------------------------------------------------------------------------------------


async def test_a_paid_visit_is_set_and_confirmed_once(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        await f.run("new-client", new_client())
        out = await f.run("set-order", paid())
        assert out.ok, out
        assert f.paths()[1:] == ["/v2/set-order", "/confirm-order"]
        order = f.order("salon:55017")
        assert order["status"] == "confirmed"
        assert order["shop"] == {"code": "main", "name": "Салон на Тверской"}
        # A retry of the same delivery (same key; a crash before it was recorded): set-order is kept as done,
        # the confirm goes again and Maxma answers 32: success, confirmed once.
        again = await f.run("set-order", paid(), key="maxma:maxma:set-order:v1")
        assert again.ok
        assert again.vendor_code == "32"
        assert f.paths()[1:] == ["/v2/set-order", "/confirm-order", "/confirm-order"]
        assert f.order("salon:55017")["confirmations"] == 1
        # Another event of the same visit: Maxma says it is processed (32), which is success.
        again = await f.run("set-order", paid("v2"))
        assert again.ok
        assert again.vendor_code == "32"
        client = next(iter(f.sandbox.clients.values()))
        assert client.pending_bonuses == order["collectedBonuses"] > 0


async def test_a_retry_after_set_order_resumes_at_the_confirm(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        await f.run("new-client", new_client())
        f.sandbox.add_fault({"mode": "http_status", "status": 503, "path": "/confirm-order"})
        first = await f.run("set-order", paid())
        assert first.kind is OutcomeKind.RETRYABLE
        second = await f.run("set-order", paid())
        assert second.ok
        assert f.paths()[1:] == ["/v2/set-order", "/confirm-order", "/confirm-order"]  # set-order once


async def test_an_unknown_client_is_created_then_ordered(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        out = await f.run("set-order", paid())
        assert out.ok, out
        assert f.paths() == ["/v2/set-order", "/new-client", "/v2/set-order", "/confirm-order"]
        assert f.order("salon:55017")["status"] == "confirmed"


async def test_an_order_maxma_lost_is_set_again_before_the_confirm(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        await f.run("new-client", new_client())
        f.sandbox.add_fault({"mode": "error_code", "code": 31, "path": "/confirm-order"})
        out = await f.run("set-order", paid())
        assert out.ok, out
        assert f.paths()[1:] == ["/v2/set-order", "/confirm-order", "/v2/set-order", "/confirm-order"]


async def test_invoice_confirms_when_the_connection_says_so(tmp_path: Path) -> None:
    async with flow(tmp_path, confirm_on="invoice-created") as f:
        await f.run("new-client", new_client())
        inv = event(EventName.INVOICE_CREATED, "i1", client=Client(id="1842", phone=PHONE),
                    appt=Appointment(id="55017"), invoice=Invoice(object_id="55017", amount=Decimal("3000")))  # fmt: skip
        assert (await f.run("set-order", inv)).ok
        assert f.order("salon:55017")["status"] == "confirmed"
        # visit-paid then only sets the same order: already processed, success, no second confirm.
        later = await f.run("set-order", paid())
        assert later.ok
        assert f.paths()[1:] == ["/v2/set-order", "/confirm-order", "/v2/set-order"]


async def test_visit_paid_only_sets_when_invoice_confirms(tmp_path: Path) -> None:
    async with flow(tmp_path, confirm_on="invoice-created") as f:
        await f.run("new-client", new_client())
        out = await f.run("set-order", paid())
        assert out.ok
        assert "invoice-created" in out.reason
        assert f.order("salon:55017")["status"] == "new"


async def test_a_visit_without_an_amount_is_permanent_and_names_the_parameter(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        out = await f.run("set-order", paid(amount=None))
        assert out.kind is OutcomeKind.PERMANENT
        assert out.hint is not None
        assert "appointment_total_cost" in out.hint
        assert f.paths() == []  # never sent


async def test_an_unknown_shop_is_permanent_and_opens_the_circuit(tmp_path: Path) -> None:
    async with flow(tmp_path, shop_code="nowhere") as f:
        await f.run("new-client", new_client())
        out = await f.run("set-order", paid())
        assert out.kind is OutcomeKind.PERMANENT
        assert out.vendor_code == "5"
        assert out.opens_circuit


# -- cancellations -----------------------------------------------------------------------------------


async def test_a_cancelled_visit_cancels_its_confirmed_order(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        await f.run("new-client", new_client())
        await f.run("set-order", paid())
        out = await f.run("cancel-order", cancelled())
        assert out.ok, out
        assert f.order("salon:55017")["status"] == "cancelled"
        # The same cancellation again: the map says cancelled, a counted skip; nothing is sent.
        again = await f.run("cancel-order", cancelled("x2"))
        assert again.skipped == "no_confirmed_order"
        assert f.paths()[-1] == "/cancel-order"
        assert f.paths().count("/cancel-order") == 1


@pytest.mark.parametrize(
    ("events", "skip"),
    [
        ([], "no_confirmed_order"),  # no order for the visit at all
        (["set-only"], "no_confirmed_order"),  # set, not confirmed (confirm_on: invoice-created)
    ],
)
async def test_a_cancellation_without_a_confirmed_order_is_a_counted_skip(
    tmp_path: Path, events: list[str], skip: str
) -> None:
    async with flow(tmp_path, confirm_on="invoice-created") as f:
        await f.run("new-client", new_client())
        if events:
            await f.run("set-order", paid())
        out = await f.run("cancel-order", cancelled())
        assert out.ok
        assert out.skipped == skip
        assert "/cancel-order" not in f.paths()


async def test_a_status_that_does_not_cancel_is_a_counted_skip(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        out = await f.run("cancel-order", cancelled(status="confirmed"))
        assert out.skipped == "not_cancelled"
        assert f.paths() == []


async def test_maxma_already_processed_the_cancellation(tmp_path: Path) -> None:
    async with flow(tmp_path) as f:
        await f.run("new-client", new_client())
        await f.run("set-order", paid())
        f.sandbox.add_fault({"mode": "error_code", "code": 32, "path": "/cancel-order"})
        out = await f.run("cancel-order", cancelled())
        assert out.ok
        assert out.vendor_code == "32"
