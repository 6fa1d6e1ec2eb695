"""Fixtures on real parts: a Tansu broker per test, PostgreSQL and SQLite ledgers, the sandbox Maxma."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from services.common.config import KafkaSettings
from services.common.embedded import EmbeddedBroker
from services.common.kafka import ensure_topics
from services.common.ledger import Ledger, upgrade

PG_DSN = os.environ.get("RELAY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    """A fresh Tansu broker: memory storage, so every test starts with no topics and no offsets."""
    with EmbeddedBroker().start() as b:
        yield b


@pytest.fixture
async def kafka(broker: EmbeddedBroker) -> KafkaSettings:
    settings = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
    await ensure_topics(settings)
    return settings


async def _pg_available() -> bool:
    try:
        conn = await asyncio.wait_for(asyncpg.connect(PG_DSN), 3)
    except Exception:
        return False
    await conn.close()
    return True


@contextlib.asynccontextmanager
async def pg_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database, dropped afterwards."""
    if not await _pg_available():
        if os.environ.get("RELAY_TEST_REQUIRE_PG"):
            pytest.fail(f"PostgreSQL is required (RELAY_TEST_REQUIRE_PG) but {PG_DSN} is unreachable")
        pytest.skip(f"PostgreSQL unreachable at {PG_DSN}")
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(PG_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = PG_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        admin = await asyncpg.connect(PG_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """The ledger URL, once on each backend the project supports."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
        return
    async with pg_database() as url:
        yield url


@pytest.fixture
async def ledger(db_url: str) -> AsyncIterator[Ledger]:
    ledger = Ledger.from_url(db_url)
    await upgrade(ledger.engine)
    try:
        yield ledger
    finally:
        await ledger.close()
