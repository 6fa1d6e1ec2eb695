"""The Weeek API client: the only code that knows Weeek's URLs and answers."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from services.common.outcome import Outcome
from services.common.vendorhttp import error_outcome, send, status_outcome


def _json(body: bytes) -> Any:
    with contextlib.suppress(ValueError):
        return httpx.Response(200, content=body).json()
    return None


def _message(data: Any) -> str:
    if not isinstance(data, dict):
        return ""
    msg = str(data.get("message") or "")[:300]
    errors = data.get("errors")
    if isinstance(errors, dict) and errors:
        detail = "; ".join(
            f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in errors.items()
        )
        msg = f"{msg} ({detail[:500]})" if msg else detail[:500]
    return msg


def classify(status: int, headers: httpx.Headers, body: bytes, *, entity: str, what: str) -> Outcome:
    """One answer of Weeek; ``entity`` is the envelope's key (``contact``, ``deal``), ``what`` the URL's object.

    2xx ``{"success": true}`` is success (the entity's id its ref); 401/403 permanent and the connection's
    circuit opens; 404 permanent, naming the missing object; 422 and ``success: false`` permanent with
    Weeek's message; 408, 429 (Retry-After) and 5xx retryable; a 2xx that is not JSON retryable.
    """
    retry = status_outcome(status, headers)
    if retry is not None:
        return retry
    data = _json(body)
    if status in (401, 403):
        return Outcome.permanent(f"HTTP {status}: the Weeek token was refused", http_status=status,
                                 hint="check the connection's token (Weeek: Settings -> API)", opens_circuit=True)  # fmt: skip
    if status == 404:
        hint = None
        if what.startswith("status"):
            hint = "the connection's status_id or status_map is stale: run `relay weeek statuses --funnel ID`"
        return Outcome.permanent(f"HTTP 404: Weeek has no {what}", http_status=status, hint=hint)
    if not 200 <= status < 300:
        return Outcome.permanent(f"HTTP {status}: {_message(data) or 'refused'}", http_status=status)
    if not isinstance(data, dict):
        return Outcome.retryable(f"HTTP {status} without a JSON object", http_status=status)
    if data.get("success") is not True:
        return Outcome.permanent(f"Weeek: {_message(data) or 'success is not true'}", http_status=status)
    found = data.get(entity)
    ref = found.get("id") if isinstance(found, dict) else None
    return Outcome.success(http_status=status, target_ref=str(ref) if ref is not None else None)


class WeeekClient:
    """One Weeek workspace (one token)."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, base_url: str, token: str, timeout_s: float
    ) -> None:
        self._transport = transport
        self._base = base_url.rstrip("/")
        self._auth = f"Bearer {token}"
        self._timeout = timeout_s

    async def _call(
        self, method: str, path: str, body: dict[str, Any] | None, *, key: str, entity: str, what: str
    ) -> Outcome:
        headers = {"Authorization": self._auth, "Accept": "application/json", "Idempotency-Key": key}
        try:
            resp = await send(self._transport, method, f"{self._base}{path}", json=body, headers=headers,
                              timeout_s=self._timeout)  # fmt: skip
        except httpx.TransportError as e:
            return error_outcome(e)
        return classify(resp.status_code, resp.headers, resp.content, entity=entity, what=what)

    async def create_contact(self, body: dict[str, Any], *, key: str) -> Outcome:
        return await self._call("POST", "/crm/contacts", body, key=key, entity="contact", what="contacts")

    async def update_contact(self, contact_id: str, body: dict[str, Any], *, key: str) -> Outcome:
        # PATCH changes only the fields sent: what this event does not carry stays as it was.
        return await self._call("PATCH", f"/crm/contacts/{contact_id}", body, key=key, entity="contact",
                                what=f"contact {contact_id}")  # fmt: skip

    async def create_deal(self, status_id: str, body: dict[str, Any], *, key: str) -> Outcome:
        return await self._call("POST", f"/crm/statuses/{status_id}/deals", body, key=key, entity="deal",
                                what=f"status {status_id}")  # fmt: skip

    async def update_deal(self, deal_id: str, body: dict[str, Any], *, key: str) -> Outcome:
        return await self._call("PATCH", f"/crm/deals/{deal_id}", body, key=key, entity="deal",
                                what=f"deal {deal_id}")  # fmt: skip

    async def move_deal(self, deal_id: str, status_id: str, *, key: str) -> Outcome:
        # Not confirmed by a source (the docs name "Move a deal" without its path): the sandbox's shape.
        return await self._call("POST", f"/crm/deals/{deal_id}/move", {"statusId": status_id}, key=key,
                                entity="deal", what=f"status {status_id} or deal {deal_id}")  # fmt: skip

    async def link_contact(self, deal_id: str, contact_id: str, *, key: str) -> Outcome:
        return await self._call("POST", f"/crm/deals/{deal_id}/contacts", {"contactId": contact_id}, key=key,
                                entity="deal", what=f"deal {deal_id} or contact {contact_id}")  # fmt: skip

    async def list(self, path: str, entity: str) -> list[dict[str, Any]]:
        """A listing (funnels, statuses) for the operator's commands; raise RuntimeError on a failure."""
        headers = {"Authorization": self._auth, "Accept": "application/json"}
        try:
            resp = await send(
                self._transport, "GET", f"{self._base}{path}", headers=headers, timeout_s=self._timeout
            )
        except httpx.TransportError as e:
            raise RuntimeError(f"Weeek is unreachable: {type(e).__name__}") from None
        out = classify(resp.status_code, resp.headers, resp.content, entity=entity, what=path.strip("/"))
        data = _json(resp.content)
        if not out.ok or not isinstance(data, dict) or not isinstance(data.get(entity), list):
            raise RuntimeError(out.reason or f"Weeek answered without {entity}")
        return [item for item in data[entity] if isinstance(item, dict)]
