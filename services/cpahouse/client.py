"""The CPA.House API client: the only code that knows its URL and answers."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from services.common.outcome import Outcome
from services.common.vendorhttp import error_outcome, send, status_outcome

SEND_ORDER = "method/send_order"
# A `msg` naming the credentials or ids: every lead of the connection would fail the same way.
_CONNECTION_WORDS = ("api_key", "id_webmaster", "id_offer", "id_source", "id_stream", "ключ")


def classify(status: int, headers: httpx.Headers, body: bytes) -> Outcome:
    """Success, retryable or permanent, from one answer of ``send_order``.

    ``{"status": "success"}`` is success; another ``status`` is permanent with ``msg`` as the reason
    (no error codes are documented); 429, 5xx and an answer that is not JSON are retryable.
    """
    retry = status_outcome(status, headers)
    if retry is not None:
        return retry
    data: Any = None
    with contextlib.suppress(ValueError):
        data = httpx.Response(status, content=body).json()
    if status in (401, 403):
        return Outcome.permanent(
            f"HTTP {status}: the api_key was refused", http_status=status, opens_circuit=True
        )
    if not isinstance(data, dict):
        if 200 <= status < 300:
            # A proxy or maintenance page instead of the API's JSON.
            return Outcome.retryable(f"HTTP {status} without a JSON object", http_status=status)
        return Outcome.permanent(f"HTTP {status}", http_status=status)
    if data.get("status") == "success" and 200 <= status < 300:
        ref = data.get("id", data.get("order_id"))
        return Outcome.success(http_status=status, target_ref=str(ref) if ref is not None else None)
    msg = str(data.get("msg") or data.get("message") or data.get("status") or f"HTTP {status}")[:500]
    broken = any(word in msg.casefold() for word in _CONNECTION_WORDS)
    return Outcome.permanent(f"CPA.House: {msg}", http_status=status, opens_circuit=broken)


class CpaHouseClient:
    """One CPA.House account."""

    def __init__(self, transport: httpx.AsyncBaseTransport, base_url: str, timeout_s: float) -> None:
        self._transport = transport
        self._url = httpx.URL(f"{base_url.rstrip('/')}/{SEND_ORDER}")
        self._timeout = timeout_s

    async def send_order(self, form: dict[str, str], *, idempotency_key: str) -> Outcome:
        # The api_key travels in the form (as the API wants), never in a URL that could be logged.
        headers = {"Accept": "application/json", "Idempotency-Key": idempotency_key}
        try:
            resp = await send(self._transport, "POST", self._url, form=form, headers=headers,
                              timeout_s=self._timeout)  # fmt: skip
        except httpx.TransportError as e:
            return error_outcome(e)
        return classify(resp.status_code, resp.headers, resp.content)
