"""Health, readiness and metrics routes for the FastStream worker processes (the normalizer)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from faststream.asgi import AsgiResponse, get
from faststream.kafka import KafkaBroker
from prometheus_client import make_asgi_app

from services.common.stall import StallWatch

Check = Callable[[], Awaitable[bool]]


def worker_routes(
    broker: KafkaBroker, checks: Sequence[tuple[str, Check]] = (), progress: Sequence[StallWatch] = ()
) -> list[tuple[str, Any]]:
    """``/healthz`` (alive), ``/readyz`` (broker and every check reachable, consumer not stalled), ``/metrics``."""

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
        for watch in progress:
            if reason := watch.reason():
                return AsgiResponse(
                    f"stalled: {watch.group} {reason} for {watch.after_s:g} s or more".encode(), 503
                )
        return AsgiResponse(b"ready", 200)

    metrics = make_asgi_app()
    # `/metrics/` too: the FastAPI roles mount it there, and every scrape config uses the one path.
    return [("/healthz", healthz), ("/readyz", readyz), ("/metrics", metrics), ("/metrics/", metrics)]
