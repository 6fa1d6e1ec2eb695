"""Health, readiness and metrics for the worker processes: FastStream apps and delivery services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import make_asgi_app

from services.common.kafka import ensure_topics
from services.common.ledger import Ledger, upgrade

if TYPE_CHECKING:
    from faststream.kafka import KafkaBroker

    from services.common.delivery.runtime import DeliveryRuntime

Check = Callable[[], Awaitable[bool]]


def worker_routes(broker: KafkaBroker, checks: Sequence[tuple[str, Check]] = ()) -> list[tuple[str, Any]]:
    """``/healthz`` (alive), ``/readyz`` (broker and every check reachable), ``/metrics``."""
    # Imported here so the delivery services, which use runtime_app below, do not load FastStream.
    from faststream.asgi import AsgiResponse, get

    @get(include_in_schema=False)
    async def healthz(scope: Any) -> AsgiResponse:
        return AsgiResponse(b"ok", 200)

    @get(include_in_schema=False)
    async def readyz(scope: Any) -> AsgiResponse:
        failed = [] if await broker.ping(timeout=2) else ["kafka"]
        for name, check in checks:
            if not await check():
                failed.append(name)
        if failed:
            return AsgiResponse(f"unreachable: {', '.join(failed)}".encode(), 503)
        return AsgiResponse(b"ready", 200)

    return [("/healthz", healthz), ("/readyz", readyz), ("/metrics", make_asgi_app())]


def runtime_app(
    runtime: DeliveryRuntime,
    ledger: Ledger,
    *,
    title: str,
    migrate: bool = False,
    closing: Sequence[Callable[[], Awaitable[None]]] = (),
) -> FastAPI:
    """The HTTP face of a delivery service: the runtime runs for the app's lifespan."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            await upgrade(ledger.engine)
        await ensure_topics(runtime.settings.kafka)
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()
            for close in closing:
                await close()
            await ledger.close()

    app = FastAPI(title=title, lifespan=lifespan, openapi_url=None)
    app.mount("/metrics", make_asgi_app())

    @app.get("/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/readyz")
    async def readyz() -> PlainTextResponse:
        failed = [
            name for name, check in (("kafka", runtime.ready), ("database", ledger.ping)) if not await check()
        ]
        if failed:
            return PlainTextResponse(f"unreachable: {', '.join(failed)}", status_code=503)
        return PlainTextResponse("ready")

    return app
