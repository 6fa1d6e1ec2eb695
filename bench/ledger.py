"""The ledger's transactions on SQLite: the group commit in its writer thread vs over aiosqlite, one run.

The same operations, on two ledgers over two fresh files, measured one after the other in this process:
CPU milliseconds per operation (``time.process_time``: every thread of the process) and wall time. The
operations are what sits on the path of a webhook: the normalizer's ``intake`` of a batch (its dedupe claim
and history), and a delivery's ``begin`` and ``record``, one at a time (the 200/s case, where the group
commit has nothing to coalesce) and 100 at a time. Run: ``python -m bench.ledger``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from services.common.ledger import Ledger, Seen, make_engine, upgrade
from services.common.outcome import Outcome

Op = Callable[[int], Awaitable[None]]


def _history(event_id: str, now: datetime) -> dict[str, object]:
    return dict(
        id=event_id, source="bench", event="client-created", received_at=now, client_id=event_id,
        phone="+79161234567", kafka_key=f"bench:{event_id}", inbox="{" + "x" * 800 + "}",
        normalized="{" + "y" * 1500 + "}", quarantine_reason=None,
    )  # fmt: skip


def operations(ledger: Ledger, tag: str) -> dict[str, tuple[Op, int]]:
    """Name -> (one operation by number, how many run at once)."""
    now = datetime.now(UTC)

    async def intake(i: int, size: int) -> None:
        ids = [f"{tag}-i{i}-{j}" for j in range(size)]
        seen = [Seen(f"fp-{e}", f"scope-{e}", e, now) for e in ids]
        await ledger.intake(seen, [_history(e, now) for e in ids], window_s=600)

    async def begin(i: int) -> None:
        await ledger.begin(f"{tag}-k{i}", event_id=f"e{i}", source="bench", connection="c", target="maxma",
                           action="new-client")  # fmt: skip

    async def record(i: int) -> None:
        await ledger.record(f"{tag}-k{i}", Outcome.success(target_ref=str(i)), started_at=now, duration_s=0.05,
                            final=True)  # fmt: skip

    async def delivery(i: int) -> None:
        await begin(100_000 + i)
        await ledger.remember_entity("bench/c", "client", f"{tag}-{i}", str(i), "h" * 64, wait=False)
        await record(100_000 + i)

    return {
        "intake, batch of 1": (lambda i: intake(i, 1), 1),
        "intake, batch of 4": (lambda i: intake(10_000 + i, 4), 1),
        "intake, batch of 20": (lambda i: intake(20_000 + i, 20), 1),
        "begin": (begin, 1),
        "record": (record, 1),
        "delivery (begin, entity, record)": (delivery, 1),
        "delivery, 100 at a time": (lambda i: delivery(50_000 + i), 100),
    }


async def measure(op: Op, count: int, at_once: int) -> tuple[float, float]:
    """CPU and wall milliseconds per operation."""
    await op(-1)
    sem = asyncio.Semaphore(at_once)

    async def one(i: int) -> None:
        async with sem:
            await op(i)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    return (time.process_time() - cpu) / count * 1000, (time.perf_counter() - wall) / count * 1000


async def main(count: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="relay-bench-ledger-"))
    ledgers = {}
    for name, thread in (("writer thread", True), ("aiosqlite", False)):
        engine = make_engine(f"sqlite+aiosqlite:///{work / name.replace(' ', '-')}.db")
        await upgrade(engine)
        ledgers[name] = Ledger(engine, write_thread=thread)
    results: dict[str, dict[str, tuple[float, float]]] = {}
    try:
        for name, ledger in ledgers.items():
            for op_name, (op, at_once) in operations(ledger, name[:3]).items():
                results.setdefault(op_name, {})[name] = await measure(op, count, at_once)
    finally:
        for ledger in ledgers.values():
            await ledger.close()
    print(f"{count} of each, SQLite file (WAL), CPU ms per operation (all threads), wall ms in brackets")
    print(f"{'operation':36}{'writer thread':>20}{'aiosqlite':>20}{'CPU ratio':>11}")
    for op_name, by in results.items():
        (tc, tw), (ac, aw) = by["writer thread"], by["aiosqlite"]
        print(f"{op_name:36}{f'{tc:.2f} ({tw:.2f})':>20}{f'{ac:.2f} ({aw:.2f})':>20}{ac / tc:>10.2f}x")
    slug = {"intake, batch of 4": "intake4", "begin": "begin", "record": "record",
            "delivery (begin, entity, record)": "delivery"}  # fmt: skip
    print("RESULT " + " ".join(
        f"{s}_cpu_ms={results[o]['writer thread'][0]:.2f} {s}_aiosqlite_cpu_ms={results[o]['aiosqlite'][0]:.2f}"
        for o, s in slug.items()
    ))  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=500)
    asyncio.run(main(parser.parse_args().count))
