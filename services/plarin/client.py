"""The Plarin postback client: one GET per conversion; the only code that knows how Plarin answers."""

from __future__ import annotations

import httpx

from services.common.outcome import Outcome
from services.common.vendorhttp import error_outcome, send, status_outcome


def classify(status: int, headers: httpx.Headers) -> Outcome:
    """2xx success; 408, 429 and 5xx retryable (with Retry-After); anything else permanent."""
    retry = status_outcome(status, headers)
    if retry is not None:
        return retry
    if 200 <= status < 300:
        return Outcome.success(http_status=status)
    if status in (401, 403):
        # The cabinet's key in the URL was refused: every postback of the connection would be.
        return Outcome.permanent(f"HTTP {status}: the postback URL was refused", http_status=status,
                                 opens_circuit=True)  # fmt: skip
    return Outcome.permanent(f"HTTP {status}", http_status=status)


class PlarinClient:
    def __init__(self, transport: httpx.AsyncBaseTransport, timeout_s: float) -> None:
        self._transport = transport
        self._timeout = timeout_s

    async def postback(self, url: str, *, idempotency_key: str) -> Outcome:
        # The URL may carry the cabinet's key: it is never logged, and errors name only the exception type.
        try:
            resp = await send(self._transport, "GET", url, headers={"Idempotency-Key": idempotency_key},
                              timeout_s=self._timeout)  # fmt: skip
        except httpx.TransportError as e:
            return error_outcome(e)
        except httpx.InvalidURL:
            return Outcome.permanent("the postback URL is not a valid URL once filled")
        return classify(resp.status_code, resp.headers)
