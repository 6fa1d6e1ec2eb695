"""The delivery runtime with a scripted target on Tansu and SQLite: order, parking, retries, the circuit, the
rate limit, the dead-letter topic and replay, with no vendor involved (issue 9)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import REGISTRY

from services.common.config import KafkaSettings, Settings
from services.common.delivery.runtime import DeliveryRuntime, Job
from services.common.delivery.steps import Steps
from services.common.events import CloudEvent
from services.common.kafka import EVENTS, dlq_topic
from services.common.ledger import Ledger, idempotency_key, upgrade
from services.common.ops import DlqFilter, read_dlq, replay
from services.common.outcome import Outcome
from tests.common.fake_target import ACTION, CONNECTION, NAME, SOURCE, FakeTarget
from tests.support import FAST_DELIVERY, client_event, committed, eventually, publish_events


@dataclass
class Running:
    target: FakeTarget
    runtime: DeliveryRuntime
    ledger: Ledger
    bootstrap: str

    async def status(self, event_id: str) -> str | None:
        d = await self.ledger.get(idempotency_key(NAME, CONNECTION, ACTION, event_id))
        return d.status.value if d else None


@contextlib.asynccontextmanager
async def running(
    kafka: KafkaSettings, tmp_path: Path, target: FakeTarget | None = None, **delivery: Any
) -> AsyncIterator[Running]:
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        if dlq_topic(NAME) not in await admin.list_topics():
            await admin.create_topics([NewTopic(dlq_topic(NAME), num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()
    settings = Settings.model_validate(
        {"kafka": kafka.model_dump(), "database_url": f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}",
         "delivery": {**FAST_DELIVERY, **delivery}}
    )  # fmt: skip
    ledger = Ledger.from_url(settings.database_url)
    await upgrade(ledger.engine)
    target = target or FakeTarget()
    runtime = DeliveryRuntime(target, settings, ledger)
    await runtime.start()
    try:
        yield Running(target, runtime, ledger, kafka.bootstrap_servers)
    finally:
        await runtime.stop()
        await ledger.close()


def _ids(calls: list[Any]) -> list[str]:
    return [c.event_id for c in calls]


async def test_a_retried_key_holds_back_only_its_own_events(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, retry_schedule="0,0.5s") as r:
        r.target.fail("A", Outcome.retryable("busy"), Outcome.retryable("busy"))
        await publish_events(
            r.bootstrap,
            *[client_event(f"a{i}", "A", "+79160000001") for i in range(3)],
            *[client_event(f"b{i}", f"B{i}", None) for i in range(5)],
        )
        await eventually(lambda: len(r.target.calls_of("A")) == 5, what="A's three events")
        await eventually(lambda: len(r.target.delivered()) == 8, what="every event")
        a = r.target.calls_of("A")
        assert _ids(a) == ["a0", "a0", "a0", "a1", "a2"]
        others = [c for c in r.target.calls if c.client_id.startswith("B")]
        assert max(c.at for c in others) < a[2].at  # the other keys did not wait for A's retries


async def test_a_late_retry_is_parked_and_the_offsets_move_on(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, retry_schedule="0,3s", hold_in_memory_s=0.1) as r:
        r.target.fail("A", Outcome.retryable("busy"), Outcome.retryable("busy"))
        await publish_events(
            r.bootstrap,
            *[client_event(f"a{i}", "A", None) for i in range(3)],
            *[client_event(f"b{i}", f"B{i}", None) for i in range(3)],
        )

        async def parked_and_committed() -> bool:
            offsets = await committed(r.bootstrap, f"relay-{NAME}", EVENTS)
            return await r.ledger.parked_count(NAME) == 3 and sum(offsets.values()) == 6

        await eventually(parked_and_committed, timeout=15, what="A parked and every offset committed")
        await eventually(lambda: len(r.target.calls_of("A")) == 5, timeout=20, what="A after its retry")
        assert _ids(r.target.calls_of("A")) == ["a0", "a0", "a0", "a1", "a2"]

        async def nothing_parked() -> bool:
            return await r.ledger.parked_count(NAME) == 0

        await eventually(nothing_parked, timeout=5, what="nothing parked")


async def test_the_circuit_parks_without_burning_attempts_and_recovers(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    settings = {"retry_schedule": "0,0.3s,0.3s,0.3s", "circuit_failures": 3, "circuit_open_s": 1.0}
    async with running(kafka, tmp_path, **settings) as r:
        r.target.failing = Outcome.retryable("down", http_status=503)
        await publish_events(r.bootstrap, *[client_event(f"e{i}", f"C{i}", None) for i in range(8)])

        async def some_parked() -> bool:
            return await r.ledger.parked_count(NAME) > 0

        await eventually(some_parked, what="deliveries parked behind the open circuit")
        during_outage = len(r.target.calls)
        r.target.failing = None
        await eventually(
            lambda: len(r.target.delivered()) == 8, timeout=30, what="every event after recovery"
        )
        assert during_outage < 8 * 5  # a few probes, not eight events times five attempts

        async def all_delivered() -> bool:
            return all([await r.status(f"e{i}") == "delivered" for i in range(8)])

        await eventually(all_delivered, timeout=10, what="every delivery recorded")
        for i in range(8):
            d = await r.ledger.get(idempotency_key(NAME, CONNECTION, ACTION, f"e{i}"))
            assert d is not None
            assert d.attempts <= 5  # parking for the circuit is not an attempt


async def test_the_rate_limit_holds(kafka: KafkaSettings, tmp_path: Path) -> None:
    async with running(kafka, tmp_path, FakeTarget(rate_limit_per_s=10)) as r:
        await publish_events(r.bootstrap, *[client_event(f"e{i}", f"R{i}", None) for i in range(40)])
        await eventually(lambda: len(r.target.delivered()) == 40, timeout=30, what="every event")
        times = sorted(c.at for c in r.target.calls)
        assert times[-1] - times[0] >= 2.9  # a full bucket (10) at once, then 10 a second
        for i, start in enumerate(times):
            assert sum(1 for x in times[i:] if x - start < 1.0) <= 20


async def test_a_permanent_failure_is_a_dead_letter_and_its_replay_delivers_once(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    async with running(kafka, tmp_path) as r:
        r.target.fail("D", Outcome.permanent("rejected", http_status=422, vendor_code="77"))
        await publish_events(r.bootstrap, client_event("d0", "D", None), client_event("x0", "X", None))
        flt = DlqFilter(targets=(NAME,))

        async def dead() -> bool:
            return len(await read_dlq(r.bootstrap, [NAME], flt)) == 1

        await eventually(dead, what="the dead letter")
        (letter,) = await read_dlq(r.bootstrap, [NAME], flt)
        assert (letter.event_id, letter.vendor_code, letter.http_status, letter.class_) == (
            "d0",
            "77",
            422,
            "permanent",
        )

        assert await replay(r.bootstrap, [letter]) == 1
        await eventually(lambda: "d0" in r.target.delivered(), what="the replayed event delivered")

        async def recorded() -> bool:
            return await r.status("d0") == "delivered"

        await eventually(recorded, timeout=10, what="the replay recorded")
        assert await replay(r.bootstrap, [letter]) == 1  # again: the ledger says it is done
        await eventually(
            lambda: _all_committed(r.bootstrap, 4), what="the second replay read"
        )  # two events, two replays
        assert _ids(r.target.calls_of("D")) == ["d0", "d0"]


async def _all_committed(bootstrap: str, n: int) -> bool:
    return sum((await committed(bootstrap, f"relay-{NAME}", EVENTS)).values()) >= n


class TwoSteps(FakeTarget):
    """``create`` then ``attach``, each an effect of its own; the first attempt dies between the two."""

    def __init__(self, die_after_create: asyncio.Event | None) -> None:
        super().__init__()
        self.created: list[str] = []
        self.attached: list[tuple[str, str]] = []
        self.die = die_after_create
        self.dying = asyncio.Event()

    async def deliver(self, job: Job, event: CloudEvent, idempotency_key: str, steps: Steps) -> Outcome:
        made = await steps.result("create")
        if made is None:
            made = f"contact-{event.id}"
            self.created.append(event.id)
            await steps.finish("create", made)
        if self.die is not None:
            self.dying.set()
            await self.die.wait()  # the process "dies" here: never answers, the record stays uncommitted
        if await steps.result("attach") is None:
            self.attached.append((event.id, made))
            await steps.finish("attach", f"deal-on-{made}")
        await steps.remember("client", event.data.client.id if event.data.client else "", made)
        return Outcome.success(target_ref=made)


async def test_a_delivery_of_two_steps_resumes_at_the_unfinished_one_after_a_crash(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    never = asyncio.Event()
    first = TwoSteps(die_after_create=never)
    async with running(kafka, tmp_path, first, shutdown_grace_s=0.5) as r:
        await publish_events(r.bootstrap, client_event("s0", "S", None))
        await asyncio.wait_for(first.dying.wait(), 15)
    # Stopped with the attempt still on the wire: nothing committed, `create` kept with its result.
    assert first.created == ["s0"]
    assert first.attached == []
    second = TwoSteps(die_after_create=None)
    async with running(kafka, tmp_path, second) as r:
        await eventually(lambda: second.attached != [], timeout=30, what="the event read again and resumed")

        async def recorded() -> bool:
            return await r.status("s0") == "delivered"

        await eventually(recorded, timeout=10, what="the delivery recorded")
        entity = await r.ledger.entity(f"{SOURCE}/{CONNECTION}", "client", "S")
    assert second.created == []  # the create step was not sent again
    assert second.attached == [("s0", "contact-s0")]  # the second step got the first step's result
    assert entity is not None
    assert entity.target_id == "contact-s0"


async def test_a_failure_every_call_shares_opens_the_circuit_at_once(
    kafka: KafkaSettings, tmp_path: Path
) -> None:
    # A refused key (Maxma 22, 401) or an unknown shop (5): one dead letter says so, the rest wait parked.
    async with running(kafka, tmp_path, circuit_failures=5, circuit_open_s=30.0) as r:
        r.target.fail(
            "K", Outcome.permanent("bad key", http_status=401, hint="check the key", opens_circuit=True)
        )
        await publish_events(r.bootstrap, client_event("k0", "K", None))
        flt = DlqFilter(targets=(NAME,))

        async def dead() -> bool:
            return len(await read_dlq(r.bootstrap, [NAME], flt)) == 1

        await eventually(dead, what="the dead letter")
        await publish_events(r.bootstrap, client_event("k1", "L", None))
        (letter,) = await read_dlq(r.bootstrap, [NAME], flt)
        assert (letter.event_id, letter.hint, letter.opened_circuit) == ("k0", "check the key", True)

        async def parked() -> bool:
            return await r.ledger.parked_count(NAME) == 1

        await eventually(parked, what="the next event parked behind the open circuit")
        assert _ids(r.target.calls) == ["k0"]  # one failure was enough: k1 was never sent
        assert REGISTRY.get_sample_value("relay_circuits_open", {"target": NAME}) == 1


async def test_a_skip_is_counted_and_settled(kafka: KafkaSettings, tmp_path: Path) -> None:
    before = REGISTRY.get_sample_value(
        "relay_delivery_skips_total", {"target": NAME, "action": ACTION, "reason": "nothing_to_do"}
    )
    async with running(kafka, tmp_path) as r:
        r.target.fail("S", Outcome.skip("nothing_to_do", "no order to cancel"))
        await publish_events(r.bootstrap, client_event("s0", "S", None))

        async def settled() -> bool:
            return await r.status("s0") == "delivered"

        await eventually(settled, what="the skip settled")
        after = REGISTRY.get_sample_value(
            "relay_delivery_skips_total", {"target": NAME, "action": ACTION, "reason": "nothing_to_do"}
        )
        assert (after or 0) - (before or 0) == 1
        assert await read_dlq(r.bootstrap, [NAME], DlqFilter(targets=(NAME,))) == []
