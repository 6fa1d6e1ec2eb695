"""CPA.House in the target registry: one affiliate lead per client and offer (seed 001)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from services.common.config import SourceConfig
from services.common.events import CloudEvent
from services.common.outcome import Outcome
from services.common.targets import Deliver, TargetSpec
from services.cpahouse.client import CpaHouseClient
from services.cpahouse.mapping import MappingError, lead_form, lead_key
from services.cpahouse.settings import CpaHouseConnection

if TYPE_CHECKING:
    from services.common.delivery.steps import Steps


def deliverer(source: SourceConfig, conn: CpaHouseConnection, transport: httpx.AsyncBaseTransport) -> Deliver:
    """One CPA.House account: a lead for a client not yet sent to this offer."""
    api = CpaHouseClient(transport, conn.base_url, conn.timeout_s)

    async def deliver(action: str, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome:
        try:
            lead = lead_key(event, conn)
        except MappingError as e:
            return Outcome.permanent(str(e), hint=e.hint)
        known = await steps.known("lead", lead)
        # CPA.House has no idempotency key: a lead that may have arrived is never sent again on our own.
        doubt = Outcome.in_doubt(
            "the lead", f"look for client {lead.split(':', 1)[1]} in CPA.House; if the lead is missing, "
            f"replay: relay dlq replay --event-id {event.id}",
        )  # fmt: skip
        if known is not None:
            return (
                doubt if known.pending else Outcome.skip("lead_already_sent", "this client was already sent")
            )
        try:
            form = lead_form(event, conn)
        except MappingError as e:
            return Outcome.permanent(str(e), hint=e.hint)
        await steps.claim("lead", lead)
        out = await api.send_order(form, idempotency_key=idempotency_key)
        if out.ok:
            await steps.remember("lead", lead, out.target_ref or "sent")
        elif out.maybe_sent:
            return doubt
        else:
            await steps.release("lead", lead)
        return out

    return deliver


TARGET = TargetSpec(
    name="cpahouse",
    title="CPA.House",
    connection=CpaHouseConnection,
    deliverer=deliverer,
    port=8083,
    sandbox_port=8092,
    sandbox_secret=("--key-file", "cpahouse-key"),
    demo=lambda url, key: {
        "target": "cpahouse",
        "base_url": url,
        "api_key": key,
        "webmaster_id": "1001",
        "offer_id": "501",
        "source_id": "11",
        "stream_id": "21",
        "user_agent": "Mozilla/5.0 (klientiks-relay demo)",
        "ip_address": "203.0.113.10",
    },
)
