"""Pure mapping from a normalized event to Maxma request bodies."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

from services.common.events import CloudEvent, EventName

# A row title Maxma shows in the client's history; longer joined service names become a count.
TITLE_MAX = 255
# Maxma documents no limit; the sandbox's (and common order-id columns') is 64.
ORDER_ID_MAX = 64


class MappingError(ValueError):
    """The event lacks what Maxma needs: a permanent failure, never sent.

    ``hint`` says what to change (a Klientiks template parameter, a connection setting).
    """

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.hint = hint


def _client_fields(event: CloudEvent) -> dict[str, Any]:
    client = event.data.client
    assert client is not None
    body: dict[str, Any] = {"phoneNumber": client.phone}
    for key, value in (
        ("fullName", client.full_name),
        ("surname", client.last_name),
        ("name", client.first_name),
        ("patronymicName", client.patronymic),
        ("email", client.email),
    ):
        if value:
            body[key] = value
    return body


def new_client_body(event: CloudEvent) -> dict[str, Any]:
    """``POST /new-client``: the Klientiks client id becomes ``externalId``, Maxma's natural key."""
    client = event.data.client
    if client is None or not client.id:
        raise MappingError("the event has no client id (Maxma externalId)")
    if not client.phone:
        raise MappingError("the client has no valid phone; Maxma cannot create a client without one")
    return {"client": {**_client_fields(event), "externalId": client.id}}


def client_fingerprint(event: CloudEvent) -> str:
    """A hash of what Maxma holds of the client (names, email, phone): an update is due when it differs."""
    return hashlib.sha256(
        json.dumps(_client_fields(event), sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def update_client_body(event: CloudEvent, *, by_external_id: bool) -> dict[str, Any]:
    """``POST /update-client`` for the client Maxma said exists: by ``externalId`` (30) or by phone (24).

    Found by phone, the client may be another system's: its ``externalId`` is left as it is.
    """
    new_client_body(event)  # the same requirements
    client = event.data.client
    assert client is not None
    assert client.id
    assert client.phone
    fields = _client_fields(event)
    if by_external_id:
        return {"externalId": client.id, "client": fields}
    return {"phoneNumber": client.phone, "client": fields}


def visit_id(event: CloudEvent) -> str:
    """The Klientiks visit an order is for (``appointment_id``; an invoice's ``object_id``)."""
    appt, invoice = event.data.appointment, event.data.invoice
    found = (appt.id if appt else None) or (invoice.object_id if invoice else None)
    if not found:
        raise MappingError(
            "the event has no appointment id, so no stable order id",
            "add appointment_id to the Klientiks webhook template (`relay urls` shows it)",
        )
    return found


def order_id(event: CloudEvent) -> str:
    """A stable ``orderId`` per visit: ``{source}:{appointment id}`` (Maxma answers 32 to a second one)."""
    found = f"{event.source_name}:{visit_id(event)}"
    if len(found) > ORDER_ID_MAX:
        raise MappingError(
            f"the order id {found!r} is over {ORDER_ID_MAX} characters",
            "give the source a shorter name (it is the order id's prefix)",
        )
    return found


def order_amount(event: CloudEvent) -> Decimal:
    """What the visit cost: the appointment's total (visit-paid) or the invoice's amount (invoice-created)."""
    name = event.event_name
    if name is EventName.INVOICE_CREATED:
        inv = event.data.invoice
        amount = inv.amount if inv and inv.amount is not None else (inv.paid_sum if inv else None)
        param = "appointment_amount={{amount}}"
    else:
        appt = event.data.appointment
        amount = appt.total_cost if appt else None
        param = "appointment_total_cost={{appointment.total_cost}}"
    if amount is None:
        raise MappingError(
            "the visit has no amount, so no order can be set",
            f"add {param} to the Klientiks {name.value} webhook template, or give the source Klientiks "
            "API credentials (klientiks:) so the relay reads it from the visit",
        )
    if amount < 0:
        raise MappingError(f"the visit's amount is negative ({amount}); a refund is not an order")
    if _over_kopecks(amount):
        raise MappingError(f"the visit's amount {amount} has more than two decimals; it is not a price")
    return amount


def _over_kopecks(value: Decimal) -> bool:
    return value != value.quantize(Decimal("0.01")) if value.is_finite() else True


def _price(value: Decimal) -> float:
    # A JSON number: float() of a kopeck amount prints back exactly (shortest round-trip repr).
    return float(value)


def order_rows(event: CloudEvent, amount: Decimal) -> list[dict[str, Any]]:
    """One row per priced service when their prices add up to the amount, else one row for the visit."""
    appt = event.data.appointment
    lines = appt.lines if appt else []
    if lines and all(line.price is not None and not _over_kopecks(line.price) for line in lines):
        total = sum((line.price * line.qty for line in lines if line.price is not None), Decimal(0))
        if total == amount:
            return [
                {
                    "id": str(i),
                    "product": {
                        "sku": f"service-{line.service_id}" if line.service_id else f"service-{i}",
                        "title": line.name,
                        "blackPrice": _price(line.price),
                    },
                    "qty": line.qty,
                }
                for i, line in enumerate(lines, start=1)
                if line.price is not None
            ]
    names = [line.name for line in lines] or (appt.services if appt else [])
    title = ", ".join(names)
    if not title or len(title) > TITLE_MAX:
        title = f"Визит ({len(names)} услуг)" if names else "Визит"
    return [{"id": "1", "product": {"sku": "visit", "title": title, "blackPrice": _price(amount)}, "qty": 1}]


def order_client(event: CloudEvent) -> dict[str, str]:
    """Who earns the bonuses: by phone when known (Maxma's own key), else by ``externalId``."""
    client = event.data.client
    if client is not None and client.phone:
        return {"phoneNumber": client.phone}
    if client is not None and client.id:
        return {"externalId": client.id}
    raise MappingError(
        "the visit names no client, so no one would earn the bonuses",
        "add client_id={{client_id}} to the Klientiks webhook template",
    )


def set_order_body(event: CloudEvent, shop_code: str, shop_name: str) -> dict[str, Any]:
    """``POST /v2/set-order``: bonuses collected by Maxma's rules, none applied (the visit is paid)."""
    amount = order_amount(event)
    return {
        "orderId": order_id(event),
        "calculationQuery": {
            "client": order_client(event),
            "shop": {"code": shop_code, "name": shop_name},
            "executedAt": event.time.isoformat(timespec="seconds"),
            "rows": order_rows(event, amount),
            "applyBonuses": 0,
            "collectBonuses": "auto",
        },
    }


def confirm_order_body(event: CloudEvent) -> dict[str, Any]:
    return {"orderId": order_id(event), "executedAt": event.time.isoformat(timespec="seconds")}


def cancel_order_body(order: str, event: CloudEvent) -> dict[str, Any]:
    return {"orderId": order, "executedAt": event.time.isoformat(timespec="seconds")}


def is_cancellation(event: CloudEvent, statuses: tuple[str, ...]) -> bool:
    appt = event.data.appointment
    return bool(appt and appt.status and appt.status.strip().casefold() in statuses)
