"""The ``app_server`` fixture: :func:`tests.support.serve_app` for the sandbox tests."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from tests.support import serve_app


@pytest.fixture
def app_server() -> Callable[..., AbstractAsyncContextManager[str]]:
    """``async with app_server(app) as base_url:``: a real HTTP server in this event loop."""
    return serve_app
