"""The ingest API role: authenticate the source, enforce limits, publish (or spool) the raw request, 202."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import make_asgi_app
from pydantic import BaseModel
from starlette.requests import ClientDisconnect

from services.common import heap
from services.common.config import Settings, SourceConfig
from services.common.delivery.protection import TokenBucket
from services.common.events import EventName, new_event_id, utcnow
from services.common.ledger import Ledger, upgrade
from services.common.logging import get_logger
from services.common.metrics import (
    INBOX_PUBLISH_LATENCY,
    INGEST_DISCONNECTS,
    INGEST_REFUSED,
    WEBHOOK_LATENCY,
    WEBHOOKS,
)
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import KNOWN, ROUTING, Params, ParamsError, request_params, routing_key
from services.ingest.spool import InboxWriter, Unavailable

MAX_BODY = 64 * 1024
MAX_QUERY = 8 * 1024
EVENTS = frozenset(e.value for e in EventName)
# After a 408 or 411 the rest of the connection cannot be framed as requests.
_CLOSE = {"Connection": "close"}

log = get_logger("relay.ingest.api")
_log_level = logging.getLogger("relay.ingest.api")  # the stdlib logger behind `log`


def _levels_filtered_first() -> bool:
    """Whether structlog's first processor is ``filter_by_level`` (as :func:`configure_logging` sets it up).

    Then ``log.info`` with INFO off is dropped at once, but only after building a bound logger: ~7% of a
    webhook's CPU. Checking the level before the call skips exactly what would have been dropped.
    """
    processors = structlog.get_config()["processors"]
    return bool(processors) and processors[0] is structlog.stdlib.filter_by_level


class Accepted(BaseModel):
    event_id: str


class Problem(BaseModel):
    detail: str


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "The body cannot be read as parameters"},
    404: {"model": Problem, "description": "Unknown token or event (indistinguishable)"},
    408: {
        "model": Problem,
        "description": "The headers (`ingest.header_timeout_s`, 10 s) or the body (`ingest.body_timeout_s`, "
        "10 s) did not arrive in time; the connection is closed",
    },
    411: {
        "model": Problem,
        "description": "A POST with neither Content-Length nor Transfer-Encoding: chunked; nothing is published",
    },
    413: {"model": Problem, "description": "The body is over 64 KiB"},
    414: {"model": Problem, "description": "The query string is over 8 KiB"},
    429: {
        "model": Problem,
        "description": "The source is over its webhook rate limit",
        "headers": _RETRY_AFTER,
    },
    431: {
        "model": Problem,
        "description": "The request line and headers are over `ingest.max_header_bytes` (16 KiB); "
        "the connection is closed",
    },
    503: {
        "model": Problem,
        "description": "Kafka and the spool are both unavailable, or the server holds `ingest.max_connections` "
        "connections already (then with Retry-After, and the connection is closed); retry later",
        "headers": _RETRY_AFTER,
    },
}


def _webhook_parameters(*, with_body: bool) -> dict[str, Any]:
    """The free-form webhook parameters in OpenAPI: the seed names listed, any other name accepted."""
    params = {
        "type": "object",
        "properties": {name: {"type": "string"} for name in sorted(KNOWN)},
        "additionalProperties": {"type": "string"},
    }
    extra: dict[str, Any] = {
        "parameters": [
            {
                "name": "params",
                "in": "query",
                "required": False,
                "style": "form",
                "explode": True,
                "description": "The Klientiks URL template's parameters (`client_id`, `client_phone`, ...)",
                "schema": params,
            }
        ]
    }
    if with_body:
        extra["requestBody"] = {
            "required": False,
            "description": "More parameters, merged after the query string's",
            "content": {
                "application/x-www-form-urlencoded": {"schema": params},
                "application/json": {"schema": params},
            },
        }
    return extra


@dataclass(frozen=True)
class _Token:
    digest: bytes
    source: SourceConfig


class SourceDirectory:
    """Finds a source by its token in constant time: every configured token is compared, always."""

    def __init__(self, sources: list[SourceConfig]) -> None:
        self._tokens = [_Token(_digest(s.token.get_secret_value()), s) for s in sources]

    def find(self, token: str) -> SourceConfig | None:
        # Comparing fixed-length digests keeps timing independent of the token's length and content.
        probe = _digest(token)
        found = None
        for t in self._tokens:
            if hmac.compare_digest(t.digest, probe):
                found = t.source
        return found


class _WebhookRoute(APIRoute):
    """The webhook route: documented by FastAPI from ``receive``'s signature like any other route, served
    without FastAPI's per-request dependency solving.

    ``receive(token, event, request)`` takes two path strings (no validation can fail) and the request,
    and parses the query string itself: FastAPI's generic handler would parse that query string a second
    time, into parameters nobody reads, and costs about a fifth of the request's CPU. Matching, 405s and
    errors are unchanged (``HTTPException`` -> the app's handlers -> the same JSON answers). Should the
    endpoint ever take anything else (a dependency, a body model), FastAPI's generic handler is used.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        d = self.dependant
        only_path_and_request = (
            [p.name for p in d.path_params] == ["token", "event"]
            and d.request_param_name == "request"
            and not (d.dependencies or d.query_params or d.header_params or d.cookie_params or d.body_params)
        )
        if not only_path_and_request:
            return super().get_route_handler()
        endpoint = self.endpoint

        async def handle(request: Request) -> Response:
            path = request.path_params
            response: Response = await endpoint(path["token"], path["event"], request)
            return response

        return handle


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _not_found() -> HTTPException:
    # Exactly what FastAPI answers for a path it does not know: an unknown token must look the same.
    return HTTPException(status_code=404, detail="Not Found")


def create_api(
    settings: Settings,
    *,
    producer_factory: Callable[[], AIOKafkaProducer] | None = None,
    migrate: bool = False,
) -> FastAPI:
    """Assemble the ingest API. Nothing connects until the app starts."""
    directory = SourceDirectory(settings.sources)
    limits = {
        s.name: TokenBucket(
            s.rate_limit_per_s or settings.ingest.rate_limit_per_s, settings.ingest.rate_limit_burst
        )
        for s in settings.sources
    }
    body_timeout_s = settings.ingest.body_timeout_s
    ledger = Ledger.from_url(settings.database_url)
    inbox = InboxWriter(settings, ledger, producer_factory)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            await upgrade(ledger.engine)
        await inbox.start()
        log.info("ingest api started", sources=len(settings.sources), spooling=inbox.spooling)
        # Under load, full collections walked the ~140k start-up objects, stalling requests 75-300 ms.
        heap.freeze(settings.gc_freeze)
        try:
            yield
        finally:
            heap.unfreeze(settings.gc_freeze)
            await inbox.stop()
            await ledger.close()

    app = FastAPI(
        title="klientiks-relay ingest",
        version="1",
        lifespan=lifespan,
        description="Receives Klientiks CRM webhooks and publishes them to Kafka.",
    )
    app.mount("/metrics", make_asgi_app())

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> Response:
        # Ready while webhooks can be kept somewhere: Kafka, or the spool while Kafka is away.
        kafka, store = await asyncio.gather(inbox.kafka_ok(), ledger.ping())
        body = f"kafka {'ok' if kafka else 'unreachable'}, spool {'ok' if store else 'unreachable'}"
        return PlainTextResponse(body, status_code=200 if kafka or store else 503)

    async def receive(token: str, event: str, request: Request) -> Response:
        started = time.perf_counter()
        source = directory.find(token)
        if source is None or event not in EVENTS:
            WEBHOOKS.labels("unknown", "unknown", "not_found").inc()
            raise _not_found()
        wait = limits[source.name].try_take()
        if wait:
            WEBHOOKS.labels(source.name, event, "rate_limited").inc()
            return JSONResponse(
                {"detail": f"source {source.name!r} is over its webhook rate limit; retry later"},
                status_code=429,
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        query = request.url.query
        if len(query) > MAX_QUERY:
            WEBHOOKS.labels(source.name, event, "too_large").inc()
            raise HTTPException(414, f"the query string is over {MAX_QUERY} bytes")
        body = await _read_body(request, source.name, event, body_timeout_s)
        content_type = request.headers.get("content-type")
        try:
            pairs = request_params(query, content_type, body)
        except ParamsError as e:
            WEBHOOKS.labels(source.name, event, "bad_request").inc()
            raise HTTPException(400, str(e)) from None
        record = InboxRecord.build(
            id=new_event_id(),
            source=source.name,
            event=event,
            received_at=utcnow(),
            method=request.method,
            query=query,
            content_type=content_type,
            body=body,
        )
        t0 = time.perf_counter()
        try:
            outcome = await inbox.write(
                record.id, routing_key(source.name, Params.of(pairs, ROUTING)).encode(), record.to_bytes()
            )
        except Unavailable:
            WEBHOOKS.labels(source.name, event, "unavailable").inc()
            log.error("webhook refused: Kafka and the spool are both down", source=source.name,
                      webhook=event, event_id=record.id)  # fmt: skip
            raise HTTPException(503, "the event store is unavailable; retry later") from None
        if outcome == "published":
            INBOX_PUBLISH_LATENCY.observe(time.perf_counter() - t0)
            WEBHOOKS.labels(source.name, event, "accepted").inc()
        else:
            WEBHOOKS.labels(source.name, event, "spooled").inc()
        elapsed = time.perf_counter() - started
        WEBHOOK_LATENCY.labels(event).observe(elapsed)
        if _log_level.isEnabledFor(logging.INFO) or not _levels_filtered_first():
            log.info(
                "webhook accepted",
                source=source.name,
                webhook=event,
                event_id=record.id,
                method=request.method,
                params=len(pairs),
                missing=sorted(Params.of(pairs).missing),
                spooled=outcome == "spooled",
                ms=round(elapsed * 1000, 2),
            )
        return JSONResponse({"event_id": record.id}, status_code=202)

    # Klientiks may send either method; one operation id each keeps the OpenAPI document valid.
    for method in ("GET", "POST"):
        app.router.add_api_route(
            "/hooks/klientiks/{token}/{event}",
            receive,
            methods=[method],
            status_code=202,
            response_model=Accepted,
            responses=_ERRORS,
            summary=f"Receive one Klientiks webhook ({method}: query string, form or JSON parameters)",
            operation_id=f"receive_webhook_{method.lower()}",
            openapi_extra=_webhook_parameters(with_body=method == "POST"),
            route_class_override=_WebhookRoute,
        )
    return app


async def _read_body(request: Request, source: str, event: str, timeout_s: float) -> bytes:
    headers = request.headers
    declared = headers.get("content-length")
    if declared is None and "transfer-encoding" not in headers:
        # Without either header an HTTP/1.1 request has no body, and whatever the client sent as one is
        # read as the next request: a POST would be published without its parameters, then answered 400.
        if request.method == "POST":
            WEBHOOKS.labels(source, event, "length_required").inc()
            raise HTTPException(411, "a POST needs Content-Length or Transfer-Encoding: chunked", _CLOSE)
        return b""
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        WEBHOOKS.labels(source, event, "too_large").inc()
        raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY:
                    WEBHOOKS.labels(source, event, "too_large").inc()
                    raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
                chunks.append(chunk)
    except TimeoutError:
        WEBHOOKS.labels(source, event, "timeout").inc()
        INGEST_REFUSED.labels("body_timeout").inc()
        log.info("webhook body too slow", webhook=event, received=size, timeout_s=timeout_s)
        raise HTTPException(408, f"the body did not arrive within {timeout_s:g} s", _CLOSE) from None
    except ClientDisconnect:
        WEBHOOKS.labels(source, event, "disconnected").inc()
        INGEST_DISCONNECTS.labels("body").inc()
        log.info("client disconnected before the end of the body", webhook=event, received=size)
        # Nobody reads this answer; nginx's "client closed request" says what happened.
        raise HTTPException(499, "client closed the connection") from None
    return b"".join(chunks)
