"""Ordered parallel delivery, shared by every target service.

Events with the same Kafka key reach a connection in the order they were ingested: each (connection, key)
is a *lane* worked by one task at a time, while lanes run in parallel up to ``max_in_flight`` attempts.
A retry due soon waits in memory and holds back only its own lane; a later one is *parked* in the ledger
with its due time, and the lane's later events are parked behind it, so the partition's offset moves on
and nothing depends on memory. Offsets are committed only below the lowest unfinished record of each
partition; memory is bounded by pausing partitions. Permanent failures and exhausted retries go to the
target's dead-letter topic with their reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from services.common.config import DeliverySettings, Settings
from services.common.delivery.offsets import PartitionOffsets
from services.common.delivery.policy import RetryPolicy, parse_schedule
from services.common.delivery.protection import CircuitBreaker, CircuitState, TokenBucket
from services.common.delivery.steps import Steps
from services.common.dlq import dead_letter_headers
from services.common.events import CloudEvent, header
from services.common.failpoints import hit
from services.common.kafka import EVENTS, consumer_options, dlq_topic, producer_options
from services.common.ledger import SETTLED, Delivery, DeliveryStatus, Ledger, Parked, idempotency_key
from services.common.logging import get_logger
from services.common.metrics import (
    ATTEMPT_LATENCY,
    CIRCUITS_OPEN,
    CONSUMER_LAG,
    DELIVERIES,
    DLQ,
    END_TO_END,
    IN_FLIGHT,
    PARKED,
    RATE_LIMIT_WAITS,
    SKIPS,
)
from services.common.outcome import Outcome, OutcomeKind
from services.common.stall import StallWatch

log = get_logger("relay.delivery")

REPLAY_TARGET = "relay-replay-target"
REPLAY_CONNECTION = "relay-replay-connection"
REPLAY_ACTION = "relay-replay-action"


@dataclass(frozen=True)
class Job:
    """One delivery an event needs: a source's connection and the action to take there."""

    source: str
    connection: str
    action: str
    route: Any = field(compare=False, repr=False)
    rate_limit_per_s: float | None = None

    @property
    def conn_id(self) -> str:
        return f"{self.source}/{self.connection}"


class Target(Protocol):
    """What a target service gives the runtime: which deliveries an event needs, and how to make one."""

    name: str

    def jobs(self, event: CloudEvent) -> list[Job]: ...

    async def deliver(self, job: Job, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome: ...


class _Stopped(Exception):
    """The lane's partition is being revoked or the process is stopping: leave the work uncommitted."""


@dataclass(eq=False)
class _Record:
    tp: TopicPartition
    offset: int
    remaining: int


@dataclass(eq=False)
class _Item:
    record: _Record
    job: Job
    event: CloudEvent
    kafka_key: str
    replay: bool


@dataclass(eq=False)
class _Lane:
    id: str
    tp: TopicPartition
    items: deque[_Item] = field(default_factory=deque)
    parked: bool = False
    task: asyncio.Task[None] | None = None


def _now() -> datetime:
    return datetime.now(UTC)


class DeliveryRuntime:
    """Consumes the events topic for one target and delivers with the semantics above."""

    def __init__(self, target: Target, settings: Settings, ledger: Ledger, *, topic: str = EVENTS) -> None:
        self.target = target
        self.settings = settings
        self.cfg: DeliverySettings = settings.delivery
        self.ledger = ledger
        self.topic = topic
        self.group_id = f"relay-{target.name}"
        self.policy = RetryPolicy(
            parse_schedule(self.cfg.retry_schedule), self.cfg.retry_jitter, self.cfg.throttle_floor_s
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._slots = asyncio.Semaphore(self.cfg.max_in_flight)
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._buffered: dict[TopicPartition, int] = {}
        self._lanes: dict[str, _Lane] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._revoking: set[TopicPartition] = set()
        self._stop = asyncio.Event()
        self._paused = False
        self._tasks: list[asyncio.Task[None]] = []
        self._committed: dict[TopicPartition, int] = {}
        self.watch = StallWatch(self.group_id, settings.kafka.stall_after_s)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        k = self.settings.kafka
        self._producer = AIOKafkaProducer(**producer_options(k))
        await self._producer.start()
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.bootstrap_servers,
            client_id=f"{k.client_id}-{self.target.name}",
            enable_auto_commit=False,
            max_poll_records=500,
            **consumer_options(k, self.group_id),
        )
        self._consumer.subscribe([self.topic], listener=_Listener(self))
        await self._consumer.start()
        for loop in (self._fetch_loop, self._commit_loop, self._park_loop):
            self._tasks.append(asyncio.create_task(loop(), name=f"{self.target.name}-{loop.__name__}"))
        log.info("delivery runtime started", target=self.target.name, group=self.group_id,
                 max_in_flight=self.cfg.max_in_flight)  # fmt: skip

    async def stop(self) -> None:
        """Stop fetching, let attempts on the wire finish (up to the grace period), commit, leave."""
        if self._stop.is_set():
            return
        self._stop.set()
        fetch = self._tasks[0] if self._tasks else None
        if fetch:
            fetch.cancel()
        await self._drain(list(self._offsets))
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._consumer is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._consumer.stop(), 10)
        if self._producer is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(self._producer.stop(), 10)
        log.info("delivery runtime stopped", target=self.target.name)

    @property
    def buffered(self) -> int:
        """Records held in memory, waiting for or in delivery."""
        return sum(self._buffered.values())

    def stalled(self) -> str | None:
        """Why the runtime makes no progress (:class:`StallWatch`), or None."""
        return self.watch.reason()

    async def ready(self) -> bool:
        return (
            self._consumer is not None
            and not self._stop.is_set()
            and bool(self._tasks)
            and not self._tasks[0].done()
        )

    # -- consuming -----------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        while not self._stop.is_set():
            try:
                batch = await self._consumer.getmany(timeout_ms=200, max_records=500)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.watch.failed()
                log.error("fetch failed", error=repr(e))
                await asyncio.sleep(1)
                continue
            self.watch.succeeded()
            for tp, records in batch.items():
                if tp not in self._offsets or tp in self._revoking:
                    continue
                for rec in records:
                    self._accept(tp, rec)
            self._backpressure()

    def _backpressure(self) -> None:
        assert self._consumer is not None
        total = self.buffered
        if not self._paused and total >= self.cfg.max_buffered:
            self._consumer.pause(*self._offsets)
            self._paused = True
        elif self._paused and total <= self.cfg.max_buffered // 2:
            self._consumer.resume(*self._consumer.assignment())
            self._paused = False

    def _accept(self, tp: TopicPartition, rec: Any) -> None:
        offsets = self._offsets[tp]
        offsets.add(rec.offset)
        headers = list(rec.headers or ())
        try:
            event = CloudEvent.from_kafka(headers, rec.value)
        except (ValidationError, ValueError) as e:
            log.error("undecodable event skipped", topic=tp.topic, partition=tp.partition, offset=rec.offset,
                      error=str(e)[:300])  # fmt: skip
            offsets.done(rec.offset)
            return
        replay_target = header(headers, REPLAY_TARGET)
        if replay_target is not None and replay_target != self.target.name:
            offsets.done(rec.offset)
            return
        jobs = self.target.jobs(event)
        if replay_target is not None:
            conn, action = header(headers, REPLAY_CONNECTION), header(headers, REPLAY_ACTION)
            jobs = [j for j in jobs if j.conn_id == conn and j.action == action]
        if not jobs:
            offsets.done(rec.offset)
            return
        record = _Record(tp, rec.offset, len(jobs))
        self._buffered[tp] = self._buffered.get(tp, 0) + 1
        key = rec.key.decode("utf-8", "replace") if rec.key else event.id
        for job in jobs:
            lane = self._lane(f"{job.conn_id}|{key}", tp)
            lane.items.append(_Item(record, job, event, key, replay_target is not None))
            self._wake(lane)

    def _lane(self, lane_id: str, tp: TopicPartition) -> _Lane:
        lane = self._lanes.get(lane_id)
        if lane is None:
            lane = self._lanes[lane_id] = _Lane(lane_id, tp)
        return lane

    def _wake(self, lane: _Lane) -> None:
        if lane.task is None and not self._stop.is_set() and lane.tp not in self._revoking:
            lane.task = asyncio.create_task(self._run_lane(lane))

    def _finish(self, item: _Item) -> None:
        item.record.remaining -= 1
        if item.record.remaining == 0:
            tp = item.record.tp
            if tp in self._offsets:
                self._offsets[tp].done(item.record.offset)
                self._buffered[tp] -= 1

    # -- lanes ---------------------------------------------------------------------------------------

    async def _run_lane(self, lane: _Lane) -> None:
        try:
            while True:
                self._check_running(lane)
                if lane.parked and not await self._drain_parked(lane):
                    # The lane's head waits in the ledger: everything after it waits there too.
                    while lane.items:
                        item = lane.items[0]
                        await self._park_item(item, lane, _now(), "behind")
                        lane.items.popleft()
                        self._finish(item)
                    return
                if not lane.items:
                    return
                item = lane.items[0]
                await self._process(item, lane)
                lane.items.popleft()
                self._finish(item)
        except _Stopped:
            pass
        except Exception as e:
            # The ledger or the broker failed: the work stays uncommitted and is read again later.
            log.error("lane failed; its events will be read again", lane=lane.id, error=repr(e))
            await asyncio.sleep(1)
        finally:
            lane.task = None
            if lane.items and not self._stop.is_set() and lane.tp not in self._revoking:
                self._wake(lane)
            elif not lane.items and not lane.parked:
                self._lanes.pop(lane.id, None)

    async def _process(self, item: _Item, lane: _Lane) -> None:
        job, event = item.job, item.event
        key = idempotency_key(self.target.name, job.connection, job.action, event.id)
        d = await self.ledger.begin(key, event_id=event.id, source=job.source, connection=job.connection,
                                    target=self.target.name, action=job.action, replay=item.replay)  # fmt: skip
        if d.status in SETTLED:
            DELIVERIES.labels(self.target.name, job.action, "skipped").inc()
            return
        if d.status is DeliveryStatus.PARKED:
            lane.parked = True  # parked before a restart: the ledger holds it, the lane drains it
            return
        if lane.parked:
            await self._park_item(item, lane, _now(), "behind")
            return
        if (
            d.next_attempt_at
            and d.next_attempt_at > _now()
            and await self._wait_or_park(
                d.next_attempt_at, lane, key, job, event, item.kafka_key, None, item.replay
            )
        ):
            return
        await self._attempts(key, d, job, event, lane, item.kafka_key, None, item.replay)

    async def _drain_parked(self, lane: _Lane) -> bool:
        """Deliver the lane's due parked deliveries in order; True once none is left."""
        while True:
            head = await self.ledger.lane_head(lane.id)
            if head is None:
                lane.parked = False
                return True
            if head.due_at > _now():
                return False
            event = CloudEvent.model_validate_json(head.event)
            jobs = [
                j for j in self.target.jobs(event) if j.conn_id == head.connection and j.action == head.action
            ]
            d = await self.ledger.get(head.idempotency_key)
            if d is None or d.status in SETTLED:
                await self.ledger.unpark(head.idempotency_key)
                continue
            if not jobs:
                await self._settle(head.idempotency_key, d, Outcome.permanent("the connection is no longer configured"),
                                   head.action, d.connection, event, head.kafka_key, _now(), 0.0, d.attempts)  # fmt: skip
                await self.ledger.unpark(head.idempotency_key)
                continue
            if not await self._attempts(
                head.idempotency_key, d, jobs[0], event, lane, head.kafka_key, head, head.replay
            ):
                return False

    async def _attempts(
        self, key: str, d: Delivery, job: Job, event: CloudEvent, lane: _Lane, kafka_key: str,
        parked: Parked | None, replay: bool,
    ) -> bool:  # fmt: skip
        """Attempt until settled (True) or parked (False)."""
        breaker = self._breaker(job.conn_id)
        bucket = self._bucket(job)
        attempts = d.attempts
        while True:
            self._check_running(lane)
            if not breaker.allow():
                # An open circuit parks without burning an attempt.
                due = _now() + timedelta(seconds=max(0.0, breaker.retry_at() - time.monotonic()))
                await self._park_or_repark(key, job, event, lane, kafka_key, parked, due, "circuit", replay)
                return False
            if bucket is not None:
                wait = bucket.reserve()
                if wait > 0:
                    RATE_LIMIT_WAITS.labels(self.target.name).inc()
                    await self._sleep(wait, lane)
            started, t0 = _now(), time.perf_counter()
            async with self._slots:
                IN_FLIGHT.labels(self.target.name).inc()
                try:
                    steps = Steps(self.ledger, key, job.conn_id, target=self.target.name,
                                  failpoints=self.settings.failpoints, replay=replay)  # fmt: skip
                    outcome = await self._deliver(job, event, key, steps)
                finally:
                    IN_FLIGHT.labels(self.target.name).dec()
            elapsed = time.perf_counter() - t0
            ATTEMPT_LATENCY.labels(self.target.name, job.action).observe(elapsed)
            hit(f"{self.target.name}.after_send", self.settings.failpoints)
            was_closed = breaker.state is CircuitState.CLOSED
            if outcome.kind is OutcomeKind.RETRYABLE:
                breaker.record_failure()
            elif outcome.opens_circuit:
                breaker.trip()
                log.error("circuit opened: every call of this connection would fail the same way",
                          target=self.target.name, connection=job.conn_id, reason=outcome.reason)  # fmt: skip
            else:
                breaker.record_success()
                if not was_closed:
                    await self.ledger.release_circuit(self.target.name, job.conn_id)
            self._circuit_gauge()
            attempts += 1
            delay = None if outcome.kind is not OutcomeKind.RETRYABLE else self.policy.next_delay(
                attempts - d.retry_base, outcome)  # fmt: skip
            if delay is None:
                await self._settle(key, d, outcome, job.action, job.connection, event, kafka_key, started,
                                   elapsed, attempts)  # fmt: skip
                if parked is not None:
                    await self.ledger.unpark(key)
                return True
            due = _now() + timedelta(seconds=delay)
            await self.ledger.record(
                key, outcome, started_at=started, duration_s=elapsed, next_attempt_at=due
            )
            DELIVERIES.labels(self.target.name, job.action, "retryable").inc()
            log.warning("attempt failed; will retry", target=self.target.name, event_id=event.id,
                        connection=job.conn_id, action=job.action, attempt=attempts, reason=outcome.reason,
                        http_status=outcome.http_status, vendor_code=outcome.vendor_code,
                        retry_in_s=round(delay, 3))  # fmt: skip
            if await self._wait_or_park(due, lane, key, job, event, kafka_key, parked, replay):
                return False

    async def _deliver(self, job: Job, event: CloudEvent, key: str, steps: Steps) -> Outcome:
        """The target's attempt; a bug in it fails this delivery (a dead letter), never its whole lane."""
        try:
            return await self.target.deliver(job, event, key, steps)
        except (SQLAlchemyError, OSError):
            raise  # the ledger is unavailable: the lane stops and its events are read again
        except Exception as e:
            log.exception("the target's deliverer failed; the event goes to the dead-letter topic",
                          target=self.target.name, event_id=event.id, action=job.action)  # fmt: skip
            return Outcome.permanent(f"the relay could not build or send this delivery: {type(e).__name__}")

    async def _wait_or_park(
        self, due: datetime, lane: _Lane, key: str, job: Job, event: CloudEvent, kafka_key: str,
        parked: Parked | None, replay: bool,
    ) -> bool:  # fmt: skip
        """Sleep until ``due`` if it is near (False), else park (True)."""
        delay = (due - _now()).total_seconds()
        if delay <= self.cfg.hold_in_memory_s:
            await self._sleep(delay, lane)
            return False
        await self._park_or_repark(key, job, event, lane, kafka_key, parked, due, "retry", replay)
        return True

    async def _park_or_repark(
        self, key: str, job: Job, event: CloudEvent, lane: _Lane, kafka_key: str, parked: Parked | None,
        due: datetime, reason: str, replay: bool,
    ) -> None:  # fmt: skip
        if parked is not None:
            await self.ledger.repark(key, due_at=due, reason=reason)
        else:
            await self.ledger.park(key, target=self.target.name, lane=lane.id, partition=lane.tp.partition,
                                   due_at=due, reason=reason, connection=job.conn_id, action=job.action,
                                   kafka_key=kafka_key, event=event.model_dump_json(), replay=replay)  # fmt: skip
        lane.parked = True

    async def _park_item(self, item: _Item, lane: _Lane, due: datetime, reason: str) -> None:
        job, event = item.job, item.event
        key = idempotency_key(self.target.name, job.connection, job.action, event.id)
        d = await self.ledger.begin(key, event_id=event.id, source=job.source, connection=job.connection,
                                    target=self.target.name, action=job.action, replay=item.replay)  # fmt: skip
        if d.status in SETTLED or d.status is DeliveryStatus.PARKED:
            return
        await self._park_or_repark(key, job, event, lane, item.kafka_key, None, due, reason, item.replay)

    def _check_running(self, lane: _Lane) -> None:
        if self._stop.is_set() or lane.tp in self._revoking:
            raise _Stopped

    async def _sleep(self, seconds: float, lane: _Lane) -> None:
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set() or lane.tp in self._revoking:
            raise _Stopped

    # -- settling ------------------------------------------------------------------------------------

    async def _settle(
        self, key: str, d: Delivery, outcome: Outcome, action: str, connection: str, event: CloudEvent,
        kafka_key: str, started: datetime, elapsed: float, attempts: int,
    ) -> None:  # fmt: skip
        if not outcome.ok:
            # Dead-letter first: a crash before the ledger write repeats the dead letter, never loses it.
            assert self._producer is not None
            headers = dead_letter_headers(
                outcome, target=self.target.name, connection=connection, action=action, idempotency_key=key,
                attempts=attempts, first_attempt_at=d.created_at, last_attempt_at=started,
            )  # fmt: skip
            all_headers = [*event.kafka_headers(), *((k, v.encode()) for k, v in headers.items())]
            await self._producer.send_and_wait(dlq_topic(self.target.name), event.kafka_value(),
                                               key=kafka_key.encode(), headers=all_headers)  # fmt: skip
            DLQ.labels(self.target.name, outcome.kind.value).inc()
        await self.ledger.record(key, outcome, started_at=started, duration_s=elapsed, final=True)
        hit(f"{self.target.name}.after_record", self.settings.failpoints)
        DELIVERIES.labels(self.target.name, action, outcome.kind.value).inc()
        if outcome.skipped:
            SKIPS.labels(self.target.name, action, outcome.skipped).inc()
            log.info("nothing to send", target=self.target.name, event_id=event.id, connection=connection,
                     action=action, skip=outcome.skipped, note=outcome.reason)  # fmt: skip
        elif outcome.ok:
            END_TO_END.labels(self.target.name).observe((_now() - event.relayreceivedat).total_seconds())
            log.info("delivered", target=self.target.name, event_id=event.id, connection=connection, action=action,
                     attempts=attempts, note=outcome.reason or None, ms=round(elapsed * 1000, 2))  # fmt: skip
        else:
            log.error("delivery failed; sent to the dead-letter topic", target=self.target.name, event_id=event.id,
                      connection=connection, action=action, attempts=attempts, reason=outcome.reason,
                      http_status=outcome.http_status, vendor_code=outcome.vendor_code)  # fmt: skip

    # -- protection ----------------------------------------------------------------------------------

    def _breaker(self, conn_id: str) -> CircuitBreaker:
        b = self._breakers.get(conn_id)
        if b is None:
            b = self._breakers[conn_id] = CircuitBreaker(
                self.cfg.circuit_failures, self.cfg.circuit_open_s, self.cfg.circuit_max_open_s
            )
        return b

    def _bucket(self, job: Job) -> TokenBucket | None:
        if job.rate_limit_per_s is None:
            return None
        b = self._buckets.get(job.conn_id)
        if b is None or b.rate_per_s != job.rate_limit_per_s:
            b = self._buckets[job.conn_id] = TokenBucket(job.rate_limit_per_s)
        return b

    def _circuit_gauge(self) -> None:
        CIRCUITS_OPEN.labels(self.target.name).set(
            sum(1 for b in self._breakers.values() if b.state is not CircuitState.CLOSED)
        )

    # -- background loops ----------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.cfg.commit_interval_s)
            try:
                await self._commit([tp for tp in self._offsets if tp not in self._revoking])
            except Exception as e:
                log.warning("offset commit failed; will retry", error=repr(e))

    async def _commit(self, tps: Sequence[TopicPartition]) -> None:
        assert self._consumer is not None
        offsets = {}
        for tp in tps:
            o = self._offsets[tp].committable() if tp in self._offsets else None
            if tp in self._offsets:
                self.watch.position(tp, o, self._offsets[tp].pending)
            if o is not None and self._committed.get(tp) != o:
                offsets[tp] = o
        if offsets:
            await self._consumer.commit(offsets)
            self._committed.update(offsets)
        for tp in tps:
            hw = self._consumer.highwater(tp)
            if hw is not None and tp in self._committed:
                CONSUMER_LAG.labels(self.group_id, tp.topic, str(tp.partition)).set(hw - self._committed[tp])

    async def _park_loop(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.cfg.park_poll_s)
            try:
                parts = {tp.partition: tp for tp in self._offsets if tp not in self._revoking}
                for lane_id, partition in await self.ledger.due_lanes(self.target.name, list(parts), _now()):
                    lane = self._lane(lane_id, parts[partition])
                    lane.parked = True
                    self._wake(lane)
                PARKED.labels(self.target.name).set(await self.ledger.parked_count(self.target.name))
            except Exception as e:
                log.warning("parked deliveries could not be read; will retry", error=repr(e))

    # -- rebalancing ---------------------------------------------------------------------------------

    async def _assigned(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self._offsets[tp] = PartitionOffsets()
            self._buffered[tp] = 0
            self._revoking.discard(tp)
            self._committed.pop(tp, None)
        by_partition = {tp.partition: tp for tp in tps}
        # Lanes with parked deliveries must hold new events back from the first record on.
        for lane_id, partition in (
            await self.ledger.parked_lanes(self.target.name, list(by_partition))
        ).items():
            self._lane(lane_id, by_partition[partition]).parked = True
        log.info("partitions assigned", target=self.target.name, partitions=sorted(by_partition))

    async def _drain(self, tps: Sequence[TopicPartition]) -> None:
        """Let the lanes of ``tps`` finish what is on the wire, then commit what is done."""
        self._revoking.update(tps)
        for tp in tps:
            self.watch.forget(tp)
        lanes = [lane for lane in self._lanes.values() if lane.tp in self._revoking and lane.task is not None]
        tasks = [lane.task for lane in lanes if lane.task is not None]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.cfg.shutdown_grace_s)
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._commit(list(tps))

    async def _revoked(self, tps: Sequence[TopicPartition]) -> None:
        await self._drain(tps)
        for tp in tps:
            self._offsets.pop(tp, None)
            self._buffered.pop(tp, None)
            self._committed.pop(tp, None)
        for lane_id in [i for i, lane in self._lanes.items() if lane.tp in tps]:
            del self._lanes[lane_id]
        log.info("partitions revoked", target=self.target.name, partitions=sorted(tp.partition for tp in tps))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, runtime: DeliveryRuntime) -> None:
        self.runtime = runtime

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.runtime._revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.runtime._assigned(list(assigned))
