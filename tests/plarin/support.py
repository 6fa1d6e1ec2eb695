"""What the Plarin tests share: a connection as a config writes it, and events as the normalizer makes them."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from services.common.events import (
    Appointment,
    Attribution,
    Client,
    CloudEvent,
    EventData,
    EventName,
    Invoice,
    source_uri,
)
from services.plarin.settings import PlarinConnection
from services.sandbox.plarin import parse_query, validate_postback

TOKEN = "plarin-secret-token-0123456789"
BASE = "https://plarin.example/postback"
# Every macro, each in a parameter of its own name.
FULL = (
    BASE + "?click_id={click_id}&event={event}&value={value}&currency={currency}&event_id={event_id}"
    "&client_id={client_id}&ts={ts}"
)
RECEIVED = datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC)
TS = "1710407730"  # RECEIVED in unix seconds
EVENT_ID = "0f8e7d6c5b4a39281706f5e4d3c2b1a0"
YCLID = "7364512098347561234"


def connection(**over: Any) -> PlarinConnection:
    """A connection with every macro in its template; a keyword replaces a key, None removes it."""
    data: dict[str, Any] = {"target": "plarin", "name": "plarin", "postback_url": FULL, **over}
    return PlarinConnection.model_validate({k: v for k, v in data.items() if v is not None})


def event(
    *,
    name: EventName = EventName.VISIT_PAID,
    event_id: str = EVENT_ID,
    client_id: str | None = "1842",
    visit: str | None = "55017",
    total: str | None = "1500",
    click_ids: dict[str, str] | None = None,
    utm: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
    invoice: Invoice | None = None,
    time: datetime = RECEIVED,
) -> CloudEvent:
    """A paid visit (by default) of source `salon` as the normalizer makes it; no click id unless given."""
    appointment = (
        Appointment(id=visit, total_cost=Decimal(total) if total is not None else None)
        if visit is not None or total is not None
        else None
    )
    attribution = Attribution(utm=utm or {}, click_ids=click_ids or {}) if click_ids or utm else None
    return CloudEvent(
        id=event_id,
        source=source_uri("salon"),
        type=name.ce_type,
        time=time,
        subject=f"client/{client_id}" if client_id else None,
        relayreceivedat=time,
        data=EventData(
            client=Client(id=client_id, phone="+79161234567") if client_id else None,
            appointment=appointment,
            invoice=invoice,
            attribution=attribution,
            extra=extra or {},
        ),
    )


def query_of(url: str, **rules: Any) -> dict[str, str]:
    """The decoded parameters of a rendered URL, as the strict sandbox validates them (raises PlarinError)."""
    return validate_postback(parse_query(urlsplit(url).query.encode("ascii")), **rules)
