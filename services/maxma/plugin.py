"""Maxma in the target registry (``services/common/targets.py``): its connection model and deliverer.

The actions (``docs/configuration.md``):

* ``new-client``: create the client; when Maxma says it exists (24, 30), ``update-client`` only if the
  names, email or phone differ from what this connection last sent for it (the entity map).
* ``set-order``: ``v2/set-order`` for the visit (``orderId`` = ``{source}:{appointment id}``), then, on the
  connection's ``confirm_on`` event, ``confirm-order``: two steps, each sent once in effect (``Steps``).
  A client Maxma does not know (3) is created first, once; a confirm Maxma cannot find the order for (31)
  sets it again, once.
* ``cancel-order``: on a cancelling status, cancel the order the map holds as confirmed; else a counted skip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from services.common.config import SourceConfig
from services.common.events import CloudEvent
from services.common.outcome import Outcome
from services.common.targets import Deliver, TargetSpec
from services.maxma import mapping
from services.maxma.client import MaxmaClient, already_done, client_not_found, exists, order_not_found
from services.maxma.mapping import MappingError
from services.maxma.settings import MaxmaConnection

if TYPE_CHECKING:
    from services.common.delivery.steps import Steps

CONFIRMED, CANCELLED, SET = "confirmed", "cancelled", "set"


class _Maxma:
    """One connection's flows."""

    def __init__(self, conn: MaxmaConnection, transport: httpx.AsyncBaseTransport) -> None:
        self.conn = conn
        self.api = MaxmaClient(
            transport, conn.base_url, conn.processing_key.get_secret_value(), conn.timeout_s
        )

    async def deliver(self, action: str, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        try:
            if action == "new-client":
                return await self.new_client(event, key, steps)
            if action == "set-order":
                return await self.order(event, key, steps)
            if action == "cancel-order":
                return await self.cancel(event, key, steps)
        except MappingError as e:
            return Outcome.permanent(str(e), hint=e.hint)
        return Outcome.permanent(f"unknown Maxma action {action!r}")

    async def new_client(self, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        body = mapping.new_client_body(event)
        client = event.data.client
        assert client is not None
        assert client.id
        fingerprint = mapping.client_fingerprint(event)
        out = await self.api.new_client(body, idempotency_key=key)
        if not out.ok:
            return out
        if exists(out):
            known = await steps.entity("client", client.id)
            if known is not None and known.content_hash == fingerprint:
                return Outcome.success("the client exists with the same data", vendor_code=out.vendor_code)
            update = mapping.update_client_body(event, by_external_id=out.vendor_code == "30")
            out = await self.api.update_client(update, idempotency_key=f"{key}/update")
            if not out.ok:
                return out
            out = Outcome.success("the client existed; updated", http_status=out.http_status,
                                  vendor_code=out.vendor_code, target_ref=out.target_ref)  # fmt: skip
        # Unawaited: lost to a crash, it costs one update-client the next time Maxma says the client exists.
        await steps.remember("client", client.id, out.target_ref or client.id, fingerprint, wait=False)
        return out

    async def _set(self, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        body = mapping.set_order_body(event, self.conn.shop_code or "", self.conn.shop_name or "")
        out = await self.api.set_order(body, idempotency_key=f"{key}/set-order")
        if client_not_found(out) and event.data.client is not None and event.data.client.phone:
            # A client from before the integration: create it (once), then the order (once).
            created = await self.new_client(event, f"{key}/new-client", steps)
            if not created.ok:
                return created
            out = await self.api.set_order(body, idempotency_key=f"{key}/set-order")
        return out

    async def order(self, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        visit, order = mapping.visit_id(event), mapping.order_id(event)
        if mapping.order_amount(event) == 0:
            return Outcome.skip("zero_amount", "the visit cost nothing: no bonuses to earn")
        if await steps.result("set-order") is None:
            out = await self._set(event, key, steps)
            if not out.ok:
                return out
            if already_done(out):
                # Processed earlier by another event of the same visit (an invoice, then the payment).
                known = await steps.entity("order", visit)
                if event.event_name is self.conn.confirm_on and (known is None or known.content_hash == SET):
                    await self._remember(steps, event, visit, order, CONFIRMED)
                return out
            # Kept before the confirm is sent; the map learns of the order once it is confirmed (a cancel
            # acts only on a confirmed one), which saves a commit on every paid visit.
            await steps.finish("set-order", order)
        if event.event_name is not self.conn.confirm_on:
            await self._remember(steps, event, visit, order, SET)
            return Outcome.success("order set; it is confirmed by " + self.conn.confirm_on.value)
        body = mapping.confirm_order_body(event)
        out = await self.api.confirm_order(body, idempotency_key=f"{key}/confirm-order")
        if order_not_found(out):
            # Maxma lost the order set in an earlier attempt: set it again, then confirm, once each.
            again = await self._set(event, key, steps)
            if not again.ok:
                return again
            if already_done(again):  # confirmed meanwhile (by another event of the visit)
                await self._remember(steps, event, visit, order, CONFIRMED)
                return again
            out = await self.api.confirm_order(body, idempotency_key=f"{key}/confirm-order")
        if not out.ok:
            return out
        # A confirm sent again (a crash before the delivery was recorded) is answered 32: success.
        await self._remember(steps, event, visit, order, CONFIRMED)
        return out

    async def _remember(self, steps: Steps, event: CloudEvent, visit: str, order: str, state: str) -> None:
        await steps.remember("order", visit, order, state)
        parent = event.data.appointment.parent_id if event.data.appointment else None
        if parent and parent != visit:
            # visit-paid may name the visit's client link and its appointment both; a change names the latter.
            await steps.remember("order", parent, order, state)

    async def cancel(self, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        if not mapping.is_cancellation(event, self.conn.cancel_statuses):
            return Outcome.skip("not_cancelled", "the new status does not cancel the visit")
        visit = mapping.visit_id(event)
        known = await steps.entity("order", visit)
        if known is None or known.content_hash != CONFIRMED:
            state = known.content_hash if known else "none"
            return Outcome.skip("no_confirmed_order", f"no confirmed order for this visit (order: {state})")
        out = await self.api.cancel_order(
            mapping.cancel_order_body(known.target_id, event), idempotency_key=key
        )
        if out.ok:
            await steps.remember("order", visit, known.target_id, CANCELLED)
        return out


def deliverer(source: SourceConfig, conn: MaxmaConnection, transport: httpx.AsyncBaseTransport) -> Deliver:
    """One Maxma account: map the event to the action's requests, send them."""
    return _Maxma(conn, transport).deliver


TARGET = TargetSpec(
    name="maxma",
    title="Maxma",
    connection=MaxmaConnection,
    deliverer=deliverer,
    port=8082,
    sandbox_port=8090,
    sandbox_secret=("--key-file", "maxma-key"),
    demo=lambda url, key: {
        "target": "maxma",
        "base_url": url,
        "processing_key": key,
        "shop_code": "main",
        "shop_name": "Салон (демо)",
        "events": {
            "client-created": "new-client",
            "visit-paid": "set-order",
            "appointment-changed": "cancel-order",
        },
    },
)
