"""Pure mapping from a normalized event to one Plarin postback URL."""

from __future__ import annotations

import string
from decimal import Decimal
from urllib.parse import quote

from services.common.events import CloudEvent, EventName
from services.plarin.settings import PlarinConnection

_MONEY_LIMIT = Decimal(10) ** 15


class MappingError(ValueError):
    """The event lacks what the postback template asks for: permanent, never sent."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.hint = hint


def click_id(event: CloudEvent, params: tuple[str, ...]) -> str | None:
    """The first of ``params`` the event carries: attribution click ids, UTM tags, then other parameters."""
    attribution, extra = event.data.attribution, event.data.extra
    for name in params:
        for found in (
            attribution.click_ids.get(name) if attribution else None,
            attribution.utm.get(name) if attribution else None,
            extra.get(name),
        ):
            # `banner_{ad_id}`: a macro the ad platform left unfilled is no click id.
            if found and "{" not in found and "}" not in found:
                return found
    return None


def conversion_value(event: CloudEvent) -> Decimal | None:
    """What the conversion is worth: the invoice's amount, or the visit's total."""
    inv, appt = event.data.invoice, event.data.appointment
    if event.event_name is EventName.INVOICE_CREATED and inv is not None:
        return inv.amount if inv.amount is not None else inv.paid_sum
    return appt.total_cost if appt else None


def _money(value: Decimal) -> str | None:
    """Two decimals, never an exponent (``1E+3``); a negative, sub-kopeck or absurd value is not a price."""
    if not value.is_finite() or value < 0 or value >= _MONEY_LIMIT:
        return None
    kopecks = value.quantize(Decimal("0.01"))
    return format(abs(kopecks), "f") if kopecks == value else None  # abs: "-0.00" is 0


def conversion_key(event: CloudEvent) -> str:
    """One conversion per Klientiks event kind and visit (or client): the entity map's id for it."""
    appt, client = event.data.appointment, event.data.client
    subject = (f"visit:{appt.id}" if appt and appt.id else None) or (
        f"client:{client.id}" if client and client.id else f"event:{event.id}"
    )
    return f"{event.event_name.value}:{subject}"


def postback_url(event: CloudEvent, conn: PlarinConnection, click: str) -> str:
    """The cabinet's template with every macro filled and URL-encoded."""
    value = conversion_value(event)
    client = event.data.client
    values: dict[str, str | None] = {
        "click_id": click,
        "event": conn.event_names.get(event.event_name, event.event_name.value),
        "value": _money(value) if value is not None else None,
        "currency": conn.currency,
        "event_id": event.id,
        "client_id": client.id if client else None,
        "ts": str(int(event.time.timestamp())),
    }
    out = []
    for literal, name, _spec, _conv in string.Formatter().parse(conn.postback_url):
        out.append(literal)
        if name is None:
            continue
        filled = values[name]
        if not filled:
            raise MappingError(
                f"the postback URL asks for {{{name}}}, which this event does not carry",
                "value: the visit's amount (appointment_total_cost, or the Klientiks API); "
                "client_id: client_id in the webhook template"
                if name in ("value", "client_id")
                else None,
            )
        out.append(quote(filled, safe=""))
    return "".join(out)
