"""Delivery throughput: the delivery runtime vs a plain one-at-a-time consumer, measured in one run.

The events topic is pre-filled with N client-created events over K keys, the sandbox Maxma answers every
request after ``--latency-ms``. The maxma service (the shared delivery runtime, a subprocess as in
production) drains the topic; its rate is read from the sandbox's own arrival times. Side by side, on the
same broker and sandbox: a plain FastStream subscriber that posts one event at a time, and the ideal
``in_flight / latency``. Run: ``python -m bench.delivery``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaProducer
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from bench.stack import KEY, log, maxma_config, relay_env, rss_mb, stop_proc, wait_http
from services.common.config import KafkaSettings
from services.common.embedded import EmbeddedBroker, free_port, pdeathsig_preexec
from services.common.events import (
    Client,
    CloudEvent,
    EventData,
    EventName,
    kafka_key,
    new_event_id,
    source_uri,
    utcnow,
)
from services.common.kafka import EVENTS, ensure_topics
from services.common.ledger import migrate
from services.maxma.mapping import new_client_body
from services.sandbox.samples import client_params

SOURCE = "bench"
PLAIN_GROUP = "bench-plain"
FIRST_CLIENT = 6_400_000
SEQ_MARK = " #"  # the per-key sequence number travels at the end of the client's full name


# -- events ------------------------------------------------------------------------------------------


def make_events(events: int, keys: int) -> list[CloudEvent]:
    """Event ``i`` belongs to client ``i % keys``; its sequence number within that key is ``i // keys``."""
    names = [client_params(c) for c in range(min(keys, events))]
    out = []
    now = utcnow()
    for i in range(events):
        c, seq = i % keys, i // keys
        p = names[c]
        client = Client(
            id=str(FIRST_CLIENT + c),
            full_name=f"{p['client_name']}{SEQ_MARK}{seq}",
            first_name=p["client_first_name"],
            last_name=p["client_second_name"],
            patronymic=p["client_patron_name"],
            phone=f"+7916{c:07d}",  # unique per client, a valid MTS Moscow mobile
        )
        out.append(
            CloudEvent(
                id=new_event_id(),
                source=source_uri(SOURCE),
                type=EventName.CLIENT_CREATED.ce_type,
                time=now,
                subject=f"client/{client.id}",
                relayreceivedat=now,
                data=EventData(client=client),
            )
        )
    return out


async def prefill(bootstrap: str, events: list[CloudEvent]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for start in range(0, len(events), 1000):
            futures = []
            for e in events[start : start + 1000]:
                assert e.data.client is not None
                key = kafka_key(e.source_name, e.data.client.id, None)
                futures.append(
                    await producer.send(EVENTS, e.kafka_value(), key=key.encode(), headers=e.kafka_headers())
                )
            await asyncio.gather(*futures)
        await producer.flush()
    finally:
        await producer.stop()


# -- measuring ---------------------------------------------------------------------------------------


def analyse(requests: list[dict[str, Any]], events: int, keys: int) -> dict[str, Any]:
    """Count what the sandbox received: rate over the arrival span, loss, duplicates, per-key order."""
    reqs = sorted((r for r in requests if r.get("path") == "/new-client"), key=lambda r: r["seq"])
    distinct: set[tuple[str, int]] = set()
    per_key: dict[str, list[int]] = defaultdict(list)
    for r in reqs:
        client = (r.get("body") or {}).get("client") or {}
        ext, name = str(client.get("externalId")), str(client.get("fullName") or "")
        seq = int(name.rsplit(SEQ_MARK, 1)[1]) if SEQ_MARK in name else -1
        distinct.add((ext, seq))
        per_key[ext].append(seq)
    expected = {(str(FIRST_CLIENT + i % keys), i // keys) for i in range(events)}
    times = [float(r["time"]) for r in reqs]
    span = max(times) - min(times) if len(times) > 1 else float("nan")
    return {
        "requests": len(reqs),
        "distinct": len(distinct & expected),
        "lost": len(expected - distinct),
        "duplicates": len(reqs) - len(distinct),
        "order_violations": sum(1 for s in per_key.values() if any(b < a for a, b in pairwise(s))),
        "span_s": span,
        "rate": len(distinct) / span if span and span > 0 else float("nan"),
        "status": sorted({(r.get("status"), r.get("error_code")) for r in reqs}, key=str),
    }


async def settled(http: httpx.AsyncClient, metrics_url: str) -> float:
    """Deliveries the runtime has finished (any outcome but a retry), from its Prometheus counter."""
    text = (await http.get(metrics_url, timeout=5)).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("relay_deliveries_total{") and 'outcome="retryable"' not in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def sample_rss(pid: int, samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(OSError, ValueError):
            samples.append(rss_mb(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


# -- the plain baseline ------------------------------------------------------------------------------


async def plain_run(bootstrap: str, sandbox_url: str, seconds: float) -> int:
    """A FastStream subscriber posting one event at a time until ``seconds`` after its first request."""
    first = asyncio.Event()
    handled = 0
    fs = KafkaBroker(bootstrap, logger=None)
    async with httpx.AsyncClient(base_url=sandbox_url) as http:

        @fs.subscriber(
            EVENTS,
            group_id=PLAIN_GROUP,
            ack_policy=AckPolicy.ACK,
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            fetch_max_wait_ms=20,
        )
        async def handle(msg: KafkaMessage) -> None:
            nonlocal handled
            raw = msg.raw_message
            event = CloudEvent.from_kafka(list(raw.headers or ()), raw.value)  # type: ignore[union-attr]
            first.set()
            await http.post(
                "/new-client", json=new_client_body(event), headers={"X-Processing-Key": KEY}, timeout=15
            )
            handled += 1

        await asyncio.wait_for(fs.start(), 30)
        try:
            await asyncio.wait_for(first.wait(), 30)  # the group join (~3 s on Tansu) is not measured
            await asyncio.sleep(seconds)
        finally:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(fs.stop(), 15)
    return handled


# -- main --------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    n, k = args.events, min(args.keys, args.events)
    work = Path(tempfile.mkdtemp(prefix="relay-bench-delivery-"))
    sandbox_port, maxma_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    config = maxma_config(work, sandbox_url, SOURCE)
    broker = EmbeddedBroker().start()
    base_env = relay_env(config, broker.bootstrap_servers, work)
    env = base_env | {"RELAY_DELIVERY__MAX_IN_FLIGHT": str(args.in_flight)}
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(name: str, *cli: str, port: int, proc_env: dict[str, str]) -> subprocess.Popen[bytes]:
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *cli, "--host", "127.0.0.1", "--port", str(port)],
            env=proc_env,
            stdout=(work / f"{name}.log").open("wb"),
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_preexec(),
        )
        return procs[name]

    rss: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=sandbox_url, timeout=60) as http:
            spawn("sandbox-maxma", "sandbox", "maxma", "--key-file", str(work / "key"), port=sandbox_port,
                  proc_env=base_env)  # fmt: skip
            await wait_http(f"{sandbox_url}/_sandbox/latency")
            (await http.post("/_sandbox/latency", json={"ms": args.latency_ms})).raise_for_status()
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
            await asyncio.wait_for(ensure_topics(kafka), 30)
            t0 = time.monotonic()
            await asyncio.wait_for(prefill(broker.bootstrap_servers, make_events(n, k)), 120)
            log(f"pre-filled {n} events over {k} keys in {time.monotonic() - t0:.1f} s; {work}")

            # 1. The delivery runtime.
            # Migrated beforehand, as a deployment's `relay db upgrade` job does: the service itself then never
            # loads Alembic, and its memory is what production would see.
            await migrate(env["RELAY_DATABASE_URL"])
            maxma = spawn("maxma", "maxma", port=maxma_port, proc_env=env)
            stop_rss = asyncio.Event()
            sampler = asyncio.create_task(sample_rss(maxma.pid, rss, stop_rss))
            metrics = f"http://127.0.0.1:{maxma_port}/metrics/"
            await wait_http(f"http://127.0.0.1:{maxma_port}/readyz")
            done, last_change, deadline = 0.0, time.monotonic(), time.monotonic() + 60 + n / 100
            while done < n and time.monotonic() < deadline:
                if maxma.poll() is not None:
                    raise RuntimeError(f"maxma exited with {maxma.returncode}; see {work}/maxma.log")
                with contextlib.suppress(httpx.HTTPError):
                    now_done = await settled(http, metrics)
                    if now_done != done:
                        done, last_change = now_done, time.monotonic()
                if time.monotonic() - last_change > 30:
                    log(f"no progress for 30 s at {done:.0f}/{n}; giving up")
                    break
                await asyncio.sleep(0.25)
            stop_rss.set()
            await sampler
            log(f"runtime settled {done:.0f}/{n}")
            runtime = analyse((await http.get("/_sandbox/requests")).json(), n, k)
            stop_proc(maxma)

            # 2. The plain baseline, same broker, same sandbox.
            (await http.post("/_sandbox/reset")).raise_for_status()
            (await http.post("/_sandbox/latency", json={"ms": args.latency_ms})).raise_for_status()
            handled = await asyncio.wait_for(
                asyncio.create_task(plain_run(broker.bootstrap_servers, sandbox_url, args.plain_seconds)),
                args.plain_seconds + 90,
            )
            plain_reqs = [
                r for r in (await http.get("/_sandbox/requests")).json() if r["path"] == "/new-client"
            ]
            plain_times = [float(r["time"]) for r in plain_reqs]
            plain_span = max(plain_times) - min(plain_times) if len(plain_times) > 1 else float("nan")
            plain_rate = len(plain_reqs) / plain_span if plain_span > 0 else float("nan")
            log(f"plain consumer handled {handled}")
    finally:
        for p in procs.values():
            stop_proc(p)
        broker.stop()

    ideal = args.in_flight / (args.latency_ms / 1000)
    rate = runtime["rate"]
    max_rss = max(rss) if rss else float("nan")
    print(f"{n} events over {k} keys ({n // k} per key), sandbox latency {args.latency_ms:g} ms, "
          f"max in flight {args.in_flight}")  # fmt: skip
    print(f"{'':36}{'deliveries/s':>14}{'requests':>10}{'span s':>9}")
    print(
        f"{'delivery runtime (maxma process)':36}{rate:14.1f}{runtime['requests']:10d}{runtime['span_s']:9.2f}"
    )
    print(f"{'plain one-at-a-time consumer':36}{plain_rate:14.1f}{len(plain_reqs):10d}{plain_span:9.2f}")
    print(f"{'ideal in_flight / latency':36}{ideal:14.1f}")
    print(f"speed-up runtime / plain {rate / plain_rate:.1f}x; runtime / ideal {rate / ideal:.2f}")
    print(f"sandbox answers (status, errorCode): {runtime['status']}")
    print(f"lost {runtime['lost']}, duplicates {runtime['duplicates']}, "
          f"keys out of order {runtime['order_violations']}, max RSS of maxma {max_rss:.0f} MB")  # fmt: skip
    print(
        f"RESULT deliveries_per_s={rate:.1f} plain_per_s={plain_rate:.1f} ideal_per_s={ideal:.1f} "
        f"ideal_ratio={rate / ideal:.3f} order_violations={runtime['order_violations']} "
        f"lost={runtime['lost']} duplicates={runtime['duplicates']} max_rss_mb={max_rss:.0f}"
    )
    return 0 if runtime["lost"] == runtime["duplicates"] == runtime["order_violations"] == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--plain-seconds", type=float, default=20.0)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
