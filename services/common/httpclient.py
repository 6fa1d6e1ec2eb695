"""The HTTP client of the delivery services: httpx's API over aiohttp's connection pool."""

from __future__ import annotations

import httpx
from httpx_aiohttp import AiohttpTransport


def make_http_client(max_connections: int) -> httpx.AsyncClient:
    """One pooled client per service.

    httpcore's pool scans every connection on each request (encode/httpcore#1035); with 100 requests in
    flight that capped a delivery service at ~150/s. aiohttp's pool does not, and vendor clients keep
    speaking httpx (requests, responses, exceptions, timeouts).
    """
    limits = httpx.Limits(max_connections=max_connections, keepalive_expiry=30)
    return httpx.AsyncClient(transport=AiohttpTransport(limits=limits))
