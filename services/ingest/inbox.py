"""The raw webhook as received, the record of ``klientiks.inbox.v1``: replaying it re-runs normalization."""

from __future__ import annotations

import base64

from pydantic import AwareDatetime, BaseModel, ConfigDict


class InboxRecord(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    source: str
    event: str
    received_at: AwareDatetime
    method: str
    query: str = ""
    content_type: str | None = None
    body: str = ""
    # Set instead of `body` when the bytes are not UTF-8, so nothing is lost in transit.
    body_b64: str | None = None

    @classmethod
    def build(cls, *, body: bytes, **fields: object) -> InboxRecord:
        try:
            return cls.model_validate({**fields, "body": body.decode("utf-8")})
        except UnicodeDecodeError:
            return cls.model_validate({**fields, "body_b64": base64.b64encode(body).decode()})

    def body_bytes(self) -> bytes:
        return base64.b64decode(self.body_b64) if self.body_b64 is not None else self.body.encode("utf-8")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_defaults=True).encode()

    @classmethod
    def from_bytes(cls, value: bytes) -> InboxRecord:
        return cls.model_validate_json(value)
