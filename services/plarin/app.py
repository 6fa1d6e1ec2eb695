"""The plarin delivery service: the shared assembly (``services/common/targets.py``) with Plarin as its target."""

from __future__ import annotations

from fastapi import FastAPI

from services.common.config import Settings
from services.common.targets import create_delivery_app


def create_app(settings: Settings, *, migrate: bool = False) -> FastAPI:
    """Assemble the service; validates its connections now, connects nothing until started."""
    return create_delivery_app("plarin", settings, migrate=migrate)
