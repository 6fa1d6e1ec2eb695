"""Pure mapping from a normalized event to a CPA.House lead (``send_order`` form)."""

from __future__ import annotations

import phonenumbers

from services.common import fieldtemplate
from services.common.events import CloudEvent
from services.cpahouse.settings import CpaHouseConnection

# Fields every lead carries, in the order the API lists them; `county_code` is spelled so by CPA.House.
REQUIRED = (
    "api_key", "id_webmaster", "name", "phone", "id_offer", "id_source", "id_stream", "user_agent",
    "ip_address", "county_code",
)  # fmt: skip


SUB_ID_MAX = 255
NAME_MAX = 255
USER_AGENT_MAX = 512


class MappingError(ValueError):
    """The event lacks what a lead needs: permanent, never sent. ``hint`` says what to change."""

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.hint = hint


def lead_key(event: CloudEvent, conn: CpaHouseConnection) -> str:
    """One lead per client and offer: the entity map's id for it."""
    client = event.data.client
    if client is None or not client.id:
        raise MappingError(
            "the event names no client, so it cannot be told from a second lead of the same client",
            "add client_id to the Klientiks webhook template",
        )
    return f"{conn.offer_id}:{client.id}"


def country_code(phone: str) -> str | None:
    """ISO 3166-1 alpha-2 of an E.164 phone's region (RU for +7 9.., KZ for +7 7..)."""
    try:
        region = phonenumbers.region_code_for_number(phonenumbers.parse(phone, None))
    except phonenumbers.NumberParseException:
        return None
    return region if region and len(region) == 2 and region.isalpha() else None


def lead_form(event: CloudEvent, conn: CpaHouseConnection) -> dict[str, str]:
    """The ``send_order`` form of one lead; every value is one the event or the connection really holds."""
    client = event.data.client
    names = (
        [client.full_name, " ".join(p for p in (client.first_name, client.last_name) if p)] if client else []
    )
    name = next((n for n in names if n and len(n) <= NAME_MAX), None)
    if not client or not name:
        raise MappingError(f"the client has no name of at most {NAME_MAX} characters, which CPA.House requires",
                           "add client_name={{name}} to the Klientiks webhook template")  # fmt: skip
    if not client.phone:
        raise MappingError("the client has no valid phone, which CPA.House requires",
                           "add client_phone={{phone}} to the Klientiks webhook template")  # fmt: skip
    country = country_code(client.phone)
    if country is None:
        raise MappingError(f"no country for the client's phone region ({client.phone[:3]}...)")
    attribution = event.data.attribution
    # The browser's own when the event has a usable one, else the connection's.
    user_agent = attribution.user_agent if attribution else None
    if not user_agent or len(user_agent) > USER_AGENT_MAX:
        user_agent = conn.user_agent
    ip = attribution.ip if attribution else None
    if not ip or "%" in ip:
        ip = conn.ip_address
    if not user_agent:
        raise MappingError("the event carries no user agent", "set user_agent on the connection")
    if not ip:
        raise MappingError("the event carries no IP address", "set ip_address on the connection")
    form = {
        "api_key": conn.api_key.get_secret_value(),
        "id_webmaster": conn.webmaster_id,
        "name": name,
        "phone": client.phone,
        "id_offer": conn.offer_id,
        "id_source": conn.source_id,
        "id_stream": conn.stream_id,
        "user_agent": user_agent,
        "ip_address": ip,
        "county_code": country,
    }
    for key, template in sorted(conn.sub_ids.items()):
        value = fieldtemplate.render(template, event)
        # Over SUB_ID_MAX it would be cut by CPA.House: better absent than a different value.
        if value is not None and len(value) <= SUB_ID_MAX:
            form[key] = value
    return form
