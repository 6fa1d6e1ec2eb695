"""What a delivery of several steps has done so far, and the connection's entity map.

A target whose action takes more than one call (create a contact, then a deal on it) asks, before each step,
whether it finished in an earlier attempt; a finished step is kept with its result (the ids the target
returned) before the next one is sent. So a retry, a crash, a rebalance or a DLQ replay resumes at the first
unfinished step, and each step takes effect once. The entity map remembers, per connection, the target's id
for a Klientiks client or visit and a hash of what was last sent, for later events to read.
"""

from __future__ import annotations

from services.common.failpoints import hit
from services.common.ledger import PENDING, Entity, Ledger


class Steps:
    """One delivery (by idempotency key) of one connection, as the target's deliverer sees it.

    Tests kill the process around a step with the failpoints ``{target}.step.{step}.sent`` (the step's
    call returned, not yet kept) and ``{target}.step.{step}.kept`` (kept, the next step not yet sent).
    """

    def __init__(
        self,
        ledger: Ledger,
        idempotency_key: str,
        connection: str,
        *,
        target: str = "",
        failpoints: frozenset[str] = frozenset(),
        replay: bool = False,
    ) -> None:
        self._ledger, self.key, self.connection = ledger, idempotency_key, connection
        self._target, self._failpoints = target, failpoints
        # An operator's replay of a dead letter: a create left in doubt is theirs to send again.
        self.replay = replay
        self._done: dict[str, str] | None = None  # read on first use: single-step targets never pay for it

    async def result(self, step: str) -> str | None:
        """What ``step`` returned when it finished, or None if it has not."""
        if self._done is None:
            self._done = await self._ledger.finished_steps(self.key)
        return self._done.get(step)

    async def finish(self, step: str, result: str) -> None:
        """Keep ``step`` as finished with ``result``: durable when this returns, before the next step."""
        hit(f"{self._target}.step.{step}.sent", self._failpoints)
        await self._ledger.finish_step(self.key, step, result)
        hit(f"{self._target}.step.{step}.kept", self._failpoints)
        if self._done is not None:
            self._done[step] = result

    async def claim(self, kind: str, klientiks_id: str) -> None:
        """Mark the entity's create as sent (durable), before a create the target cannot dedupe goes out.

        Until :meth:`remember` (the target's answer) or :meth:`release` (it made nothing), the entity is
        :attr:`~services.common.ledger.Entity.pending` for every delivery of the connection: if the process
        dies meanwhile, the target may have made the object, and no later event makes a second one.
        """
        await self._ledger.remember_entity(self.connection, kind, klientiks_id, PENDING, None)

    async def release(self, kind: str, klientiks_id: str) -> None:
        """The target answered that the create made nothing: the entity may be created again."""
        await self._ledger.forget_entity(self.connection, kind, klientiks_id)

    async def known(self, kind: str, klientiks_id: str) -> Entity | None:
        """:meth:`entity`, where a pending create counts as absent on an operator's replay (theirs to resend)."""
        found = await self.entity(kind, klientiks_id)
        return None if found is not None and found.pending and self.replay else found

    async def entity(self, kind: str, klientiks_id: str) -> Entity | None:
        """The target's id for a Klientiks ``kind`` ("client", "order", ...) of this connection, if known.

        ``content_hash`` is what the target last got for it: a hash of the data sent, or a state such as
        an order's ``confirmed``.
        """
        return await self._ledger.entity(self.connection, kind, klientiks_id)

    async def remember(
        self,
        kind: str,
        klientiks_id: str,
        target_id: str,
        content_hash: str | None = None,
        *,
        wait: bool = True,
    ) -> None:
        """Keep the target's id for an entity. ``wait=False`` rides on the next group commit unawaited: for
        what a crash may lose at no cost but a repeated call (a fingerprint that only spares an update)."""
        await self._ledger.remember_entity(
            self.connection, kind, klientiks_id, target_id, content_hash, wait=wait
        )
