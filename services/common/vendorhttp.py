"""What every vendor client shares: one-call sends on the pooled transport, Retry-After, what is worth a retry.

A vendor client (``services/<target>/client.py``) keeps only what is the vendor's own: its URLs, headers and
auth, and its error-code table. Everything about HTTP itself lives here:

* :func:`send` builds one request (a JSON or form body, or none), sends it straight to the transport of
  :func:`services.common.httpclient.make_transport` and returns the response with its body read;
* :func:`parse_retry_after` reads ``Retry-After`` in seconds or as an HTTP date;
* :func:`status_failure` and :func:`error_failure` say whether an HTTP status or an exception of
  :func:`send` is worth another attempt (timeouts, transport errors, 408, 429 and 5xx are; the rest is the
  vendor's to judge); :func:`status_outcome` and :func:`error_outcome` give the same as an
  :class:`~services.common.outcome.Outcome` for a delivery target.

How long to wait before the next attempt is not decided here: the delivery policy keeps at least its
throttle floor after an outcome with ``throttle`` (429, 408, timeouts), and caps are the caller's.

Example, a delivery target's client::

    async def create(self, body: dict[str, Any], idempotency_key: str) -> Outcome:
        headers = {"Authorization": f"Bearer {self._key}", "Idempotency-Key": idempotency_key}
        try:
            resp = await send(self._transport, "POST", self._create_url, json=body, headers=headers,
                              timeout_s=self._timeout_s)
        except httpx.TransportError as e:
            return error_outcome(e)
        retry = status_outcome(resp.status_code, resp.headers)
        if retry is not None:
            return retry
        return self._classify(resp.status_code, resp.content)  # the vendor's own error codes
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from datetime import UTC
from enum import StrEnum
from typing import Any

import httpx

from services.common.outcome import Outcome

__all__ = [
    "Failure",
    "error_failure",
    "error_outcome",
    "parse_retry_after",
    "send",
    "status_failure",
    "status_outcome",
]


class Failure(StrEnum):
    """Why a call may work if tried again; the values are stable reason codes (metrics, logs)."""

    TIMEOUT = "timeout"  # ours, or the server's 408
    NETWORK = "network"  # no answer: refused, reset, DNS, TLS, a broken response
    RATE_LIMITED = "rate_limited"  # 429
    SERVER_ERROR = "server_error"  # 5xx

    @property
    def throttle(self) -> bool:
        """The vendor is overloaded (or slow to us): back off harder than the schedule says."""
        return self in (Failure.TIMEOUT, Failure.RATE_LIMITED)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header: whole seconds, or an HTTP date (a past date is 0).

    None when absent or unreadable (a negative or fractional number is unreadable). Not capped: the
    caller knows how long it can afford to wait.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²": str.isdigit() accepts it, float() does not
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = now if now is not None else time.time()
    return max(0.0, when.timestamp() - current)


def status_failure(status: int) -> Failure | None:
    """408, 429 and 5xx are worth a retry; None for every other status (the vendor's to classify)."""
    if status == 408:
        # The server gave up waiting for our request: a timeout like any other.
        return Failure.TIMEOUT
    if status == 429:
        return Failure.RATE_LIMITED
    if status >= 500:
        return Failure.SERVER_ERROR
    return None


def error_failure(exc: BaseException) -> Failure | None:
    """A timeout (httpx's, or :func:`send`'s ``deadline_s``) or a transport error; None for anything else."""
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return Failure.TIMEOUT
    if isinstance(exc, httpx.TransportError):
        return Failure.NETWORK
    return None


def status_outcome(status: int, headers: httpx.Headers) -> Outcome | None:
    """A retryable outcome for 408, 429 and 5xx, with the answer's Retry-After; None for other statuses."""
    failure = status_failure(status)
    if failure is None:
        return None
    return Outcome.retryable(
        f"HTTP {status}",
        http_status=status,
        retry_after=parse_retry_after(headers.get("retry-after")),
        throttle=failure.throttle,
        # A gateway that gave up waiting for the vendor (504) had passed the request on: it may have acted.
        maybe_sent=status == 504,
    )


def error_outcome(exc: httpx.TransportError | TimeoutError) -> Outcome:
    """The retryable outcome of a call that got no answer; only the exception's type, never its message."""
    # The message of a transport error may carry the URL, and some vendors put credentials in it.
    # Only a connection never made is sure not to have reached the target.
    maybe = not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout)
    if error_failure(exc) is Failure.TIMEOUT:
        return Outcome.retryable(f"timeout: {type(exc).__name__}", throttle=True, maybe_sent=maybe)
    return Outcome.retryable(f"connection failed: {type(exc).__name__}", maybe_sent=maybe)


async def send(
    transport: httpx.AsyncBaseTransport,
    method: str,
    url: httpx.URL | str,
    *,
    json: Any = None,
    form: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float,
    deadline_s: float | None = None,
) -> httpx.Response:
    """One request straight to the transport (a ``json`` or a ``form`` body, or none); its body read.

    ``timeout_s`` bounds each phase (connect, each read, each write, the pool wait); ``deadline_s`` also
    bounds the whole call, so a server that trickles its answer cannot hold it longer (``TimeoutError``).
    Raises what the transport raises (:class:`httpx.TransportError`); a status is never an exception.

    A vendor call needs no cookie jar, redirects, auth flow or URL merging: skipping httpx's client layer
    saves ~20% of a delivery's CPU, and ``httpx.AsyncClient.send`` would log the URL, which may carry
    credentials.
    """
    if json is not None and form is not None:
        raise ValueError("give json or form, not both")
    request = httpx.Request(
        method,
        url,
        json=json,
        data=form,
        headers=headers,
        extensions={"timeout": httpx.Timeout(timeout_s).as_dict()},
    )
    if deadline_s is None:
        return await _exchange(transport, request)
    async with asyncio.timeout(deadline_s):
        return await _exchange(transport, request)


async def _exchange(transport: httpx.AsyncBaseTransport, request: httpx.Request) -> httpx.Response:
    response = await transport.handle_async_request(request)
    try:
        await response.aread()
    finally:
        await response.aclose()
    return response
