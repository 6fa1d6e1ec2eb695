"""A Plarin connection as written under a source's ``connections:``: the cabinet's postback URL template."""

from __future__ import annotations

import string
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.common.events import EventName

PlarinAction = Literal["conversion"]
ACTIONS: tuple[str, ...] = ("conversion",)
# What a postback template may name, filled per conversion (services/plarin/mapping.py).
MACROS = ("click_id", "event", "value", "currency", "event_id", "client_id", "ts")
_DEFAULT_EVENTS: dict[EventName, PlarinAction] = {EventName.VISIT_PAID: "conversion"}


def macros_of(template: str) -> list[str]:
    """The macros of a postback template, in order; ValueError when it is malformed."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]


class PlarinConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: Literal["plarin"]
    name: str
    enabled: bool = True
    # Which events are conversions (a paid visit by default).
    events: dict[EventName, PlarinAction] = Field(
        default_factory=lambda: _DEFAULT_EVENTS.copy(), min_length=1
    )
    rate_limit_per_s: float | None = Field(None, gt=0)
    # From the Plarin cabinet (Settings -> Postback), with macros such as {click_id} where values go.
    postback_url: str = Field(repr=False)  # it may carry the cabinet's key
    # The attribution parameters that carry the ad click id, tried in this order.
    click_id_params: tuple[str, ...] = Field(("yclid", "gclid", "click_id", "utm_content"), min_length=1)
    # The {event} of each Klientiks event; unset: the Klientiks event name (e.g. "visit-paid").
    event_names: dict[EventName, str] = Field(default_factory=dict)
    currency: str = Field("RUB", pattern=r"^[A-Z]{3}$")
    timeout_s: float = Field(15.0, gt=0)

    @field_validator("event_names")
    @classmethod
    def _names(cls, v: dict[EventName, str]) -> dict[EventName, str]:
        for event, name in v.items():
            if not name.strip() or name != name.strip() or not name.isprintable():
                raise ValueError(f"event_names.{event.value} must be printable text without outer spaces")
        return v

    @field_validator("postback_url")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            names = macros_of(v)
            parts = urlsplit(v.replace("{", "").replace("}", ""))
        except ValueError as e:
            raise ValueError(
                f"the postback URL is malformed ({e}); write literal braces as {{{{ and }}}}"
            ) from None
        unknown = [n for n in names if n not in MACROS]
        if unknown:
            raise ValueError(
                f"unknown macro {{{unknown[0]}}} in the postback URL; use {', '.join('{' + m + '}' for m in MACROS)}"
            )
        if any(spec or conv for _, name, spec, conv in string.Formatter().parse(v) if name is not None):
            raise ValueError("write a macro as {name}, without a conversion or format")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("the postback URL must be an http(s) URL from the Plarin cabinet")
        if any(c.isspace() for c in v):
            raise ValueError("the postback URL has whitespace in it")
        return v
