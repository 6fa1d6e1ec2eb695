"""A Maxma connection as written under a source's ``connections:``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from services.common.events import EventName

MaxmaAction = Literal["new-client"]
ACTIONS: tuple[str, ...] = ("new-client",)


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
