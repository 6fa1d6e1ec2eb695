"""The entity map: a Klientiks client or visit and the target's id for it, per connection."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.engine import Connection

from services.common.ledger.core import LedgerCore, _Op
from services.common.ledger.schema import ENTITIES

# The target_id of an entity whose create was sent and not yet answered (services/common/delivery/steps.py).
# No target's id has parentheses; no NUL either, which PostgreSQL's text refuses (migration 0008).
PENDING = "(pending)"


@dataclass(frozen=True)
class Entity:
    """The target's id for a Klientiks entity, and the hash of what was last sent for it."""

    target_id: str
    content_hash: str | None

    @property
    def pending(self) -> bool:
        """Its create was sent and no answer was kept: the target may or may not have it."""
        return self.target_id == PENDING


class EntityMap(LedgerCore):
    async def entity(self, connection: str, kind: str, klientiks_id: str) -> Entity | None:
        q = select(ENTITIES.c.target_id, ENTITIES.c.content_hash).where(
            ENTITIES.c.connection == connection,
            ENTITIES.c.kind == kind,
            ENTITIES.c.klientiks_id == klientiks_id,
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(q)).first()
            return Entity(row.target_id, row.content_hash) if row else None

    async def remember_entity(
        self, connection: str, kind: str, klientiks_id: str, target_id: str, content_hash: str | None,
        *, wait: bool = True,
    ) -> None:  # fmt: skip
        """Keep the target's id (and what was sent) for an entity; committed before returning if ``wait``."""
        args = dict(connection=connection, entity_kind=kind, klientiks_id=klientiks_id, target_id=target_id,
                    content_hash=content_hash)  # fmt: skip
        if wait:
            await self._writes.submit("entity", **args)
        else:
            self._writes.submit_nowait("entity", **args)

    async def forget_entity(self, connection: str, kind: str, klientiks_id: str) -> None:
        await self._writes.submit(
            "forget", connection=connection, entity_kind=kind, klientiks_id=klientiks_id
        )

    def _write_entity(self, conn: Connection, ops: list[_Op], now: datetime) -> None:
        """Entity writes and forgets in the order they came (a claim, then its release, may share a batch)."""
        upsert = self._upsert(
            ENTITIES, ["connection", "kind", "klientiks_id"], ["target_id", "content_hash", "updated_at"]
        )
        run: list[_Op] = []
        for i, op in enumerate(ops):
            run.append(op)
            if i + 1 < len(ops) and ops[i + 1].kind == op.kind:
                continue
            if op.kind == "entity":
                conn.execute(upsert, [dict(connection=o.args["connection"], kind=o.args["entity_kind"],
                                                 klientiks_id=o.args["klientiks_id"], target_id=o.args["target_id"],
                                                 content_hash=o.args["content_hash"], updated_at=now) for o in run])  # fmt: skip
            else:
                for o in run:
                    conn.execute(delete(ENTITIES).where(
                        ENTITIES.c.connection == o.args["connection"], ENTITIES.c.kind == o.args["entity_kind"],
                        ENTITIES.c.klientiks_id == o.args["klientiks_id"]))  # fmt: skip
            run = []
