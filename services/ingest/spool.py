"""Getting an accepted webhook into the inbox: Kafka when it answers in time, else the SQL spool.

While anything is spooled, every new webhook is spooled behind it, so the inbox receives webhooks in
the order they were accepted; a background task drains the spool to Kafka and then hands the door back
to the direct path. A webhook may reach the inbox twice (a timed-out send that Kafka took after all,
or a crash between publishing and deleting the rows); it keeps its id, and everything downstream is
idempotent by event id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Literal

from aiokafka import AIOKafkaProducer

from services.common.config import Settings
from services.common.kafka import INBOX, ensure_topics, make_producer
from services.common.ledger import Ledger, Spooled
from services.common.logging import get_logger
from services.common.metrics import SPOOL_DEPTH, SPOOLED

log = get_logger("relay.ingest.spool")

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0


class Unavailable(Exception):
    """Neither Kafka nor the spool took the webhook."""


class InboxWriter:
    """Publishes to ``klientiks.inbox.v1`` with ``acks=all``, or spools; one per ingest API process."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        producer_factory: Callable[[], AIOKafkaProducer] | None = None,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._factory = producer_factory or (lambda: make_producer(settings.kafka))
        self._timeout = settings.ingest.publish_timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._spooling = False
        # Spool writes in progress and ever started: the drainer may only hand back the direct path
        # when no write could still be landing behind its last look at the spool.
        self._writing = 0
        self._writes_started = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def spooling(self) -> bool:
        return self._spooling

    @property
    def producer(self) -> AIOKafkaProducer | None:
        return self._producer

    async def start(self) -> None:
        """Connect if Kafka is there; start spooling if it is not, or if an earlier run left a spool."""
        try:
            await self._connect()
        except Exception as e:
            self._enter_spooling("kafka unreachable at start", e)
        try:
            depth = await self._ledger.spool_depth()
        except Exception as e:
            log.error("the spool cannot be read; webhooks get 503 while Kafka is down", error=repr(e))
            depth = 0
        SPOOL_DEPTH.set(depth)
        if depth:
            self._enter_spooling(f"{depth} webhooks left in the spool")
        self._task = asyncio.create_task(self._drain_forever(), name="spool-drainer")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), self._timeout)

    async def write(self, record_id: str, key: bytes, value: bytes) -> Literal["published", "spooled"]:
        """Put one webhook on its way; raise :class:`Unavailable` when it could not be kept anywhere."""
        producer = self._producer
        if not self._spooling and producer is not None:
            try:
                await asyncio.wait_for(producer.send_and_wait(INBOX, value, key=key), self._timeout)
                return "published"
            except Exception as e:
                self._enter_spooling("inbox publish failed", e)
        self._writing += 1
        self._writes_started += 1
        try:
            await self._ledger.spool(record_id=record_id, kafka_key=key.decode(), record=value.decode())
        except Exception as e:
            log.error("spool write failed", event_id=record_id, error=repr(e))
            raise Unavailable from None
        finally:
            self._writing -= 1
        SPOOLED.inc()
        SPOOL_DEPTH.inc()
        return "spooled"

    async def kafka_ok(self) -> bool:
        producer = self._producer
        if producer is None:
            return False
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout=2)
        except Exception:
            return False
        return True

    def _enter_spooling(self, why: str, error: BaseException | None = None) -> None:
        if not self._spooling:
            log.warning(
                "spooling webhooks to the SQL store", reason=why, error=repr(error) if error else None
            )
        self._spooling = True
        self._wake.set()

    async def _connect(self) -> AIOKafkaProducer:
        if self._producer is not None:
            return self._producer
        producer = self._factory()
        try:
            # A broker that came back empty (Tansu keeps nothing) would auto-create the inbox with too few
            # partitions on the first publish.
            await asyncio.wait_for(ensure_topics(self._settings.kafka), self._timeout)
            await asyncio.wait_for(producer.start(), self._timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer
        return producer

    async def _publish(self, batch: list[Spooled]) -> None:
        producer = await self._connect()
        # Queued in spool order before any is awaited: one key's webhooks keep their order.
        sent = [await producer.send(INBOX, r.record.encode(), key=r.kafka_key.encode()) for r in batch]
        await asyncio.gather(*sent)

    async def _drain_once(self) -> bool:
        """One round; True when the spool is empty and the direct path is back."""
        writing, started = self._writing, self._writes_started
        n = await self._ledger.drain_spool(
            lambda batch: asyncio.wait_for(self._publish(batch), self._timeout),
            limit=self._settings.ingest.spool_batch,
        )
        if n is None:  # another replica is draining; ours wait their turn in its order
            await asyncio.sleep(RETRY_MIN_S)
            return False
        if n:
            SPOOL_DEPTH.set(await self._ledger.spool_depth())
            log.info("spooled webhooks published", count=n)
            return False
        if writing == 0 and self._writes_started == started:
            self._spooling = False
            SPOOL_DEPTH.set(0)
            log.info("spool drained; publishing directly again")
            return True
        await asyncio.sleep(0.005)  # a spool write is landing: look again
        return False

    async def _drain_forever(self) -> None:
        delay = RETRY_MIN_S
        while True:
            if not self._spooling:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._drain_once()
                delay = RETRY_MIN_S
            except Exception as e:
                log.warning("spool not drained yet; Kafka or the store is still down", error=repr(e))
                if self._producer is not None and not await self.kafka_ok():
                    # Start from a fresh producer once Kafka answers: the old one may hold stale batches.
                    old, self._producer = self._producer, None
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(old.stop(), self._timeout)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
