"""Assembles the maxma delivery service: the shared delivery runtime with Maxma as its target."""

from __future__ import annotations

from fastapi import FastAPI

from services.common.config import Settings, target_connections
from services.common.delivery.runtime import DeliveryRuntime
from services.common.http import runtime_app
from services.common.httpclient import make_transport
from services.common.ledger import Ledger
from services.maxma.client import MaxmaClient
from services.maxma.handlers import TARGET, MaxmaTarget, Route
from services.maxma.settings import MaxmaConnection


def create_app(settings: Settings, *, migrate: bool = False) -> FastAPI:
    """Assemble the service; validates its connections now, connects nothing until started."""
    connections = list(target_connections(settings, TARGET, MaxmaConnection))
    ledger = Ledger.from_url(settings.database_url)
    transport = make_transport(settings.delivery.max_in_flight)
    routes = [
        Route(
            source,
            conn,
            MaxmaClient(transport, conn.base_url, conn.processing_key.get_secret_value(), conn.timeout_s),
        )
        for source, conn in connections
    ]
    runtime = DeliveryRuntime(MaxmaTarget(routes), settings, ledger)
    return runtime_app(
        runtime, ledger, title="klientiks-relay maxma", migrate=migrate, closing=[transport.aclose]
    )
