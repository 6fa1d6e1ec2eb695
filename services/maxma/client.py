"""The Maxma API client: the only code that knows Maxma's URLs and error codes."""

from __future__ import annotations

import contextlib
from typing import Any

import httpx

from services.common.outcome import Outcome
from services.common.vendorhttp import error_outcome, send, status_outcome

# Maxma answers processing errors as HTTP 200 with {"errorCode": N, "description": ..., "hint"?: ...}
# (targets.md, section 2). A code not named here is permanent for its event.
ALREADY_EXISTS = {
    24: "a client with this phone already exists",
    30: "a client with this externalId already exists",
}
ALREADY_DONE = {17: "already processed", 32: "order already processed"}
TRY_LATER = {1: "general error", 49: "temporarily unavailable"}
# Too many requests of one kind (28: SMS codes): wait longer, as after a 429.
BACK_OFF = {28: "too many requests"}
# Every call of the connection would fail alike: permanent, and the connection's circuit opens.
CONNECTION_BROKEN = {
    4: "the account is blocked",
    5: "the shop is not found: check the connection's shop_code",
    22: "the processing key was not passed",
    23: "the processing key was refused",
}
CLIENT_NOT_FOUND = 3
ORDER_NOT_FOUND = 31


def _error_code(value: Any) -> int | None:
    # The SDKs declare an int; accept a numeric string rather than misreading "24" as a new error.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def classify(status: int, headers: httpx.Headers, body: bytes) -> Outcome:
    """Success, retryable or permanent, from one HTTP answer of Maxma."""
    retry = status_outcome(status, headers)
    if retry is not None:
        return retry
    data: Any = None
    with contextlib.suppress(ValueError):
        data = httpx.Response(status, content=body).json()
    code = _error_code(data.get("errorCode")) if isinstance(data, dict) else None
    hint = None
    if isinstance(data, dict) and isinstance(data.get("hint"), str):
        hint = data["hint"][:500] or None
    if status in (401, 403):
        return Outcome.permanent(
            f"HTTP {status}: the processing key was refused",
            http_status=status,
            vendor_code=str(code) if code is not None else None,
            hint=hint,
            opens_circuit=True,
        )
    if not isinstance(data, dict):
        # A proxy or maintenance page instead of Maxma's JSON.
        if status == 200:
            return Outcome.retryable("HTTP 200 without a JSON object", http_status=status)
        return Outcome.permanent(f"HTTP {status} without a JSON object", http_status=status)
    if code is not None and code != 0:
        desc = str(data.get("description") or "")
        vc = str(code)
        if code in ALREADY_EXISTS:
            return Outcome.success(ALREADY_EXISTS[code], http_status=status, vendor_code=vc)
        if code in ALREADY_DONE:
            return Outcome.success(ALREADY_DONE[code], http_status=status, vendor_code=vc)
        if code in TRY_LATER:
            return Outcome.retryable(
                f"Maxma {code}: {desc or TRY_LATER[code]}", http_status=status, vendor_code=vc, hint=hint
            )
        if code in BACK_OFF:
            return Outcome.retryable(
                f"Maxma {code}: {desc or BACK_OFF[code]}", http_status=status, vendor_code=vc, hint=hint,
                throttle=True,
            )  # fmt: skip
        if code in CONNECTION_BROKEN:
            return Outcome.permanent(
                f"Maxma {code}: {desc or CONNECTION_BROKEN[code]}", http_status=status, vendor_code=vc,
                hint=hint or CONNECTION_BROKEN[code], opens_circuit=True,
            )  # fmt: skip
        return Outcome.permanent(f"Maxma {code}: {desc}", http_status=status, vendor_code=vc, hint=hint)
    if status != 200:
        return Outcome.permanent(f"HTTP {status}", http_status=status)
    client = data.get("client")
    ref = None
    if isinstance(client, dict):
        ref = client.get("cardString") or client.get("card") or client.get("externalId")
    return Outcome.success(http_status=status, target_ref=str(ref) if ref is not None else None)


class MaxmaClient:
    """One Maxma account (one processing key)."""

    def __init__(
        self, transport: httpx.AsyncBaseTransport, base_url: str, processing_key: str, timeout_s: float
    ) -> None:
        self._transport = transport
        self._base = base_url.rstrip("/")
        # Parsed once per method: URL parsing is a visible share of a delivery's CPU at 1,000/s.
        self._urls: dict[str, httpx.URL] = {}
        self._key = processing_key
        self._timeout = timeout_s

    async def call(self, method: str, body: dict[str, Any], *, idempotency_key: str) -> Outcome:
        headers = {
            "X-Processing-Key": self._key,
            "Accept": "application/json",
            "Accept-Language": "ru",
            # Maxma documents no such header; receivers that log it can still dedupe by it.
            "Idempotency-Key": idempotency_key,
        }
        try:
            url = self._urls.get(method) or self._urls.setdefault(method, httpx.URL(f"{self._base}/{method}"))
            resp = await send(
                self._transport, "POST", url, json=body, headers=headers, timeout_s=self._timeout
            )
        except httpx.TransportError as e:
            return error_outcome(e)
        return classify(resp.status_code, resp.headers, resp.content)

    async def new_client(self, body: dict[str, Any], *, idempotency_key: str) -> Outcome:
        return await self.call("new-client", body, idempotency_key=idempotency_key)

    async def update_client(self, body: dict[str, Any], *, idempotency_key: str) -> Outcome:
        return await self.call("update-client", body, idempotency_key=idempotency_key)

    async def set_order(self, body: dict[str, Any], *, idempotency_key: str) -> Outcome:
        return await self.call("v2/set-order", body, idempotency_key=idempotency_key)

    async def confirm_order(self, body: dict[str, Any], *, idempotency_key: str) -> Outcome:
        return await self.call("confirm-order", body, idempotency_key=idempotency_key)

    async def cancel_order(self, body: dict[str, Any], *, idempotency_key: str) -> Outcome:
        return await self.call("cancel-order", body, idempotency_key=idempotency_key)


def exists(outcome: Outcome) -> bool:
    """Maxma said the client exists (24 by phone, 30 by externalId): nothing was created."""
    return outcome.ok and outcome.vendor_code in ("24", "30")


def already_done(outcome: Outcome) -> bool:
    """Maxma said the order was already processed (17, 32): a replay, success."""
    return outcome.ok and outcome.vendor_code in ("17", "32")


def client_not_found(outcome: Outcome) -> bool:
    return outcome.vendor_code == str(CLIENT_NOT_FOUND) and not outcome.ok


def order_not_found(outcome: Outcome) -> bool:
    return outcome.vendor_code == str(ORDER_NOT_FOUND) and not outcome.ok
