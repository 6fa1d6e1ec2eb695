"""Pure mapping from a normalized event to a Maxma request body."""

from __future__ import annotations

from typing import Any

from services.common.events import CloudEvent


class MappingError(ValueError):
    """The event lacks what Maxma needs: a permanent failure, never sent."""


def new_client_body(event: CloudEvent) -> dict[str, Any]:
    """``POST /new-client``: the Klientiks client id becomes ``externalId``, Maxma's natural key."""
    client = event.data.client
    if client is None or not client.id:
        raise MappingError("the event has no client id (Maxma externalId)")
    if not client.phone:
        raise MappingError("the client has no valid phone; Maxma cannot create a client without one")
    body: dict[str, Any] = {"phoneNumber": client.phone, "externalId": client.id}
    for key, value in (
        ("fullName", client.full_name),
        ("surname", client.last_name),
        ("name", client.first_name),
        ("patronymicName", client.patronymic),
        ("email", client.email),
    ):
        if value:
            body[key] = value
    return {"client": body}
