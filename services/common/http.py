"""The HTTP face of a delivery service: lifespan of the runtime, health, readiness, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from prometheus_client import make_asgi_app

from services.common.kafka import ensure_topics
from services.common.ledger import Ledger, upgrade

if TYPE_CHECKING:
    from services.common.delivery.runtime import DeliveryRuntime


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
    app.state.runtime = runtime
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
        if reason := runtime.stalled():
            return PlainTextResponse(
                f"stalled: {runtime.watch.group} {reason} for {runtime.watch.after_s:g} s or more",
                status_code=503,
            )
        return PlainTextResponse("ready")

    return app
