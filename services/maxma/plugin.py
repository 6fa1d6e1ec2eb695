"""Maxma in the target registry (``services/common/targets.py``): its connection model and deliverer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from services.common.config import SourceConfig
from services.common.events import CloudEvent
from services.common.outcome import Outcome
from services.common.targets import Deliver, TargetSpec
from services.maxma.client import MaxmaClient
from services.maxma.mapping import MappingError, new_client_body
from services.maxma.settings import MaxmaConnection

if TYPE_CHECKING:
    from services.common.delivery.steps import Steps


def deliverer(source: SourceConfig, conn: MaxmaConnection, transport: httpx.AsyncBaseTransport) -> Deliver:
    """One Maxma account: map the event to the action's request, send it."""
    client = MaxmaClient(transport, conn.base_url, conn.processing_key.get_secret_value(), conn.timeout_s)

    async def deliver(action: str, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome:
        try:
            body = new_client_body(event)
        except MappingError as e:
            return Outcome.permanent(str(e))
        return await client.call(action, body, idempotency_key=idempotency_key)

    return deliver


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
        "events": {"client-created": "new-client"},
    },
)
