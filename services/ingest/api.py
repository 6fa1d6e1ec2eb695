"""The ingest API role: authenticate the source, publish the raw request to the inbox, answer 202."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import make_asgi_app
from pydantic import BaseModel

from services.common.config import Settings, SourceConfig
from services.common.events import EventName, new_event_id, utcnow
from services.common.kafka import INBOX, ensure_topics, make_producer
from services.common.logging import get_logger
from services.common.metrics import INBOX_PUBLISH_LATENCY, WEBHOOK_LATENCY, WEBHOOKS
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import Params, ParamsError, request_params, routing_key

MAX_BODY = 64 * 1024
MAX_QUERY = 8 * 1024
PUBLISH_TIMEOUT_S = 5.0
EVENTS = frozenset(e.value for e in EventName)

log = get_logger("relay.ingest.api")


class Accepted(BaseModel):
    event_id: str


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


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _not_found() -> HTTPException:
    # Exactly what FastAPI answers for a path it does not know: an unknown token must look the same.
    return HTTPException(status_code=404, detail="Not Found")


def create_api(
    settings: Settings, *, producer_factory: Callable[[], AIOKafkaProducer] | None = None
) -> FastAPI:
    """Assemble the ingest API. Nothing connects until the app starts."""
    directory = SourceDirectory(settings.sources)
    producer_holder: dict[str, AIOKafkaProducer] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await ensure_topics(settings.kafka)
        producer = producer_factory() if producer_factory else make_producer(settings.kafka)
        await producer.start()
        producer_holder["p"] = producer
        log.info("ingest api started", sources=len(settings.sources))
        try:
            yield
        finally:
            await producer.stop()

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
        producer = producer_holder.get("p")
        ok = False
        if producer is not None:
            try:
                await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout=2)
                ok = True
            except Exception:
                ok = False
        return PlainTextResponse("ready" if ok else "kafka unreachable", status_code=200 if ok else 503)

    async def receive(token: str, event: str, request: Request) -> JSONResponse:
        started = time.perf_counter()
        source = directory.find(token)
        if source is None or event not in EVENTS:
            WEBHOOKS.labels("unknown", "not_found").inc()
            raise _not_found()
        query = request.url.query
        if len(query) > MAX_QUERY:
            WEBHOOKS.labels(event, "too_large").inc()
            raise HTTPException(414, f"the query string is over {MAX_QUERY} bytes")
        body = await _read_body(request, event)
        content_type = request.headers.get("content-type")
        try:
            params = Params.of(request_params(query, content_type, body))
        except ParamsError as e:
            WEBHOOKS.labels(event, "bad_request").inc()
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
        producer = producer_holder["p"]
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(
                producer.send_and_wait(
                    INBOX, record.to_bytes(), key=routing_key(source.name, params).encode()
                ),
                timeout=PUBLISH_TIMEOUT_S,
            )
        except Exception as e:
            WEBHOOKS.labels(event, "unavailable").inc()
            log.error(
                "inbox publish failed", source=source.name, webhook=event, event_id=record.id, error=repr(e)
            )
            raise HTTPException(503, "the event store is unavailable; retry later") from None
        INBOX_PUBLISH_LATENCY.observe(time.perf_counter() - t0)
        WEBHOOKS.labels(event, "accepted").inc()
        elapsed = time.perf_counter() - started
        WEBHOOK_LATENCY.labels(event).observe(elapsed)
        log.info(
            "webhook accepted",
            source=source.name,
            webhook=event,
            event_id=record.id,
            method=request.method,
            params=len(params.values),
            missing=sorted(params.missing),
            ms=round(elapsed * 1000, 2),
        )
        return JSONResponse({"event_id": record.id}, status_code=202)

    # Klientiks may send either method; one operation id each keeps the OpenAPI document valid.
    for method in ("GET", "POST"):
        app.add_api_route(
            "/hooks/klientiks/{token}/{event}",
            receive,
            methods=[method],
            status_code=202,
            response_model=Accepted,
            responses={404: {"description": "Unknown token or event (indistinguishable)"}},
            summary=f"Receive one Klientiks webhook ({method}: query string, form or JSON parameters)",
            operation_id=f"receive_webhook_{method.lower()}",
        )
    return app


async def _read_body(request: Request, event: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY:
        WEBHOOKS.labels(event, "too_large").inc()
        raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            WEBHOOKS.labels(event, "too_large").inc()
            raise HTTPException(413, f"the body is over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
