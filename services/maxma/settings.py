"""A Maxma connection as written under a source's ``connections:``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from services.common.events import EventName

MaxmaAction = Literal["new-client", "set-order", "cancel-order"]
ACTIONS: tuple[str, ...] = ("new-client", "set-order", "cancel-order")

# Which events each action can serve: an order needs a paid amount, a cancellation a status change.
ACTION_EVENTS: dict[str, frozenset[EventName]] = {
    "new-client": frozenset(EventName),
    "set-order": frozenset({EventName.VISIT_PAID, EventName.INVOICE_CREATED}),
    "cancel-order": frozenset({EventName.APPOINTMENT_CHANGED}),
}


class MaxmaConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["maxma"]
    name: str
    enabled: bool = True
    events: dict[EventName, MaxmaAction] = Field(min_length=1)
    rate_limit_per_s: float | None = Field(None, gt=0)
    base_url: str = "https://api.maxma.com"
    processing_key: SecretStr
    timeout_s: float = Field(15.0, gt=0)
    # The shop of every order (Maxma's `calculationQuery.shop`); required by `set-order`.
    shop_code: str | None = Field(None, min_length=1, max_length=64)
    shop_name: str | None = Field(None, min_length=1, max_length=255)
    # The event whose `set-order` also confirms the order (bonuses are credited on confirmation).
    confirm_on: Literal[EventName.VISIT_PAID, EventName.INVOICE_CREATED] = EventName.VISIT_PAID
    # Klientiks statuses (`appointment-changed`) that cancel a confirmed order.
    cancel_statuses: tuple[str, ...] = Field(("cancelled", "cancelled_by_sms"), min_length=1)

    @field_validator("shop_code", "shop_name")
    @classmethod
    def _clean(cls, v: str | None) -> str | None:
        if v is not None and (v != v.strip() or not v.isprintable()):
            raise ValueError("must be printable text without leading or trailing spaces")
        return v

    @field_validator("cancel_statuses")
    @classmethod
    def _statuses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(s.strip().casefold() for s in v)

    @model_validator(mode="after")
    def _fits(self) -> MaxmaConnection:
        for event, action in self.events.items():
            if event not in ACTION_EVENTS[action]:
                allowed = ", ".join(sorted(e.value for e in ACTION_EVENTS[action]))
                raise ValueError(
                    f"events.{event.value}: {action} takes only {allowed}; fix: map it elsewhere"
                )
        if "set-order" in self.events.values():
            if not (self.shop_code and self.shop_name):
                raise ValueError(
                    "set-order needs the shop of the orders; fix: set shop_code and shop_name as in Maxma"
                )
            if self.events.get(self.confirm_on) != "set-order":
                raise ValueError(
                    f"confirm_on is {self.confirm_on.value}, which events does not map to set-order; "
                    f"fix: add `{self.confirm_on.value}: set-order` to events, or change confirm_on"
                )
        return self
