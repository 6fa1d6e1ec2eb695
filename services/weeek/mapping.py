"""Pure mapping from a normalized event to Weeek request bodies."""

from __future__ import annotations

import hashlib
import json
from decimal import Decimal
from typing import Any

from services.common import fieldtemplate
from services.common.events import CloudEvent, EventName
from services.weeek.settings import WeeekConnection

TITLE_MAX = 255
NAME_MAX = 255
WON, LOST = "won", "lost"


class MappingError(ValueError):
    """The event lacks what Weeek needs: permanent, never sent. ``hint`` says what to change."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.hint = hint


def _line(text: str | None) -> str | None:
    """One line: a template's line breaks and runs of spaces become one space (no control characters)."""
    return " ".join(text.split()) or None if text else None


def client_id(event: CloudEvent) -> str:
    client = event.data.client
    if client is None or not client.id:
        raise MappingError("the event names no client", "add client_id to the Klientiks webhook template")
    return client.id


def visit_id(event: CloudEvent) -> str:
    appt, invoice = event.data.appointment, event.data.invoice
    found = (appt.id if appt else None) or (invoice.object_id if invoice else None)
    if not found:
        raise MappingError("the event names no visit", "add appointment_id to the Klientiks webhook template")
    return found


def contact_body(event: CloudEvent) -> dict[str, Any]:
    """``POST /crm/contacts``: names, phone and email; ``firstName`` is required."""
    client = event.data.client
    if client is None:
        raise MappingError("the event has no client")
    first = client.first_name or client.full_name
    if first and len(first) > NAME_MAX:
        raise MappingError(f"the client's name is over {NAME_MAX} characters, the most a contact's firstName takes",
                           "add client_first_name={{first_name}} to the Klientiks webhook template")  # fmt: skip
    if not first:
        raise MappingError("the client has no name for the contact's firstName",
                           "add client_first_name={{first_name}} to the Klientiks webhook template")  # fmt: skip
    body: dict[str, Any] = {"firstName": first}
    if client.first_name:
        for key, value in (("lastName", client.last_name), ("middleName", client.patronymic)):
            if value:
                body[key] = value
    if client.phone:
        body["phones"] = [client.phone]
    if client.email:
        body["emails"] = [client.email]
    return body


def fingerprint(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def deal_amount(event: CloudEvent, conn: WeeekConnection) -> Decimal | None:
    """The visit's amount (the invoice's for invoice-created); 0 for a subscription visit if so set."""
    appt, inv = event.data.appointment, event.data.invoice
    if conn.subscription_counts_zero and appt is not None and appt.by_subscription:
        return Decimal(0)
    if event.event_name is EventName.INVOICE_CREATED and inv is not None:
        return inv.paid_sum if inv.paid_sum else inv.amount
    return appt.total_cost if appt else None


def _number(value: Decimal) -> float | int:
    return int(value) if value == value.to_integral_value() else float(value)


def _amount(event: CloudEvent, conn: WeeekConnection) -> float | int | None:
    """The amount as a JSON number; none for a negative or sub-kopeck one (not a price)."""
    amount = deal_amount(event, conn)
    if amount is None or amount < 0 or amount != amount.quantize(Decimal("0.01")):
        return None
    return _number(amount)


def assignee(event: CloudEvent, conn: WeeekConnection) -> str | None:
    """The Weeek user responsible: the executor or the author, by Klientiks user id, else by name."""
    appt = event.data.appointment
    if appt is None:
        return None
    if conn.assignee_from == "author":
        keys = [appt.author_id]
    else:
        keys = [appt.executor_id, appt.executor.name if appt.executor else None]
    return next((conn.users[k] for k in keys if k and k in conn.users), None)


def deal_body(event: CloudEvent, conn: WeeekConnection) -> dict[str, Any]:
    """``POST /crm/statuses/{statusId}/deals``: the title, amount, description, assignee, visit id field."""
    visit = visit_id(event)
    title = _line(fieldtemplate.render(conn.title, event))
    if not title or len(title) > TITLE_MAX:
        title = f"Запись {visit}"
    body: dict[str, Any] = {"title": title}
    if (amount := _amount(event, conn)) is not None:
        body["amount"] = amount
    if conn.description and (text := _line(fieldtemplate.render(conn.description, event))):
        body["description"] = text
    if who := assignee(event, conn):
        body["assignees"] = [who]
    if conn.visit_id_field:
        body["customFields"] = {conn.visit_id_field: visit}
    return body


def change_patch(event: CloudEvent, conn: WeeekConnection) -> dict[str, Any]:
    """What a changed visit may update: the title when its template fills, the amount when known."""
    body: dict[str, Any] = {}
    title = _line(fieldtemplate.render(conn.title, event))
    if title and len(title) <= TITLE_MAX:
        body["title"] = title
    if (amount := _amount(event, conn)) is not None:
        body["amount"] = amount
    return body


def lost(event: CloudEvent, conn: WeeekConnection) -> bool:
    appt = event.data.appointment
    return bool(appt and appt.status and appt.status.strip().casefold() in conn.lost_statuses)


def moved_to(event: CloudEvent, conn: WeeekConnection) -> str | None:
    """The Weeek status a changed visit's deal moves to, if the connection maps its Klientiks status."""
    appt = event.data.appointment
    return conn.status_map.get(appt.status.strip().casefold()) if appt and appt.status else None


def won_patch(event: CloudEvent, conn: WeeekConnection) -> dict[str, Any]:
    """``PATCH /crm/deals/{id}`` for a paid visit: won, with the paid amount."""
    body: dict[str, Any] = {"winStatus": WON}
    if (amount := _amount(event, conn)) is not None:
        body["amount"] = amount
    return body
