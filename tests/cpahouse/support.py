"""What the CPA.House tests share: a connection as a config writes it, and events as the normalizer makes them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from services.common.events import (
    Appointment,
    Attribution,
    Client,
    CloudEvent,
    EventData,
    EventName,
    source_uri,
)
from services.cpahouse.settings import CpaHouseConnection

KEY = "cpa-secret-key-0123456789"
WEBMASTER = "1001"
OFFER = "501"
CONN_UA = "Mozilla/5.0 (klientiks-relay)"
CONN_IP = "203.0.113.10"
RECEIVED = datetime(2024, 3, 14, 9, 15, 30, tzinfo=UTC)


def connection(**over: Any) -> CpaHouseConnection:
    """The demo-like connection; a keyword replaces a key, None removes it."""
    data: dict[str, Any] = {
        "target": "cpahouse",
        "name": "cpahouse",
        "api_key": KEY,
        "webmaster_id": WEBMASTER,
        "offer_id": OFFER,
        "source_id": "11",
        "stream_id": "21",
        "user_agent": CONN_UA,
        "ip_address": CONN_IP,
        **over,
    }
    return CpaHouseConnection.model_validate({k: v for k, v in data.items() if v is not None})


def client(**over: Any) -> Client:
    """A client as a client-created webhook carries it; a keyword replaces a field."""
    fields: dict[str, Any] = {
        "id": "1842",
        "full_name": "Иванова Анна Сергеевна",
        "first_name": "Анна",
        "last_name": "Иванова",
        "patronymic": "Сергеевна",
        "phone": "+79161234567",
        "email": "anna.ivanova@mail.ru",
        **over,
    }
    return Client(**fields)


def event(
    who: Client | None,
    *,
    name: EventName = EventName.CLIENT_CREATED,
    event_id: str = "0f8e7d6c5b4a39281706f5e4d3c2b1a0",
    attribution: Attribution | None = None,
    appointment: Appointment | None = None,
    extra: dict[str, str] | None = None,
) -> CloudEvent:
    return CloudEvent(
        id=event_id,
        source=source_uri("salon"),
        type=name.ce_type,
        time=RECEIVED,
        subject=f"client/{who.id}" if who and who.id else None,
        relayreceivedat=RECEIVED,
        data=EventData(client=who, appointment=appointment, attribution=attribution, extra=extra or {}),
    )
