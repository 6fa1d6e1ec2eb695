"""What every family of the ledger shares: the engine, the group commit, dialect-neutral upserts.

Writes from concurrent tasks are coalesced: one transaction carries every write queued while the previous
one ran (group commit), so a thousand deliveries a second do not cost two thousand transactions. Each
family declares its writes as ``_write_<kind>`` methods; one batch applies them in ``WRITE_ORDER``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from services.common.ledger.engine import make_engine, make_write_engine

if TYPE_CHECKING:
    from pydantic import SecretStr

MAX_BATCH = 500

# The order one batch applies its writes in: a delivery's row before its attempts, the dedupe claim before
# the history it marks. Kinds not listed ("flush") only wait for the commit.
WRITE_ORDER = ("begin", "record", "park", "repark", "unpark", "step", "entity", "intake", "event", "spool")
_GROUP = {"forget": "entity"}  # kinds applied together, in the order they came


def idempotency_key(target: str, connection: str, action: str, event_id: str) -> str:
    return f"{target}:{connection}:{action}:{event_id}"


def phone_hash(e164: str, key: bytes) -> str:
    """The phone index value: a plain SHA-256 of a 10-digit number is reversed in minutes, an HMAC is not."""
    return hmac.new(key, e164.encode(), hashlib.sha256).hexdigest()


class PhoneSearchUnavailable(RuntimeError):
    """Phone search asked of a ledger opened without ``phone_hash_key``."""

    def __init__(self) -> None:
        super().__init__(
            "phone search needs the phone index key; fix: set `phone_hash_key` in RELAY_CONFIG "
            "(or RELAY_PHONE_HASH_KEY) to the key the normalizer uses"
        )


@dataclass
class _Op:
    kind: str
    args: dict[str, Any]
    future: asyncio.Future[Any] = field(repr=False)


class _WriteQueue:
    """Runs queued writes in one transaction each time the previous transaction is done."""

    def __init__(self, run: Callable[[list[_Op]], Awaitable[None]]) -> None:
        self._run = run  # applies one batch in one transaction
        self._ops: list[_Op] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, kind: str, **args: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append(_Op(kind, args, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await fut

    def submit_nowait(self, kind: str, **args: Any) -> None:
        """Queue a write for the next group commit without waiting for it (a failure is logged by the drain).

        For what may be lost to a crash at no cost but a repeated call; the writes queued after it (the
        delivery's record) commit in the same transaction or a later one.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: f.exception() if not f.cancelled() else None)  # retrieved: no warning
        self._ops.append(_Op(kind, args, fut))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._ops:
                batch, self._ops = self._ops[:MAX_BATCH], self._ops[MAX_BATCH:]
                try:
                    await self._run(batch)
                except BaseException as e:
                    for op in batch:
                        if not op.future.done():
                            op.future.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
                    if not isinstance(e, Exception):
                        raise
                else:
                    for op in batch:
                        if not op.future.done():
                            op.future.set_result(op.args.get("result"))
        finally:
            self._task = None


class LedgerCore:
    """The engine and the write queue; the families (mixins) add their tables' reads and writes."""

    def __init__(
        self, engine: AsyncEngine, *, phone_key: SecretStr | None = None, write_thread: bool = True
    ) -> None:
        """``write_thread=False`` runs SQLite's group commit over aiosqlite too (``bench/ledger.py`` compares)."""
        self.engine = engine
        self._write_engine = make_write_engine(engine) if write_thread else None
        # One thread: SQLite has one writer anyway, and the batches stay in the order they were made.
        self._write_thread = (
            ThreadPoolExecutor(1, "ledger-writes") if self._write_engine is not None else None
        )
        self._writes = _WriteQueue(self._commit)
        # Without a key no phone index is written at all: an unkeyed digest would be the weakness again.
        self._phone_key = phone_key.get_secret_value().encode() if phone_key is not None else None
        self._statements: dict[tuple[str, ...], Any] = {}  # statements are immutable: built once, reused

    @classmethod
    def from_url(cls, url: str, *, phone_key: SecretStr | None = None) -> Self:
        """``phone_key`` (``Settings.phone_hash_key``) is needed only to write or search the phone index."""
        return cls(make_engine(url), phone_key=phone_key)

    @property
    def write_engine(self) -> Engine:
        """The engine the group commit's transactions run on (SQLite's writer thread, or the async engine's)."""
        return self._write_engine if self._write_engine is not None else self.engine.sync_engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def _phone_hash(self, e164: str | None) -> str | None:
        return phone_hash(e164, self._phone_key) if e164 and self._phone_key is not None else None

    async def close(self) -> None:
        if self._write_thread is not None and self._write_engine is not None:
            await asyncio.get_running_loop().run_in_executor(self._write_thread, self._write_engine.dispose)
            self._write_thread.shutdown()
        await self.engine.dispose()

    async def ping(self) -> bool:
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            return False
        return True

    async def flush(self) -> None:
        """Wait until every write queued so far (awaited or not) is committed."""
        await self._writes.submit("flush")

    def _insert(self, table: Table) -> Any:
        return (postgresql.insert if self.dialect == "postgresql" else sqlite.insert)(table)

    def _upsert(self, table: Table, index: list[str], update: list[str]) -> Any:
        """INSERT ... ON CONFLICT DO UPDATE, built once: building ``excluded`` anew cost ~1 ms per batch."""
        key = (table.name, "update", *index, "|", *update)
        if (stmt := self._statements.get(key)) is None:
            ins = self._insert(table)
            stmt = ins.on_conflict_do_update(index_elements=index, set_={c: ins.excluded[c] for c in update})
            self._statements[key] = stmt
        return stmt

    def _insert_ignore(self, table: Table, index: str) -> Any:
        key = (table.name, "ignore", index)
        if (stmt := self._statements.get(key)) is None:
            stmt = self._statements[key] = self._insert(table).on_conflict_do_nothing(index_elements=[index])
        return stmt

    async def _commit(self, batch: list[_Op]) -> None:
        """One batch, one transaction: on SQLite in the writer thread, on PostgreSQL over asyncpg."""
        if self._write_thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._write_thread, self._commit_here, batch)
        else:
            async with self.engine.begin() as conn:
                await conn.run_sync(self._apply, batch)

    def _commit_here(self, batch: list[_Op]) -> None:
        assert self._write_engine is not None
        with self._write_engine.begin() as conn:
            self._apply(conn, batch)

    def _apply(self, conn: Connection, ops: list[_Op]) -> None:
        now = datetime.now(UTC)
        by_kind: dict[str, list[_Op]] = {}
        for op in ops:
            by_kind.setdefault(_GROUP.get(op.kind, op.kind), []).append(op)
        for kind in WRITE_ORDER:
            if batch := by_kind.get(kind):
                getattr(self, f"_write_{kind}")(conn, batch, now)
