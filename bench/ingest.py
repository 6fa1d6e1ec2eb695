"""Ingest API throughput and latency, side by side with a bare FastAPI endpoint, measured in one run.

Both servers run as subprocesses under the same uvicorn settings as the ``relay`` CLI; the ingest API
publishes to the embedded broker (Tansu) with ``acks=all``. The load comes from :mod:`bench.loadgen`
(raw asyncio, prebuilt requests), the same generator and settings for both sides.

1. Closed loop, ``--concurrency`` keep-alive connections back to back, ``--seconds`` per side in
   A B B A rounds: the ingest API vs a bare FastAPI endpoint answering 202. ratio = ingest_rps / bare_rps.
2. Open loop at ``--rate`` requests/s against the ingest API, then against the bare endpoint (the floor
   of this machine): latency from each request's scheduled start and from its actual send, and the
   generator's start lag.
3. Records that landed in the inbox topic during the ingest open loop vs its 202 answers.

CPU shares (1 core = 100%) of the servers, the broker and the generator are printed for every phase.

Run: ``python -m bench.ingest [--seconds 10] [--rate 1000] [--concurrency 64] [--open-connections 256]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlencode

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.loadgen import build_get, closed_loop, open_loop
from bench.stack import TOKEN, log, maxma_config, pct, relay_env, stop_proc, wait_http
from services.common.embedded import EmbeddedBroker, free_port, pdeathsig_preexec
from services.common.kafka import INBOX
from services.sandbox.samples import client_params

EVENT = "client-created"
HOST = "127.0.0.1"
# Opened before the open loop and used in turn; more are opened at once if none is idle at a due time.
OPEN_LOOP_CONNECTIONS = 256
QUERIES = 4096  # distinct prebuilt queries: building them must not cost the load generator CPU

# The same uvicorn settings as services.cli.roles.serve.
BARE_APP = """
import sys
from uuid import uuid4

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

app = FastAPI()


@app.get("/hooks/klientiks/{token}/{event}", status_code=202)
async def receive(token: str, event: str) -> JSONResponse:
    return JSONResponse({"event_id": uuid4().hex}, status_code=202)


uvicorn.run(
    app,
    host=sys.argv[1],
    port=int(sys.argv[2]),
    log_config=None,
    access_log=False,
    lifespan="on",
    timeout_graceful_shutdown=20,
)
"""


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads); nan without a pid."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> float:
    """Busy CPU seconds of the whole machine, all cores (/proc/stat)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


OURS = ("api", "bare", "broker", "generator")


def others_share(machine: float, ours: list[float]) -> float:
    """CPU of everything outside this benchmark. Per-process and machine-wide counters tick separately, so
    this is approximate (about +-10% of a core) and shown as 0 when it comes out below."""
    return max(0.0, machine - sum(ours))


class CpuMeter:
    """CPU share (1.0 = one core) over a phase of each watched process, of this process (``generator``)
    and of the whole machine (``machine``): ``start()``, then ``shares(wall)``."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self._pids = pids | {"generator": os.getpid()}
        self._t0: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {name: cpu_s(pid) for name, pid in self._pids.items()} | {"machine": machine_cpu_s()}

    def start(self) -> None:
        self._t0 = self._now()

    def shares(self, wall: float) -> dict[str, float]:
        return {name: (v - self._t0[name]) / wall for name, v in self._now().items()}


async def inbox_records(bootstrap: str, *, read: bool = False) -> tuple[int, int]:
    """Sum of the inbox topic's highwater offsets over its partitions and, if ``read``, the records read."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await asyncio.wait_for(consumer.start(), 30)
    try:
        await asyncio.wait_for(consumer.topics(), 10)  # refreshes the metadata
        tps = [TopicPartition(INBOX, p) for p in consumer.partitions_for_topic(INBOX) or set()]
        # Tansu's ListOffsets can trail the acknowledged writes for a moment: wait until it settles.
        ends = await asyncio.wait_for(consumer.end_offsets(tps), 10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            again = await asyncio.wait_for(consumer.end_offsets(tps), 10)
            if again == ends:
                break
            ends = again
        seen = 0
        if read:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
                seen += sum(len(b) for b in batches.values())
                positions = [await consumer.position(tp) for tp in tps]
                if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)) and not batches:
                    break
        return sum(ends.values()), seen
    finally:
        await asyncio.wait_for(consumer.stop(), 10)


def make_requests(port: int) -> list[bytes]:
    """Prebuilt GET requests, ``QUERIES`` distinct clients: building them costs the generator nothing."""
    path = f"/hooks/klientiks/{TOKEN}/{EVENT}?"
    return [build_get(HOST, port, path + urlencode(client_params(i))) for i in range(QUERIES)]


async def closed_rounds(
    sides: dict[str, tuple[int, list[bytes]]], seconds: float, concurrency: int, meter: CpuMeter
) -> dict[str, dict[str, float]]:
    """Closed loop on each side in A B B A order, ``seconds`` / 2 a round, so a drift in the machine's
    speed weighs on both sides alike; per side: 202/s, non-202, errors and CPU shares over its rounds."""
    names = list(sides)
    order = [*names, *reversed(names)]
    out = {n: {"ok": 0.0, "other": 0.0, "errors": 0.0, "wall": 0.0, "client": 0.0} for n in names}
    cpu: dict[str, dict[str, float]] = {n: {} for n in names}
    for name in order:
        port, requests = sides[name]
        meter.start()
        r = await closed_loop(HOST, port, requests, seconds / 2, concurrency)
        for proc, share in meter.shares(r.wall).items():
            cpu[name][proc] = cpu[name].get(proc, 0.0) + share * r.wall
        o = out[name]
        o["ok"] += r.ok
        o["other"] += r.other
        o["errors"] += r.errors
        o["wall"] += r.wall
        o["client"] += r.client_cpu * r.wall
    for name, o in out.items():
        o["rps"] = o["ok"] / o["wall"]
        o["client_cpu"] = o["client"] / o["wall"]
        o.update({f"cpu_{proc}": sec / o["wall"] for proc, sec in cpu[name].items()})
        o["cpu_others"] = others_share(o["cpu_machine"], [o[f"cpu_{p}"] for p in OURS])
    return out


def fmt_ms(values: list[float]) -> str:
    p50, p99 = pct(values, 0.5), pct(values, 0.99)
    return f"p50 {p50:7.2f}  p99 {p99:7.2f}  max {max(values, default=float('nan')):7.2f}"


async def main(seconds: float, rate: float, concurrency: int, open_connections: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="relay-bench-ingest-"))
    config = maxma_config(work, None)
    (work / "bare.py").write_text(BARE_APP)
    api_port, bare_port = free_port(), free_port()
    broker = EmbeddedBroker()
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        procs[name] = subprocess.Popen(
            [sys.executable, *argv],
            env=env,
            stdout=(work / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_preexec(),
        )
        return procs[name]

    try:
        broker.start()
        env = relay_env(config, broker.bootstrap_servers, work)
        api = spawn(
            "ingest-api",
            ["-m", "services.cli", "ingest", "api", "--migrate", "--host", HOST, "--port", str(api_port)],
            env,
        )
        bare_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        bare = spawn("bare", [str(work / "bare.py"), HOST, str(bare_port)], bare_env)
        await wait_http(f"http://{HOST}:{api_port}/readyz")
        api_requests, bare_requests = make_requests(api_port), make_requests(bare_port)
        await wait_http(f"http://{HOST}:{bare_port}/hooks/klientiks/{TOKEN}/{EVENT}", 202)
        meter = CpuMeter({"api": api.pid, "bare": bare.pid, "broker": broker.pid})
        sides = {"ingest": (api_port, api_requests), "bare": (bare_port, bare_requests)}

        log("warm-up 1 s per side")
        warm = 0
        for name, (port, requests) in sides.items():
            w = await closed_loop(HOST, port, requests, 1, concurrency)
            warm += w.ok if name == "ingest" else 0
        log(f"closed loop {seconds:.0f} s x {concurrency} connections per side (ingest, bare, bare, ingest)")
        closed = await closed_rounds(sides, seconds, concurrency, meter)

        log(f"ingest api: open loop {rate:.0f}/s for {seconds:.0f} s")
        await asyncio.sleep(1)
        hw_before, before = await inbox_records(broker.bootstrap_servers, read=True)
        meter.start()
        lat = await open_loop(HOST, api_port, api_requests, seconds, rate, open_connections)
        lat_cpu = meter.shares(lat.wall)
        after, read = await inbox_records(broker.bootstrap_servers, read=True)
        log(f"bare endpoint: open loop {rate:.0f}/s for {seconds:.0f} s (the floor of this machine)")
        meter.start()
        bare_lat = await open_loop(HOST, bare_port, bare_requests, seconds, rate, open_connections)
        bare_lat_cpu = meter.shares(bare_lat.wall)
        accepted_total = warm + int(closed["ingest"]["ok"]) + lat.ok
        broker_alive = broker.is_alive()
    finally:
        for p in procs.values():
            with contextlib.suppress(Exception):
                stop_proc(p)
        broker.stop()

    ingest, base = closed["ingest"], closed["bare"]
    ratio = ingest["rps"] / base["rps"] if base["rps"] else float("nan")
    print(
        f"closed loop, {concurrency} connections, {seconds:.0f} s per side in A B B A rounds"
        " (same uvicorn settings, same load generator)"
    )
    print(
        f"{'':24}{'202/s':>10}{'non-202':>10}{'errors':>8}{'server CPU':>12}{'broker CPU':>12}"
        f"{'client CPU':>12}{'others CPU':>12}"
    )
    for name, r, server in (("ingest api (Kafka)", ingest, "api"), ("bare FastAPI 202", base, "bare")):
        print(
            f"{name:24}{r['rps']:10.0f}{r['other']:10.0f}{r['errors']:8.0f}"
            f"{r['cpu_' + server]:11.0%} {r['cpu_broker']:11.0%} {r['client_cpu']:11.0%}"
            f" {r['cpu_others']:11.0%}"
        )
    print("(CPU: 100% = one core of the 2; others = the rest of the machine, outside this benchmark, +-10%)")
    print(f"ratio ingest/bare: {ratio:.2f} (design bar >= 0.6)")
    if max(ingest["client_cpu"], base["client_cpu"]) > 0.5:
        print("note: the load generator used over half a core: it may cap the figures")

    print()
    for title, ol, cpu, server in (
        ("the ingest api", lat, lat_cpu, "api"),
        ("the bare endpoint (reference)", bare_lat, bare_lat_cpu, "bare"),
    ):
        print(
            f"open loop against {title}: asked {rate:.0f}/s, achieved {ol.sent_rate:.0f}/s over"
            f" {ol.connections} connections ({ol.opened_on_demand} opened on demand)"
        )
        print(f"  {ol.count} sent, {ol.ok} answered 202, {ol.other} other, {ol.errors} errors")
        print(f"  latency ms from scheduled start: {fmt_ms(ol.lat_sched_ms)}")
        print(f"  latency ms from actual send:     {fmt_ms(ol.lat_sent_ms)}")
        print(f"  generator start lag ms:          {fmt_ms(ol.lag_ms)}")
        others = others_share(cpu["machine"], [cpu[p] for p in OURS])
        print(
            f"  CPU (1 core = 100%): server {cpu[server]:.0%}, broker {cpu['broker']:.0%},"
            f" load generator {ol.client_cpu:.0%}, other processes {others:.0%}"
        )
        if ol.sent_rate < 0.98 * rate:
            print(f"  note: the load generator could not keep {rate:.0f}/s (achieved {ol.sent_rate:.0f}/s)")
    p99 = pct(lat.lat_sched_ms, 0.99)
    print(f"ingest p99 from scheduled start at {rate:.0f}/s: {p99:.2f} ms (design bar p99 <= 10 ms)")
    landed = read - before  # records read back: Tansu's highwater offsets can trail for a while
    verdict = "match" if landed == lat.ok else "MISMATCH"
    # Records read back decide; Tansu's highwater offsets can be wrong after multi-record batches.
    intact = landed == lat.ok and read == accepted_total and broker_alive
    print(
        f"  records landed in {INBOX} (read back before/after): {landed}, 202 answers: {lat.ok} -> {verdict}"
    )
    print(
        f"whole run: {accepted_total} ingest 202s; {INBOX} holds {after} by highwater, {read} records read back"
        f" (highwater before the open loop: {hw_before}, read back: {before})"
    )
    print(
        f"RESULT ingest_rps={ingest['rps']:.0f} bare_rps={base['rps']:.0f} ratio={ratio:.2f}"
        f" p99_ms_at_{rate:.0f}={p99:.2f}"
    )
    return 0 if intact else 1


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop connections")
    parser.add_argument(
        "--open-connections",
        type=int,
        default=OPEN_LOOP_CONNECTIONS,
        help="open-loop connections opened first",
    )
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds, args.rate, args.concurrency, args.open_connections)))


if __name__ == "__main__":
    cli()
