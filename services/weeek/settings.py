"""A Weeek connection as written under a source's ``connections:``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from services.common import fieldtemplate
from services.common.events import EventName

# contact: create or update the client's contact; deal: a deal for a booking, linked to the contact;
# deal-change: move, update or lose the deal as the visit changes; deal-paid: the deal is won.
WeeekAction = Literal["contact", "deal", "deal-change", "deal-paid"]
ACTIONS: tuple[str, ...] = ("contact", "deal", "deal-change", "deal-paid")
ACTION_EVENTS: dict[str, frozenset[EventName]] = {
    "contact": frozenset(EventName),
    "deal": frozenset({EventName.APPOINTMENT_CREATED, EventName.ONLINE_BOOKING}),
    "deal-change": frozenset({EventName.APPOINTMENT_CHANGED}),
    "deal-paid": frozenset({EventName.VISIT_PAID, EventName.INVOICE_CREATED}),
}
_DEFAULT_EVENTS: dict[EventName, WeeekAction] = {
    EventName.CLIENT_CREATED: "contact",
    EventName.APPOINTMENT_CREATED: "deal",
    EventName.ONLINE_BOOKING: "deal",
    EventName.APPOINTMENT_CHANGED: "deal-change",
    EventName.VISIT_PAID: "deal-paid",
}


class WeeekConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["weeek"]
    name: str
    enabled: bool = True
    events: dict[EventName, WeeekAction] = Field(default_factory=lambda: _DEFAULT_EVENTS.copy(), min_length=1)
    rate_limit_per_s: float | None = Field(None, gt=0)
    base_url: str = "https://api.weeek.net/public/v1"
    token: SecretStr
    # The funnel status new deals are created in (`relay weeek statuses --funnel ID` lists them).
    status_id: str = Field(min_length=1, max_length=64)
    # Klientiks status (appointment-changed) -> the Weeek status the deal moves to.
    status_map: dict[str, str] = Field(default_factory=dict)
    # Klientiks statuses that lose the deal.
    lost_statuses: tuple[str, ...] = ("cancelled", "cancelled_by_sms", "missed")
    # Templates over event fields (services/common/fieldtemplate.py); a title that cannot be filled falls
    # back to "Запись {appointment.id}".
    title: str = "{appointment.services} — {appointment.start:%d.%m.%Y %H:%M}"
    description: str | None = "Запись в Klientiks №{appointment.id}"
    # Who is responsible for the deal: the visit's executor or the booking's author, mapped by `users`
    # (a Klientiks user id or name -> a Weeek user id); an unmapped one leaves the deal unassigned.
    assignee_from: Literal["executor", "author"] = "executor"
    users: dict[str, str] = Field(default_factory=dict)
    # A visit paid by a subscription (абонемент) counts 0 in the deal's amount.
    subscription_counts_zero: bool = False
    # The deal custom field (its id) that gets the Klientiks visit id, to find the deal from Klientiks.
    visit_id_field: str | None = None
    timeout_s: float = Field(15.0, gt=0)

    @field_validator("title", "description")
    @classmethod
    def _templates(cls, v: str | None) -> str | None:
        if v is not None and (problems := fieldtemplate.problems(v)):
            raise ValueError("; ".join(problems))
        return v

    @field_validator("description")
    @classmethod
    def _no_description(cls, v: str | None) -> str | None:
        return v or None  # `description: ""` turns it off

    @model_validator(mode="after")
    def _fits(self) -> WeeekConnection:
        for event, action in self.events.items():
            if event not in ACTION_EVENTS[action]:
                allowed = ", ".join(sorted(e.value for e in ACTION_EVENTS[action]))
                raise ValueError(
                    f"events.{event.value}: {action} takes only {allowed}; fix: map it elsewhere"
                )
        return self

    @field_validator("lost_statuses")
    @classmethod
    def _statuses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(s.strip().casefold() for s in v)

    @field_validator("status_map")
    @classmethod
    def _status_map(cls, v: dict[str, str]) -> dict[str, str]:
        for status, target in v.items():
            if not target.strip() or len(target) > 64:
                raise ValueError(
                    f"status_map.{status}: a Weeek status id (`relay weeek statuses --funnel ID`)"
                )
        return {k.strip().casefold(): s.strip() for k, s in v.items()}
