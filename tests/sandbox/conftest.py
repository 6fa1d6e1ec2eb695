"""Serve any ASGI app over real HTTP on 127.0.0.1 for the duration of a test."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import uvicorn


class _TestServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would take over SIGINT/SIGTERM from pytest while serving; keep Ctrl-C for pytest.
        yield


@contextlib.asynccontextmanager
async def serve_app(
    app: Any,
    *,
    startup_timeout: float = 10.0,
    shutdown_timeout: float = 5.0,
    **config: Any,
) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in this event loop; yield its base URL.

    Extra keyword arguments go to ``uvicorn.Config`` (e.g. ``lifespan="off"``).
    """
    # Bind the socket ourselves and hand it to uvicorn: asking the OS for a free port and
    # binding it later would race with other tests doing the same.
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on such sockets, and without it
    # Nagle plus delayed ACKs add ~40 ms to every keep-alive request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    # Bounded, so a request stuck in a sandbox delay cannot hang the test run on shutdown.
    config.setdefault("timeout_graceful_shutdown", shutdown_timeout)
    server = _TestServer(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(startup_timeout):
            while not server.started:
                if task.done():
                    task.result()  # re-raise why the server could not start
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), shutdown_timeout + 5)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock.close()


@pytest.fixture
def app_server() -> Callable[..., AbstractAsyncContextManager[str]]:
    """``async with app_server(app) as base_url:`` — :func:`serve_app` as a fixture.

    Test modules cannot reliably ``import conftest`` (several directories have one), so the
    fixture is the supported way to reuse the helper.
    """
    return serve_app
