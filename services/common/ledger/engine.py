"""Opening the ledger's database (SQLite or PostgreSQL) and migrating it."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from services.common.logging import get_logger

if TYPE_CHECKING:
    from alembic.config import Config

log = get_logger("relay.ledger")

MIGRATIONS = Path(__file__).parent.parent / "migrations"


def _private_sqlite_file(database: str | None) -> bool:
    """Create a new SQLite file 0600 before SQLite does (it would use 0644); its -wal/-shm copy the mode.

    True when the file was there already and anyone may read it.
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        return False
    path = Path(database)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # An existing file keeps the mode its operator gave it.
        with contextlib.suppress(OSError):
            return bool(path.stat().st_mode & stat.S_IROTH)
        return False
    except OSError:
        return False  # no such folder, read-only, ...: SQLite reports it better when it opens the file
    os.close(fd)  # an empty file is a valid, empty SQLite database
    return False


def make_engine(url: str) -> AsyncEngine:
    engine = create_async_engine(url, pool_pre_ping=not url.startswith("sqlite"))
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine.sync_engine)
    return engine


def make_write_engine(engine: AsyncEngine) -> Engine | None:
    """A synchronous engine on the same SQLite file, for the group commit's worker thread.

    With aiosqlite every statement is a round trip to its thread (a begin's transaction took nine, 2.3 ms
    of CPU); run whole in one thread, a transaction is one (0.9 ms). None for PostgreSQL, whose driver
    is asynchronous, and for an in-memory database, which a second engine would not see.
    """
    url = engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    sync = create_engine(url.set(drivername="sqlite"))
    _sqlite_setup(sync)
    return sync


def _sqlite_setup(engine: Engine) -> None:
    database = engine.url.database
    warned = False

    # Before every new connection, not at engine creation: building a ledger must not create a file.
    @event.listens_for(engine, "do_connect")
    def _create_private(*_: Any) -> None:
        nonlocal warned
        if _private_sqlite_file(database) and not warned:
            warned = True
            log.warning("the ledger file is world-readable", path=database, fix=f"chmod 600 {database}*")

    # Several processes share one file in the embedded run: WAL lets readers and a writer coexist.
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # Safe against process crashes; only a power loss can undo the last commits, and the
        # targets' natural keys (Maxma externalId) still stop a second effect then.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()


def alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply the Alembic migrations (``relay db upgrade``)."""

    # Alembic is imported only when migrating: the long-running roles need not carry it.
    from alembic import command

    def run(conn: Connection) -> None:
        command.upgrade(alembic_config(conn), revision)

    async with engine.begin() as conn:
        await conn.run_sync(run)


async def migrate(url: str) -> None:
    """Bring the database at ``url`` to the newest schema and let go of it."""
    engine = make_engine(url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
