"""End to end: webhook accepted (202) -> sandbox Maxma received, at fixed rates, against a floor in the same run.

For each rate of ``--rates`` (default 200,1000) a fresh stack, nothing reused from the rate before: a new
work directory, sandbox Maxma, Tansu broker and ledger (SQLite in the work directory, or with ``--database
postgres`` a new PostgreSQL database ``relay_bench_<pid>`` on 127.0.0.1:5432, dropped at the end of the rate,
also on failure). Each rate runs two phases, one after the other, against the same sandbox (reset in
between), each sending ``--seconds`` of ``client-created`` webhooks at the rate, each with its own client ids.
The webhooks go out open loop (request ``i`` at ``start + i / rate``, whatever the answers) over
``bench.loadgen``'s raw keep-alive connections, a few tenths of a millisecond of CPU per webhook.

1. **floor**: ``bench/floor.py``, a bare FastAPI endpoint under uvicorn that answers 202 at once and forwards
   the webhook to the sandbox over HTTP with the relay's own mapping and Maxma client: no Kafka, no ledger.
   Nothing of the relay runs yet (not even the broker).
2. **relay**: the floor process is stopped; the broker starts, one bare Kafka hop is measured on it (aiokafka
   ``acks=all`` producer -> consumer, the floor any Kafka hop pays; the pipeline has two), then the roles
   start (ingest API, normalizer, maxma; each its own process, ``RELAY_GC_FREEZE`` per ``--gc-freeze``).

Both phases are measured alike: from the 202 answer to the time the sandbox received that client's
``new-client`` request (``/_sandbox/requests``: ``time``, ``body.client.externalId``). The phase ends when
every accepted webhook arrived, or ``max(60, 4 * seconds)`` s after the last send (the rest counts as lost):
completion is watched through counters (``/_floor/stats``, the maxma role's ``relay_deliveries_total``), so
the sandbox's request log is read only once a phase looks complete. CPU per webhook is each process's
utime + stime (``/proc/PID/stat``, all threads) from the first send to the moment the last delivery was
seen, divided by the webhooks sent: the floor and the sandbox, or each role, the sandbox, the broker and
(PostgreSQL) the server's processes for the ledger; the load generator (this process) in both. RSS is read
at the end of each phase.

Each rate ends with one ``RESULT`` line. Exit status 1 if a phase at 200/s or less lost a webhook, or any
phase sent a duplicate request. Run: ``make bench`` or ``python -m bench.e2e [--rates 200,1000]
[--seconds 15] [--database sqlite|postgres] [--gc-freeze on|off]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench import loadgen
from bench.stack import (
    TOKEN,
    cpu_times,
    log,
    maxma_config,
    pct,
    pg_database,
    pg_pids,
    relay_env,
    rss_mb,
    stop_proc,
    wait_http,
)
from services.common.embedded import EmbeddedBroker, free_port
from services.common.httpclient import make_http_client
from services.common.ledger import migrate
from services.sandbox.samples import client_params

RELAY_ROLES = ("ingest-api", "normalizer", "maxma")
# Client ids of a phase: 6,400,000 + this + i (client_params), so the phases never share one.
ID_OFFSET = {"floor": 0, "relay": 1_000_000}
LOADGEN = "load generator"
DB = "postgresql"
HOOK = f"/hooks/klientiks/{TOKEN}/client-created"


async def kafka_hop(bootstrap: str, rate: float, count: int) -> list[float]:
    """Latency of one produce (acks=all) -> consume hop at ``rate`` records/s."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic("bench.hop", num_partitions=12, replication_factor=1)])
    await admin.close()
    consumer = AIOKafkaConsumer(
        "bench.hop",
        bootstrap_servers=bootstrap,
        group_id="bench-hop",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=20,
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    await consumer.start()
    while not consumer.assignment():
        await asyncio.sleep(0.05)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    sent: dict[bytes, float] = {}
    got: dict[bytes, float] = {}

    async def consume() -> None:
        while len(got) < count:
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                now = time.time()
                got.update((r.key, now) for r in recs)

    async def produce(key: bytes) -> None:
        await producer.send_and_wait("bench.hop", b"x" * 400, key=key)
        sent[key] = time.time()  # like the webhook: measured from the moment the write was acknowledged

    task = asyncio.create_task(consume())
    start, sends = time.monotonic(), []
    for i in range(count):  # open loop, like the webhooks: a slow ack does not hold the next record back
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        sends.append(asyncio.create_task(produce(f"k{i}".encode())))
    await asyncio.gather(*sends)
    await asyncio.wait_for(task, 30)
    await producer.stop()
    await consumer.stop()
    # A record can be fetched before its producer ack returns: that hop cost nothing after the ack.
    return [max(0.0, got[k] - t) for k, t in sent.items()]


@dataclass
class Phase:
    name: str
    sent: int
    sent_rps: float
    accepted: int
    refused: int  # not answered 202 (or no answer): the sender knows, so not lost
    request_ms: list[float]
    e2e_ms: list[float]
    lost: int
    dupes: int
    waited_s: float  # from the last send until every delivery was seen (or the deadline)
    cpu_ms: dict[str, float]  # per process: CPU milliseconds (user + system) per webhook sent
    sys_ms: dict[str, float]  # of which system (kernel) time
    rss: dict[str, float]


def _external_id(request: Mapping[str, Any]) -> str | None:
    body = request.get("body")
    client = body.get("client") if isinstance(body, dict) else None
    ext = client.get("externalId") if isinstance(client, dict) else None
    return str(ext) if ext is not None else None


@dataclass
class Sent:
    answers: dict[int, tuple[int, float]]  # request index -> (status, epoch seconds of the answer)
    request_ms: list[float]  # answer - actual send
    errors: int  # connections lost with a request in flight
    sent_rps: float  # over the sending span
    last_sent: float  # time.perf_counter() when the last request was sent


async def send_webhooks(
    host: str, port: int, requests: list[bytes], rate: float, connections: int = 64
) -> Sent:
    """Request ``i`` (prebuilt bytes) due at ``start + i / rate`` on an idle keep-alive connection, a new
    one if none is idle: open loop, on ``bench.loadgen``'s raw protocol (an httpx client cost ~2 ms of CPU
    per request on this VM, as much as a relay role, and could not keep 200/s)."""
    loop = asyncio.get_running_loop()
    count = len(requests)
    res = Sent({}, [], 0, 0.0, 0.0)
    sent = [0.0] * count
    idle: deque[loadgen._Conn] = deque()
    pending = count
    all_done = loop.create_future()
    if not count:
        all_done.set_result(None)

    def finish_one() -> None:
        nonlocal pending
        pending -= 1
        if pending == 0 and not all_done.done():
            all_done.set_result(None)

    def on_answer(conn: loadgen._Conn, status: int, i: int) -> None:
        res.answers[i] = (status, time.time())
        res.request_ms.append((time.perf_counter() - sent[i]) * 1000)
        idle.append(conn)  # FIFO: every connection stays in use, none idles into the keep-alive timeout
        finish_one()

    def on_lost(conn: loadgen._Conn) -> None:
        if conn.current >= 0:
            res.errors += 1
            conn.current = -1
            finish_one()

    def send(conn: loadgen._Conn, i: int) -> None:
        sent[i] = time.perf_counter()
        conn.send(requests[i], i)

    async def send_on_new(i: int) -> None:
        try:
            conn = await loadgen._open(host, port, on_answer, on_lost)
        except OSError:
            res.errors += 1
            finish_one()
            return
        opened.append(conn)
        send(conn, i)

    opened = list(
        await asyncio.gather(*(loadgen._open(host, port, on_answer, on_lost) for _ in range(connections)))
    )
    idle.extend(opened)
    start = time.perf_counter() + 0.01
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        while idle and idle[0].closed:
            idle.popleft()
        if idle:
            send(idle.popleft(), i)
        else:
            loadgen._spawn(send_on_new(i))
    res.last_sent = time.perf_counter()
    res.sent_rps = count / (res.last_sent - start) if count else 0.0
    # An answer later than this counts as refused: a sender would have given up on it.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_done, 60)
    for c in opened:
        c.close()
    return res


async def run_phase(
    name: str,
    http: httpx.AsyncClient,
    port: int,
    sandbox_url: str,
    rate: float,
    count: int,
    pids: dict[str, int],
    progress: Callable[[], Awaitable[int]],
    wait_s: float,
    db_pids: Callable[[], Awaitable[list[int]]] | None = None,
) -> Phase:
    """Send ``count`` webhooks to 127.0.0.1:``port`` at ``rate``; wait for them at the sandbox; measure."""
    seed = int(time.time())
    ids = [str(6_400_000 + ID_OFFSET[name] + i) for i in range(count)]
    requests = [
        loadgen.build_get(
            "127.0.0.1", port, f"{HOOK}?{urlencode(client_params(ID_OFFSET[name] + i, seed=seed))}"
        )
        for i in range(count)
    ]
    pids = pids | {LOADGEN: os.getpid()}
    # The PostgreSQL server's processes that work for the ledger: they change (a pool opens a connection).
    db_start = await db_pids() if db_pids else []

    def cpu() -> dict[str, tuple[float, float]]:
        return {k: cpu_times(pid) for k, pid in pids.items()} | {str(pid): cpu_times(pid) for pid in db_start}

    log(f"{name}: sending {count} webhooks at {rate:.0f}/s")
    cpu0 = cpu()
    out = await send_webhooks("127.0.0.1", port, requests, rate)
    sent_at = out.last_sent
    deadline = sent_at + wait_s
    accepted = {ids[i]: at for i, (status, at) in out.answers.items() if status == 202}
    refused = count - len(accepted)

    async def sandbox_log() -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = (await http.get(f"{sandbox_url}/_sandbox/requests", timeout=60)).json()
        return got

    def arrived(received: list[dict[str, Any]]) -> int:
        return len({_external_id(r) for r in received} & accepted.keys())

    # Watch a cheap counter; read the sandbox's log (costly at thousands of requests) when the counter says
    # done or has not moved for 3 s (at most every 2 s), and at the deadline.
    received: list[dict[str, Any]] = []
    last, moved, next_read = -1, time.perf_counter(), 0.0
    while True:
        done = await progress()
        cpu1, seen_at = cpu(), time.perf_counter()
        if done != last:
            last, moved = done, seen_at
        looks_done = done >= len(accepted) or seen_at - moved > 3
        if (looks_done and seen_at >= next_read) or seen_at > deadline:
            received = await sandbox_log()
            if arrived(received) >= len(accepted) or seen_at > deadline:
                break
            next_read = seen_at + 2
        await asyncio.sleep(0.2)
    waited = seen_at - sent_at
    rss = {k: rss_mb(pid) for k, pid in pids.items()}
    cpu_ms = {k: (sum(cpu1[k]) - sum(cpu0[k])) * 1000 / count for k in pids}
    sys_ms = {k: (cpu1[k][1] - cpu0[k][1]) * 1000 / count for k in pids}
    if db_pids:
        # A process started during the phase counts whole; one gone by its end is missed (NaN, skipped).
        db_end = set(await db_pids()) - set(db_start)
        cpu1 |= {str(pid): cpu_times(pid) for pid in db_end}
        spent = [
            (cpu1[k][0] - cpu0.get(k, (0.0, 0.0))[0], cpu1[k][1] - cpu0.get(k, (0.0, 0.0))[1])
            for k in map(str, [*db_start, *db_end])
            if not math.isnan(cpu1[k][0])
        ]
        cpu_ms[DB] = sum(u + s for u, s in spent) * 1000 / count
        sys_ms[DB] = sum(s for _, s in spent) * 1000 / count
        rss[DB] = float("nan")  # shared memory: a sum over its processes would say nothing

    first_seen: dict[str, float] = {}
    per_client: dict[str, int] = {}
    for r in received:
        ext = _external_id(r)
        if ext is None:
            continue
        per_client[ext] = per_client.get(ext, 0) + 1
        first_seen.setdefault(ext, float(r["time"]))
    e2e = [(first_seen[c] - t) * 1000 for c, t in accepted.items() if c in first_seen]
    log(f"{name}: {len(e2e)} of {len(accepted)} delivered, {waited:.1f} s after the last send")
    return Phase(
        name=name,
        sent=count,
        sent_rps=out.sent_rps,
        accepted=len(accepted),
        refused=refused,
        request_ms=out.request_ms,
        e2e_ms=e2e,
        lost=len(accepted) - len(e2e),
        dupes=sum(n - 1 for n in per_client.values() if n > 1),
        waited_s=waited,
        cpu_ms=cpu_ms,
        sys_ms=sys_ms,
        rss=rss,
    )


def _deliveries(metrics: str) -> int:
    """new-client outcomes the maxma role counted (``relay_deliveries_total``), skips left out."""
    n = 0.0
    for line in metrics.splitlines():
        if (
            line.startswith("relay_deliveries_total{")
            and 'action="new-client"' in line
            and 'outcome="skipped"' not in line
        ):
            n += float(line.rsplit(" ", 1)[1])
    return int(n)


def _spawn(name: str, argv: list[str], env: dict[str, str], work: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", *argv],
        env=env,
        stdout=(work / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


async def run_rate(rate: float, seconds: float, database: str, gc_freeze: bool) -> tuple[bool, list[str]]:
    """Both phases at one rate on a fresh stack; returns (passed, the printed report)."""
    count = int(rate * seconds)
    wait_s = max(60.0, 4 * seconds)
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    sandbox_port, floor_port, api_port, norm_port, maxma_port = (free_port() for _ in range(5))
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    config = maxma_config(work, sandbox_url)  # writes work/key, the sandbox's processing key
    base_env = relay_env(config, "", work)  # the sandbox and the floor read no relay setting
    procs: dict[str, subprocess.Popen[bytes]] = {}
    broker: EmbeddedBroker | None = None
    log(f"{rate:.0f}/s: processes' logs in {work}")
    async with contextlib.AsyncExitStack() as stack:
        try:
            db_url = None
            if database == "postgres":
                db_url = await stack.enter_async_context(pg_database(f"relay_bench_{os.getpid()}"))
            # For the control calls (counters, the sandbox's log and reset); the webhooks go out on loadgen's.
            http = await stack.enter_async_context(make_http_client(8))
            procs["sandbox-maxma"] = _spawn(
                "sandbox-maxma",
                ["services.cli", "sandbox", "maxma", "--key-file", str(work / "key"),
                 "--host", "127.0.0.1", "--port", str(sandbox_port)],
                base_env,
                work,
            )  # fmt: skip
            await wait_http(f"{sandbox_url}/_sandbox/clients")

            # -- floor: nothing of the relay runs.
            procs["floor"] = _spawn(
                "floor",
                ["bench.floor", "--port", str(floor_port), "--sandbox-url", sandbox_url,
                 "--key-file", str(work / "key"), "--gc-freeze", "on" if gc_freeze else "off"],
                base_env,
                work,
            )  # fmt: skip
            floor_base = f"http://127.0.0.1:{floor_port}"
            await wait_http(f"{floor_base}/healthz")

            async def floor_progress() -> int:
                stats = (await http.get(f"{floor_base}/_floor/stats")).json()
                return int(stats["ok"]) + int(stats["failed"])

            floor = await run_phase(
                "floor",
                http,
                floor_port,
                sandbox_url,
                rate,
                count,
                {n: procs[n].pid for n in ("floor", "sandbox-maxma")},
                floor_progress,
                wait_s,
            )
            stop_proc(procs.pop("floor"))
            (await http.post(f"{sandbox_url}/_sandbox/reset")).raise_for_status()

            # -- relay: the broker, one bare Kafka hop on it, then the roles.
            broker = EmbeddedBroker().start()
            log(f"one Kafka hop: {count} records at {rate:.0f}/s")
            hop_ms = [h * 1000 for h in await kafka_hop(broker.bootstrap_servers, rate, count)]
            env = relay_env(
                config,
                broker.bootstrap_servers,
                work,
                database_url=db_url,
                RELAY_GC_FREEZE="true" if gc_freeze else "false",
            )
            await migrate(env["RELAY_DATABASE_URL"])
            ports = {"ingest-api": api_port, "normalizer": norm_port, "maxma": maxma_port}
            cli = {
                "ingest-api": ["ingest", "api"],
                "normalizer": ["ingest", "normalizer"],
                "maxma": ["maxma"],
            }
            for name in RELAY_ROLES:
                procs[name] = _spawn(
                    name,
                    ["services.cli", *cli[name], "--host", "127.0.0.1", "--port", str(ports[name])],
                    env,
                    work,
                )
            for name in RELAY_ROLES:
                await wait_http(f"http://127.0.0.1:{ports[name]}/readyz")
            await asyncio.sleep(4)  # consumer groups join in ~3 s on Tansu

            async def relay_progress() -> int:
                return _deliveries((await http.get(f"http://127.0.0.1:{maxma_port}/metrics/")).text)

            relay = await run_phase(
                "relay",
                http,
                api_port,
                sandbox_url,
                rate,
                count,
                {n: procs[n].pid for n in (*RELAY_ROLES, "sandbox-maxma")} | {"broker": broker.pid or 0},
                relay_progress,
                wait_s,
                (lambda: pg_pids(db_url)) if db_url else None,
            )
        finally:
            for p in procs.values():
                stop_proc(p)
            if broker is not None:
                broker.stop()
    report = _report(rate, seconds, database, gc_freeze, floor, relay, hop_ms)
    failed = relay.dupes > 0 or floor.dupes > 0 or (rate <= 200 and (relay.lost > 0 or floor.lost > 0))
    return not failed, report


def _report(
    rate: float,
    seconds: float,
    database: str,
    gc_freeze: bool,
    floor: Phase,
    relay: Phase,
    hop_ms: list[float],
) -> list[str]:
    def row(label: str, values: list[float]) -> str:
        mean = statistics.fmean(values) if values else float("nan")
        return f"{label:34}{pct(values, 0.5):10.1f}{pct(values, 0.99):10.1f}{mean:10.1f}"

    f50, f99 = pct(floor.e2e_ms, 0.5), pct(floor.e2e_ms, 0.99)
    e50, e99 = pct(relay.e2e_ms, 0.5), pct(relay.e2e_ms, 0.99)
    h50, h99 = pct(hop_ms, 0.5), pct(hop_ms, 0.99)
    relay_cpu = sum(relay.cpu_ms[n] for n in RELAY_ROLES)
    max_rss = max(relay.rss[n] for n in RELAY_ROLES)
    out = [
        f"=== {rate:.0f}/s for {seconds:g} s: {relay.sent} webhooks per phase, {database} ledger, "
        f"gc.freeze {'on' if gc_freeze else 'off'}, fresh stack",
        f"{'':34}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}",
        row("floor: request (202)", floor.request_ms),
        row("floor: 202 -> Maxma", floor.e2e_ms),
        row("relay: ingest request (202)", relay.request_ms),
        row("relay: end to end (202 -> Maxma)", relay.e2e_ms),
        row("one Kafka hop (acks=all)", hop_ms),
        f"relay / floor: p50 {e50 / f50:.2f}x, p99 {e99 / f99:.2f}x",
        "",
        f"{'phase':8}{'sent/s':>8}{'sent':>8}{'accepted':>10}{'refused':>9}{'delivered':>11}{'lost':>6}"
        f"{'dupes':>7}{'waited s':>10}",
    ]
    for ph in (floor, relay):
        out.append(
            f"{ph.name:8}{ph.sent_rps:8.0f}{ph.sent:8}{ph.accepted:10}{ph.refused:9}{len(ph.e2e_ms):11}"
            f"{ph.lost:6}{ph.dupes:7}{ph.waited_s:10.1f}"
        )
    out += ["", f"{'process':20}{'phase':8}{'RSS MB':>8}{'CPU ms/webhook':>16}{'of it system':>14}"]
    for ph in (floor, relay):
        for name in ph.cpu_ms:
            rss = "-" if math.isnan(ph.rss[name]) else f"{ph.rss[name]:.0f}"
            out.append(f"{name:20}{ph.name:8}{rss:>8}{ph.cpu_ms[name]:16.3f}{ph.sys_ms[name]:14.3f}")
    relay_sys = sum(relay.sys_ms[n] for n in RELAY_ROLES)
    out.append(f"{'relay roles (sum)':20}{'relay':8}{'':8}{relay_cpu:16.3f}{relay_sys:14.3f}")
    out.append(
        f"RESULT e2e_p50_ms={e50:.1f} e2e_p99_ms={e99:.1f} floor_p50_ms={f50:.1f} at_rps={rate:.0f} "
        f"floor_p99_ms={f99:.1f} ratio_p50={e50 / f50:.2f} ratio_p99={e99 / f99:.2f} "
        f"sent_rps={relay.sent_rps:.0f} lost={relay.lost} duplicates={relay.dupes} "
        f"max_rss_mb={max_rss:.0f} database={database} gc_freeze={'on' if gc_freeze else 'off'} "
        f"cpu_ms_per_webhook={relay_cpu:.3f} floor_cpu_ms_per_webhook={floor.cpu_ms['floor']:.3f} "
        f"hop_p50_ms={h50:.1f} hop_p99_ms={h99:.1f} floor_lost={floor.lost} floor_duplicates={floor.dupes}"
        + (f" db_cpu_ms_per_webhook={relay.cpu_ms[DB]:.3f}" if DB in relay.cpu_ms else "")
    )
    return out


async def main(rates: list[float], seconds: float, database: str, gc_freeze: bool) -> int:
    passed = True
    for rate in rates:
        ok, report = await run_rate(rate, seconds, database, gc_freeze)
        passed = passed and ok
        print("\n".join(report), flush=True)
    return 0 if passed else 1


def _rates(text: str) -> list[float]:
    rates = [float(r) for r in text.split(",") if r.strip()]
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("a comma-separated list of positive rates, e.g. 200,1000")
    return rates


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", type=_rates, default=[200.0, 1000.0], help="webhooks/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=15.0, help="of sending, per phase")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--gc-freeze", choices=("on", "off"), default="on")
    args = parser.parse_args()
    if any(int(rate * args.seconds) < 1 for rate in args.rates):
        parser.error("--seconds too short: every rate must send at least one webhook")
    raise SystemExit(asyncio.run(main(args.rates, args.seconds, args.database, args.gc_freeze == "on")))
