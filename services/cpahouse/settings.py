"""A CPA.House connection as written under a source's ``connections:``."""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from services.common import fieldtemplate
from services.common.events import EventName

CpaHouseAction = Literal["lead"]
ACTIONS: tuple[str, ...] = ("lead",)
SubId = Literal["sub_id_1", "sub_id_2", "sub_id_3", "sub_id_4"]
_DEFAULT_EVENTS: dict[EventName, CpaHouseAction] = {
    EventName.CLIENT_CREATED: "lead",
    EventName.ONLINE_BOOKING: "lead",
}
_DEFAULT_SUB_IDS: dict[SubId, str] = {"sub_id_1": "{client.id}"}
_ID = r"^[1-9][0-9]{0,17}$"


class CpaHouseConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["cpahouse"]
    name: str
    enabled: bool = True
    # Which events create a lead: a new client, and a client who booked online.
    events: dict[EventName, CpaHouseAction] = Field(
        default_factory=lambda: _DEFAULT_EVENTS.copy(),
        min_length=1,
    )
    rate_limit_per_s: float | None = Field(None, gt=0)
    base_url: str = "https://api.cpa.house"
    api_key: SecretStr
    # The ids of the webmaster's profile, offer, source and stream in CPA.House.
    webmaster_id: str = Field(pattern=_ID)
    offer_id: str = Field(pattern=_ID)
    source_id: str = Field(pattern=_ID)
    stream_id: str = Field(pattern=_ID)
    # Used when the event carries no browser of its own (Klientiks sends none unless the template adds it).
    user_agent: str | None = Field(None, min_length=1, max_length=512)
    ip_address: str | None = None
    # sub_id_1..4 as templates over event fields (services/common/fieldtemplate.py).
    sub_ids: dict[SubId, str] = Field(default_factory=lambda: _DEFAULT_SUB_IDS.copy())
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("ip_address")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                address = ipaddress.ip_address(v.strip())
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address") from None
            if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
                raise ValueError(f"{v!r} has a zone (%...), which means nothing outside its machine")
            return str(address)
        return v

    @field_validator("user_agent")
    @classmethod
    def _ua(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or not v.isprintable()):
            raise ValueError("must be printable text without leading or trailing spaces")
        return v

    @field_validator("sub_ids")
    @classmethod
    def _templates(cls, v: dict[str, str]) -> dict[str, str]:
        problems = [f"{key}: {p}" for key, template in v.items() for p in fieldtemplate.problems(template)]
        if problems:
            raise ValueError("; ".join(problems))
        return v
