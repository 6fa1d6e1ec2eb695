"""Plarin in the target registry: one ad-conversion postback per paid visit with a click id (seed 003)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from services.common.config import SourceConfig
from services.common.events import CloudEvent
from services.common.outcome import Outcome
from services.common.targets import Deliver, TargetSpec
from services.plarin.client import PlarinClient
from services.plarin.mapping import MappingError, click_id, conversion_key, postback_url
from services.plarin.settings import PlarinConnection

if TYPE_CHECKING:
    from services.common.delivery.steps import Steps


def deliverer(source: SourceConfig, conn: PlarinConnection, transport: httpx.AsyncBaseTransport) -> Deliver:
    """One Plarin cabinet: a postback for a conversion not yet sent, when the event has a click id."""
    api = PlarinClient(transport, conn.timeout_s)

    async def deliver(action: str, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome:
        click = click_id(event, conn.click_id_params)
        if click is None:
            return Outcome.skip("no_click_id", "the event carries no ad click id: not an ad conversion")
        key = conversion_key(event)
        try:
            url = postback_url(event, conn, click)
        except MappingError as e:
            return Outcome.permanent(str(e), hint=e.hint)
        known = await steps.known("conversion", key)
        # A postback has no idempotency key Plarin is known to honour: one that may have arrived is not resent.
        doubt = Outcome.in_doubt(
            "the conversion", f"look for click {click} in Plarin; if it is missing, replay: "
            f"relay dlq replay --event-id {event.id}",
        )  # fmt: skip
        if known is not None:
            return doubt if known.pending else Outcome.skip("conversion_already_sent", "already sent")
        await steps.claim("conversion", key)
        out = await api.postback(url, idempotency_key=idempotency_key)
        if out.ok:
            await steps.remember("conversion", key, click)
        elif out.maybe_sent:
            return doubt
        else:
            await steps.release("conversion", key)
        return out

    return deliver


TARGET = TargetSpec(
    name="plarin",
    title="Plarin",
    connection=PlarinConnection,
    deliverer=deliverer,
    port=8085,
    sandbox_port=8094,
    sandbox_secret=("--token-file", "plarin-token"),
    url_key="postback_url",
    demo=lambda url, key: {
        "target": "plarin",
        "postback_url": f"{url}/postback?token={key}&click_id={{click_id}}&event={{event}}&value={{value}}"
        "&currency={currency}&event_id={event_id}&ts={ts}",
        "events": {"visit-paid": "conversion"},
    },
)
