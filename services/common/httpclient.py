"""How the services speak HTTP: httpx requests and responses over aiohttp's connection pool.

Vendor clients send on this transport with :func:`services.common.vendorhttp.send`.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport, transport

# httpx-aiohttp maps every aiohttp.ClientConnectionError (a refused, reset or dropped connection) to
# httpx.ConnectTimeout: a vendor that merely dropped a connection would be throttled as if it were slow.
# A network error it is; its timeouts (ServerTimeoutError, SocketTimeoutError) keep their own entries.
transport.AIOHTTP_EXC_MAP[aiohttp.ClientConnectionError] = httpx.NetworkError


def make_transport(max_connections: int) -> httpx.AsyncBaseTransport:
    """One pooled transport per service.

    httpcore's pool scans every connection on each request (encode/httpcore#1035); with 100 requests in
    flight that capped a delivery service at ~150/s. aiohttp's pool does not; requests, responses,
    timeouts and exceptions stay httpx's.
    """
    return AiohttpTransport(limits=httpx.Limits(max_connections=max_connections, keepalive_expiry=30))


def make_http_client(max_connections: int) -> httpx.AsyncClient:
    """A full httpx client on the same transport (load generators, tools)."""
    return httpx.AsyncClient(transport=make_transport(max_connections))
