"""Ingest API throughput and latency, side by side with a bare FastAPI endpoint, measured in one run.

1. Closed loop, ``--concurrency`` workers for ``--seconds``: the ingest API (a subprocess, as in production,
   publishing to the embedded broker) vs a bare FastAPI endpoint answering 202 under the same uvicorn
   settings as the ``relay`` CLI. ratio = ingest_rps / bare_rps.
2. Open loop at ``--rate`` requests/s against the ingest API: p50/p99/max latency.
3. Records that landed in the inbox topic during phase 2 vs its 202 answers.

Run: ``python -m bench.ingest [--seconds 10] [--rate 1000] [--concurrency 64]``.
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

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench.stack import TOKEN, log, maxma_config, pct, relay_env, stop_proc, wait_http
from services.common.embedded import EmbeddedBroker, free_port, pdeathsig_preexec
from services.common.httpclient import make_http_client
from services.common.kafka import INBOX
from services.sandbox.samples import client_params

EVENT = "client-created"
OPEN_LOOP_CONNECTIONS = 2048
QUERIES = 4096  # distinct prebuilt queries: building them must not cost the load generator CPU

# The same uvicorn settings as services.cli._serve.
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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(http: httpx.AsyncClient, urls: list[str], seconds: float, concurrency: int) -> dict:
    """``concurrency`` workers send back to back for ``seconds``; counts 202 answers."""
    ok = other = errors = 0
    deadline = time.monotonic() + seconds

    async def worker(w: int) -> None:
        nonlocal ok, other, errors
        i = w
        while time.monotonic() < deadline:
            try:
                r = await http.get(urls[i % len(urls)])
            except httpx.HTTPError:
                errors += 1
            else:
                if r.status_code == 202:
                    ok += 1
                else:
                    other += 1
            i += concurrency

    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(worker(w) for w in range(concurrency))), seconds + 30)
    wall = time.monotonic() - t0
    return {
        "rps": ok / wall,
        "ok": ok,
        "other": other,
        "errors": errors,
        "client_cpu": (time.process_time() - cpu0) / wall,
        "wall": wall,
    }


async def open_loop(http: httpx.AsyncClient, urls: list[str], seconds: float, rate: float) -> dict:
    """Requests started at ``rate``/s regardless of answers; per-request latency of the 202s."""
    count = int(rate * seconds)
    lat_ms: list[float] = []
    lag_ms: list[float] = []  # how late each request started vs its schedule (generator health)
    ok = other = errors = 0

    async def send(i: int, due: float) -> None:
        nonlocal ok, other, errors
        t0 = time.perf_counter()
        lag_ms.append((time.monotonic() - due) * 1000)
        try:
            r = await http.get(urls[i % len(urls)])
        except httpx.HTTPError:
            errors += 1
            return
        if r.status_code == 202:
            ok += 1
            lat_ms.append((time.perf_counter() - t0) * 1000)
        else:
            other += 1

    tasks = []
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(i, due)))
    sent_wall = time.monotonic() - start
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    return {
        "count": count,
        "sent_rate": count / sent_wall if sent_wall else float("nan"),
        "ok": ok,
        "other": other,
        "errors": errors,
        "lat": lat_ms,
        "lag_p99": pct(lag_ms, 0.99),
    }


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


def make_urls(port: int) -> list[str]:
    base = f"http://127.0.0.1:{port}/hooks/klientiks/{TOKEN}/{EVENT}?"
    return [base + urlencode(client_params(i)) for i in range(QUERIES)]


async def main(seconds: float, rate: float, concurrency: int) -> int:
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
            ["-m", "services.cli", "ingest", "api", "--host", "127.0.0.1", "--port", str(api_port)],
            env,
        )
        await wait_http(f"http://127.0.0.1:{api_port}/readyz")
        api_urls = make_urls(api_port)

        async with make_http_client(concurrency) as http:
            log(f"ingest api: warm-up 1 s, then closed loop {seconds:.0f} s x {concurrency} workers")
            warm = await closed_loop(http, api_urls, 1, concurrency)
            c0 = cpu_s(api.pid)
            ingest = await closed_loop(http, api_urls, seconds, concurrency)
            ingest["server_cpu"] = (cpu_s(api.pid) - c0) / ingest["wall"]
        # Open loop: the generator's pool must not cap the requests in flight (a capped pool queues
        # requests client-side and the wait would be counted as server latency).
        async with make_http_client(OPEN_LOOP_CONNECTIONS) as http:
            log(f"ingest api: open loop {rate:.0f}/s for {seconds:.0f} s")
            await asyncio.sleep(1)
            hw_before, before = await inbox_records(broker.bootstrap_servers, read=True)
            lat = await open_loop(http, api_urls, seconds, rate)
            after, read = await inbox_records(broker.bootstrap_servers, read=True)
        accepted_total = warm["ok"] + ingest["ok"] + lat["ok"]
        stop_proc(api)

        bare_env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        bare = spawn("bare", [str(work / "bare.py"), "127.0.0.1", str(bare_port)], bare_env)
        bare_urls = make_urls(bare_port)
        await wait_http(bare_urls[0], 202)
        async with make_http_client(concurrency) as http:
            log(f"bare endpoint: warm-up 1 s, then closed loop {seconds:.0f} s x {concurrency} workers")
            await closed_loop(http, bare_urls, 1, concurrency)
            c0 = cpu_s(bare.pid)
            base = await closed_loop(http, bare_urls, seconds, concurrency)
            base["server_cpu"] = (cpu_s(bare.pid) - c0) / base["wall"]
    finally:
        for p in procs.values():
            with contextlib.suppress(Exception):
                stop_proc(p)
        broker.stop()

    ratio = ingest["rps"] / base["rps"] if base["rps"] else float("nan")
    print(f"closed loop, {concurrency} workers, {seconds:.0f} s each (same uvicorn settings)")
    print(f"{'':24}{'202/s':>10}{'non-202':>10}{'errors':>8}{'server CPU':>12}{'client CPU':>12}")
    for name, r in (("ingest api (Kafka)", ingest), ("bare FastAPI 202", base)):
        print(
            f"{name:24}{r['rps']:10.0f}{r['other']:10d}{r['errors']:8d}"
            f"{r['server_cpu']:11.0%} {r['client_cpu']:11.0%}"
        )
    print(f"ratio ingest/bare: {ratio:.2f} (design bar >= 0.6)")
    if max(ingest["client_cpu"], base["client_cpu"]) > 0.9:
        print("note: the load generator (one process) is near one full core: it may cap the figures")

    p50, p99, mx = pct(lat["lat"], 0.5), pct(lat["lat"], 0.99), max(lat["lat"], default=float("nan"))
    print()
    print(f"open loop against the ingest api: asked {rate:.0f}/s, achieved {lat['sent_rate']:.0f}/s")
    print(f"  {lat['count']} sent, {lat['ok']} answered 202, {lat['other']} other, {lat['errors']} errors")
    print(f"  latency ms: p50 {p50:.2f}  p99 {p99:.2f}  max {mx:.2f}  (design bar p99 <= 10 ms)")
    print(f"  generator start lag p99: {lat['lag_p99']:.2f} ms")
    if lat["lag_p99"] > 5:
        print(
            "  note: the generator started requests late (it shares the CPUs with the server and the broker):"
            " part of the tail is the client's own"
        )
    if lat["sent_rate"] < 0.98 * rate:
        print(f"  note: the load generator could not keep {rate:.0f}/s (achieved {lat['sent_rate']:.0f}/s)")
    landed = read - before  # records read back: Tansu's highwater offsets can trail for a while
    verdict = "match" if landed == lat["ok"] else "MISMATCH"
    intact = landed == lat["ok"] and after == read == accepted_total
    print(
        f"  records landed in {INBOX} (read back before/after): {landed}, 202 answers: {lat['ok']} -> {verdict}"
    )
    print(
        f"whole run: {accepted_total} ingest 202s; {INBOX} holds {after} by highwater, {read} records read back"
        f" (highwater before phase 2: {hw_before}, read back: {before})"
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
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.seconds, args.rate, args.concurrency)))


if __name__ == "__main__":
    cli()
