"""The floor of the end-to-end benchmark: the same webhook forwarded to Maxma by a bare FastAPI endpoint.

No Kafka, no ledger, no retries: ``GET /hooks/klientiks/{token}/client-created?...`` answers 202 at once and
a background task turns the query into a ``new-client`` request with the relay's own code (the normalizer's
:func:`~services.ingest.parsing.normalize`, Maxma's :func:`~services.maxma.mapping.new_client_body` and
:class:`~services.maxma.client.MaxmaClient` on one shared :func:`~services.common.httpclient.make_transport`
pool) and sends it. What the relay adds on top of this is what Kafka, the ledger and the roles cost.

Served by uvicorn like the relay's roles (``services.cli.roles.serve``)::

    python -m bench.floor --port 8099 --sandbox-url http://127.0.0.1:8090 --key-file work/key

``GET /_floor/stats`` counts the forwards (sent, answered ok, failed); ``GET /healthz`` answers ok.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from bench.stack import TOKEN
from services.common import heap
from services.common.config import DeliverySettings, SourceConfig
from services.common.events import new_event_id, utcnow
from services.common.httpclient import make_transport
from services.ingest.inbox import InboxRecord
from services.ingest.parsing import Normalized, normalize
from services.maxma.client import MaxmaClient
from services.maxma.mapping import new_client_body

# The benchmark's source as the relay reads it: the clock and phone region of the normalizer (defaults).
SOURCE = SourceConfig.model_validate({"name": "bench", "token": TOKEN})


def create_floor(sandbox_url: str, key: str, *, gc_freeze: bool = True, token: str = TOKEN) -> FastAPI:
    stats = {"received": 0, "sent": 0, "ok": 0, "failed": 0}
    tasks: set[asyncio.Task[None]] = set()
    transport = make_transport(DeliverySettings().max_in_flight)
    maxma = MaxmaClient(transport, sandbox_url, key, timeout_s=15.0)

    async def forward(record: InboxRecord) -> None:
        ok = False
        try:
            result = normalize(record, zone=SOURCE.zone, phone_region=SOURCE.phone_region)
            if isinstance(result, Normalized):
                stats["sent"] += 1
                outcome = await maxma.new_client(new_client_body(result.event), idempotency_key=record.id)
                ok = outcome.ok
        except Exception as e:  # counted, never retried: the floor has no second chance
            print(f"forward failed: {e!r}", file=sys.stderr)
        stats["ok" if ok else "failed"] += 1

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        heap.freeze(gc_freeze)
        try:
            yield
        finally:
            heap.unfreeze(gc_freeze)
            if tasks:
                await asyncio.wait(tasks, timeout=10)
            await transport.aclose()

    app = FastAPI(title="e2e floor", lifespan=lifespan, openapi_url=None)

    @app.get("/hooks/klientiks/{hook_token}/client-created")
    async def hook(hook_token: str, request: Request) -> Response:
        if not hmac.compare_digest(hook_token.encode(), token.encode()):
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        stats["received"] += 1
        record = InboxRecord(
            id=new_event_id(),
            source=SOURCE.name,
            event="client-created",
            received_at=utcnow(),
            method="GET",
            query=request.url.query,
        )
        task = asyncio.create_task(forward(record))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return JSONResponse({"event_id": record.id}, status_code=202)

    @app.get("/_floor/stats")
    async def floor_stats() -> dict[str, int]:
        return stats

    @app.get("/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    return app


def main() -> None:
    from services.cli.roles import serve

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sandbox-url", required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--gc-freeze", choices=("on", "off"), default="on")
    args = parser.parse_args()
    key = args.key_file.read_text().strip()
    serve(create_floor(args.sandbox_url, key, gc_freeze=args.gc_freeze == "on"), args.host, args.port)


if __name__ == "__main__":
    main()
