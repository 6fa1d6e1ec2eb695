"""The Klientiks REST API client: the only code that knows Klientiks URLs and error answers.

Every call is ``GET {base_url}/{action}/a/{account_id}/u/{user_id}/t/{access_token}/{rest}``. The access
token is a path segment, so the URL is a secret: it never goes into a message, a log line or an exception
chain, and requests go straight to the transport (``httpx.AsyncClient.send`` would log the URL at INFO).

What the sources say (S-ZD Klientiks helpdesk, S-GOCX github.com/temoon/go-clientix, S-ALI
github.com/alinoksha/klientiks):

* confirmed [S-ZD]: ``getAppointment/../id/{id}``; the visit's clients are only in its
  ``appointment_client_links`` property.
* seen in third-party code [S-ALI, public scripts]: ``list/../m/getClientByPhone/phone/{digits}``;
  [S-GOCX, S-ALI] ``list/../m/clients/date/{YYYY-MM-DD}?offset=&limit=`` (clients changed since a date) with
  the answer ``{"offset", "items": [...], "count", "limit"}``; appointment fields ``id, client_id,
  executor_id, start_datetime, status, appointed_services[{id, service_id, name}], created, modified, paid``;
  timestamps are Moscow local ``YYYY-MM-DD HH:MM:SS(.ffffff)``; phones are digits without ``+``.
* not found anywhere: a client-by-id endpoint. :meth:`KlientiksApiClient.get_client` with only an id pages
  through the clients changed since a recent date (a new client, or one who just booked, was modified
  recently) and gives up after ``max_scan_pages``.

Assumed (no source): the shape of a ``getAppointment`` answer (a bare object; ``{"object": ...}`` and
``{"items": [...]}`` are accepted too) and of a link (``client_id``, maybe a nested ``client``); "not found"
is HTTP 404 or an empty answer (``null``, ``[]``, ``{}``, no items); bad credentials are HTTP 401/403, a
redirect, or an HTML login page; a rate limit is HTTP 429, maybe with ``Retry-After``; a JSON object with
``status`` false/"error" or non-empty ``errors`` is a refusal.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import quote
from zoneinfo import ZoneInfo

import httpx

from services.common.config import KlientiksApi, Settings
from services.common.delivery.protection import TokenBucket
from services.common.events import CloudEvent
from services.common.httpclient import make_transport
from services.common.logging import get_logger
from services.common.metrics import KLIENTIKS_REQUESTS
from services.common.vendorhttp import Failure, error_failure, parse_retry_after, send, status_failure
from services.ingest.enrichment import client_from_appointment, client_id_from_appointment

__all__ = [
    "KlientiksApiClient",
    "KlientiksApis",
    "KlientiksError",
    "RateLimiter",
    "account_limiter",
]

log = get_logger(__name__)

_ID = re.compile(r"\d{1,20}")
_HEADERS = {"Accept": "application/json", "User-Agent": "klientiks-relay"}


class KlientiksError(Exception):
    """A Klientiks call that gave no answer; ``reason`` is a short stable code, never the URL."""

    def __init__(
        self,
        reason: str,
        *,
        retryable: bool,
        status: int | None = None,
        action: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.reason = reason
        self.retryable = retryable
        self.status = status
        self.action = action
        self.retry_after = retry_after
        where = f"Klientiks {action}" if action else "Klientiks"
        http = f" (HTTP {status})" if status is not None else ""
        kind = "retryable" if retryable else "permanent"
        super().__init__(f"{where}: {reason}{http}, {kind}")


# ------------------------------------------------------------------------------------------------ rate limit


class RateLimiter:
    """At most ``rate_per_s`` request starts per second, burst 1, plus holds ordered by the account."""

    def __init__(self, rate_per_s: float) -> None:
        self._bucket = TokenBucket(rate_per_s, burst=1)
        self._held_until = 0.0

    @property
    def rate_per_s(self) -> float:
        return self._bucket.rate_per_s

    def lower(self, rate_per_s: float) -> None:
        """Two sources on one account: the stricter limit holds for both."""
        self._bucket.rate_per_s = min(self._bucket.rate_per_s, rate_per_s)

    def hold(self, seconds: float) -> None:
        """No start before ``seconds`` from now (the account was told to wait, e.g. by Retry-After)."""
        self._held_until = max(self._held_until, time.monotonic() + seconds)

    async def acquire(self) -> float:
        """Wait for this caller's slot; return the seconds waited."""
        waited = 0.0
        while True:
            held = self._held_until - time.monotonic()
            if held > 0:
                await asyncio.sleep(held)
                waited += held
            waited += await self._bucket.acquire()
            # A hold that came while we waited for the token moves us back behind it.
            if self._held_until <= time.monotonic():
                return waited


_LIMITERS: dict[str, RateLimiter] = {}


def account_limiter(account_id: str, rate_per_s: float) -> RateLimiter:
    """The process-wide limiter of one Klientiks account (created, or lowered to ``rate_per_s``)."""
    limiter = _LIMITERS.get(account_id)
    if limiter is None:
        limiter = _LIMITERS[account_id] = RateLimiter(rate_per_s)
    else:
        limiter.lower(rate_per_s)
    return limiter


# ------------------------------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class _Answer:
    data: Any  # the parsed JSON; None means "Klientiks says it does not exist"


_NOT_FOUND = _Answer(None)


def _is_html(headers: httpx.Headers, body: bytes) -> bool:
    return "html" in headers.get("content-type", "").lower() or body.lstrip()[:1] == b"<"


def _refused(data: Any) -> bool:
    if not isinstance(data, dict) or "id" in data or "items" in data:
        return False
    return data.get("status") in (False, 0, "0", "error", "fail", "false") or bool(data.get("errors"))


def classify(action: str, status: int, headers: httpx.Headers, body: bytes) -> _Answer | KlientiksError:
    """One HTTP answer of Klientiks: data, not found, or a classified error."""
    if 200 <= status < 300:
        if _is_html(headers, body):
            # Klientiks is a web application: without a session it renders its login form.
            return KlientiksError("unauthorized", retryable=False, status=status, action=action)
        if not body.strip():
            return _NOT_FOUND
        try:
            data = json.loads(body)
        except ValueError:
            # A cut-off body or a proxy's page: the next attempt may get the real answer.
            return KlientiksError("bad_response", retryable=True, status=status, action=action)
        if data in (None, [], {}, ""):
            return _NOT_FOUND
        if _refused(data):
            return KlientiksError("api_error", retryable=False, status=status, action=action)
        return _Answer(data)
    retry_after = parse_retry_after(headers.get("retry-after"))
    if 300 <= status < 400 or status in (401, 403):
        # A REST call redirected is a redirect to the login page.
        return KlientiksError("unauthorized", retryable=False, status=status, action=action)
    if status == 404:
        return _NOT_FOUND
    failure = status_failure(status)
    if failure is None:
        return KlientiksError("bad_request", retryable=False, status=status, action=action)
    return KlientiksError(
        failure.value,
        retryable=True,
        status=status,
        action=action,
        # A 408 is about our request, not a pause the server asks of the account.
        retry_after=None if failure is Failure.TIMEOUT else retry_after,
    )


def _items(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        if isinstance(data.get("items"), list):
            data = data["items"]
        elif isinstance(data.get("object"), dict):
            data = [data["object"]]
        else:
            data = [data]
    if not isinstance(data, list):
        return []
    return [item for item in data if isinstance(item, dict)]


def _same_id(item: Mapping[str, Any], wanted: str) -> bool:
    return str(item.get("id")) == wanted


# ------------------------------------------------------------------------------------------------ client


class KlientiksApiClient:
    """One Klientiks account; retries transient failures itself and keeps to the account's rate limit."""

    def __init__(
        self,
        api: KlientiksApi,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        timeout_s: float = 10.0,
        max_retry_after_s: float = 30.0,
        max_scan_pages: int = 3,
        page_size: int = 100,
        limiter: RateLimiter | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.account_id = api.account_id
        self._base = api.base_url.rstrip("/")
        token = api.access_token.get_secret_value()
        self._auth = f"a/{_segment(api.account_id)}/u/{_segment(api.user_id)}/t/{_segment(token)}"
        self._owns_transport = transport is None
        self._transport = transport if transport is not None else make_transport(max_connections=4)
        self._limiter = (
            limiter if limiter is not None else account_limiter(api.account_id, api.rate_limit_per_s)
        )
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._max_retry_after_s = max_retry_after_s
        self._max_scan_pages = max_scan_pages
        self._page_size = page_size

    def __repr__(self) -> str:
        return f"KlientiksApiClient(account_id={self.account_id!r})"

    async def aclose(self) -> None:
        if self._owns_transport:
            await self._transport.aclose()

    # ---- API ---------------------------------------------------------------------------------------------

    async def get_appointment(self, appointment_id: str) -> dict[str, Any] | None:
        """The visit, with its ``appointment_client_links``; None if Klientiks does not know it."""
        appointment_id = _check_id(appointment_id, "getAppointment")
        data = await self._get("getAppointment", f"getAppointment/{self._auth}/id/{appointment_id}")
        items = _items(data)
        return next((i for i in items if _same_id(i, appointment_id)), items[0] if items else None)

    async def get_client(
        self,
        *,
        client_id: str | None = None,
        phone: str | None = None,
        changed_since: date | None = None,
    ) -> dict[str, Any] | None:
        """A client by phone (any format; sent as digits) and/or id; None if not found.

        There is no client-by-id endpoint: an id alone is looked for among the clients changed since
        ``changed_since`` (default: yesterday), at most ``max_scan_pages`` pages; an older client is None.
        """
        if client_id is None and phone is None:
            raise ValueError("give client_id, phone or both")
        if client_id is not None:
            client_id = _check_id(client_id, "clients")
        if phone is not None:
            digits = re.sub(r"\D", "", phone)
            if not 7 <= len(digits) <= 15:
                raise KlientiksError("invalid_argument", retryable=False, action="getClientByPhone")
            data = await self._get("getClientByPhone", f"list/{self._auth}/m/getClientByPhone/phone/{digits}")
            found = _items(data)
            if client_id is not None:
                found = [c for c in found if _same_id(c, client_id)]
            if found:
                # A phone may belong to several cards: prefer a live one, then the last changed.
                found.sort(key=lambda c: (not c.get("deleted"), str(c.get("modified") or "")), reverse=True)
                return found[0]
            if client_id is None:
                return None
        assert client_id is not None
        since = changed_since or (datetime.now(UTC).date() - timedelta(days=1))
        offset = 0
        for _ in range(self._max_scan_pages):
            page, offset_next = await self.list_clients(since, offset=offset)
            match = next((c for c in page if _same_id(c, client_id)), None)
            if match is not None or offset_next is None:
                return match
            offset = offset_next
        return None

    async def list_clients(
        self, changed_since: date, *, offset: int = 0, limit: int | None = None
    ) -> tuple[list[dict[str, Any]], int | None]:
        """One page of the clients changed since a date, and the next page's offset (None: last page)."""
        limit = limit or self._page_size
        data = await self._get(
            "clients",
            f"list/{self._auth}/m/clients/date/{changed_since.isoformat()}",
            {"offset": str(offset), "limit": str(limit)},
        )
        items = _items(data)
        served = data.get("limit") if isinstance(data, dict) else None
        page = served if isinstance(served, int) and served > 0 else limit
        return items, (offset + len(items) if len(items) >= page else None)

    async def fetch_for(
        self, event: CloudEvent, *, zone: ZoneInfo
    ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The appointment and client records that can complete ``event`` (for :func:`enrich`).

        The appointment by its id; its client from the appointment's links, else by the event's phone or
        the client id (looked for among the clients changed since the day before the event).
        """
        data = event.data
        appointment = None
        if data.appointment is not None and data.appointment.id:
            appointment = await self.get_appointment(data.appointment.id)
        client = client_from_appointment(appointment)
        wanted_id = (data.client.id if data.client else None) or client_id_from_appointment(appointment)
        if client is not None and wanted_id and str(client.get("id")) != wanted_id:
            client = None
        phone = data.client.phone if data.client else None
        if client is None and (wanted_id or phone):
            since = event.time.astimezone(zone).date() - timedelta(days=1)
            client = await self.get_client(client_id=wanted_id, phone=phone, changed_since=since)
        return appointment, client

    # ---- transport ---------------------------------------------------------------------------------------

    async def _get(self, action: str, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = httpx.URL(f"{self._base}/{path}", params=params)
        error: KlientiksError | None = None
        for attempt in range(1, self._max_attempts + 1):
            if error is not None:
                await asyncio.sleep(self._delay(attempt - 1, error))
            waited = await self._limiter.acquire()
            started = time.monotonic()
            result = await self._send(action, url)
            elapsed_ms = round((time.monotonic() - started) * 1000, 1)
            status = result.status if isinstance(result, KlientiksError) else result[0]
            answer = (
                result
                if isinstance(result, KlientiksError)
                else classify(action, result[0], result[1], result[2])
            )
            if isinstance(answer, _Answer):
                outcome = "ok" if answer.data is not None else "not_found"
                KLIENTIKS_REQUESTS.labels(action, outcome).inc()
                log.debug(
                    "klientiks request",
                    action=action,
                    attempt=attempt,
                    status=status,
                    outcome=outcome,
                    elapsed_ms=elapsed_ms,
                    waited_ms=round(waited * 1000, 1),
                )
                return answer.data
            error = answer
            KLIENTIKS_REQUESTS.labels(action, error.reason).inc()
            last = not error.retryable or attempt == self._max_attempts
            log.warning(
                "klientiks request failed",
                action=action,
                attempt=attempt,
                max_attempts=self._max_attempts,
                status=status,
                reason=error.reason,
                retrying=not last,
                elapsed_ms=elapsed_ms,
                waited_ms=round(waited * 1000, 1),
            )
            if error.reason == Failure.RATE_LIMITED:
                # The whole account was told to slow down, not only this call.
                self._limiter.hold(self._retry_after(error))
            if last:
                break
        assert error is not None
        raise error

    async def _send(self, action: str, url: httpx.URL) -> tuple[int, httpx.Headers, bytes] | KlientiksError:
        failure: Failure | None = None
        try:
            response = await send(
                self._transport,
                "GET",
                url,
                headers=_HEADERS,
                timeout_s=self._timeout_s,
                deadline_s=self._timeout_s,
            )
        except Exception as e:
            # Anything the transport raises is the network failing: enrichment must not crash on it.
            failure = error_failure(e) or Failure.NETWORK
            if failure is Failure.NETWORK:
                # Only the type: the message of a transport error may carry the URL.
                log.debug("klientiks transport error", action=action, error=type(e).__name__)
        # Built outside the except block, so the httpx exception (and its URL) is not even the __context__.
        if failure is not None:
            return KlientiksError(failure.value, retryable=True, action=action)
        return response.status_code, response.headers, response.content

    def _retry_after(self, error: KlientiksError) -> float:
        return min(error.retry_after or 0.0, self._max_retry_after_s)

    def _delay(self, retry: int, error: KlientiksError) -> float:
        backoff = self._backoff_s * 2.0 ** (retry - 1) * random.uniform(0.5, 1.0)
        return min(max(backoff, self._retry_after(error)), self._max_retry_after_s)


def _segment(value: str) -> str:
    return quote(value, safe="")


def _check_id(value: str, action: str) -> str:
    value = str(value).strip()
    # Ids go into the URL path; anything but digits could point the request at another method.
    if not _ID.fullmatch(value):
        raise KlientiksError("invalid_argument", retryable=False, action=action)
    return value


# ------------------------------------------------------------------------------------------------ registry


class KlientiksApis:
    """The API clients of every source with ``klientiks:`` credentials, on one shared transport."""

    def __init__(
        self, clients: Mapping[str, KlientiksApiClient], transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self._clients = dict(clients)
        self._transport = transport

    @classmethod
    def from_settings(
        cls, settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None, **options: Any
    ) -> KlientiksApis:
        """``options`` are :class:`KlientiksApiClient` keywords (max_attempts, backoff_s, timeout_s, ...)."""
        sources = [s for s in settings.sources if s.klientiks is not None]
        owned = transport is None and bool(sources)
        shared = make_transport(max_connections=10) if owned else transport
        clients = {
            s.name: KlientiksApiClient(s.klientiks, transport=shared, **options)
            for s in sources
            if s.klientiks is not None
        }
        return cls(clients, shared if owned else None)

    def for_source(self, source_name: str) -> KlientiksApiClient | None:
        return self._clients.get(source_name)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        if self._transport is not None:
            await self._transport.aclose()
