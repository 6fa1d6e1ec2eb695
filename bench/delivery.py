"""Delivery throughput: the delivery runtime vs a plain one-at-a-time consumer, measured in one run.

The events topic is pre-filled with N client-created events over K keys, the sandbox Maxma answers every
request after ``--latency-ms``. The maxma service (the shared delivery runtime, a subprocess as in
production) drains the topic; its rate is read from the sandbox's own arrival times. Side by side, on the
same broker and sandbox: a plain FastStream subscriber that posts one event at a time, and the ideal
``in_flight / latency``. Run: ``python -m bench.delivery``.

``--case two-step``: N ``visit-paid`` events over K keys, each delivered as Maxma's ``v2/set-order`` then
``confirm-order`` (two sequential calls, each kept in the ledger before the next), the clients created in
the sandbox beforehand. Measured side by side with the one-step case (N ``client-created`` events, one
``new-client`` each) on the same broker, sandbox and latency; the ideal is ``in_flight / (2 * latency)``.
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
from datetime import timedelta
from decimal import Decimal
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import yaml
from aiokafka import AIOKafkaProducer
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from bench.stack import KEY, log, maxma_config, pct, relay_env, rss_mb, stop_proc, wait_http
from services.common.config import KafkaSettings
from services.common.embedded import EmbeddedBroker, free_port, pdeathsig_preexec
from services.common.events import (
    Appointment,
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
SHOP_CODE, SHOP_NAME = "main", "Салон (бенчмарк)"  # `main` is a shop every sandbox Maxma account has
STEPS = ("/v2/set-order", "/confirm-order")


# -- events ------------------------------------------------------------------------------------------


def make_events(events: int, keys: int, offset: int = 0) -> list[CloudEvent]:
    """Event ``i`` belongs to client ``offset + i % keys``; its sequence number within that key is ``i // keys``."""
    names = [client_params(c) for c in range(min(keys, events))]
    out = []
    now = utcnow()
    for i in range(events):
        c, seq = offset + i % keys, i // keys
        p = names[i % keys]
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


def bench_client(c: int) -> Client:
    """Client ``c``: the same id and phone as ``make_events`` gives it."""
    return Client(id=str(FIRST_CLIENT + c), phone=f"+7916{c:07d}")


def visit_ref(c: int, seq: int) -> str:
    """The appointment id of client ``c``'s visit number ``seq``: the per-key sequence travels in the orderId."""
    return f"{FIRST_CLIENT + c}-{seq}"


def make_visits(events: int, keys: int) -> list[CloudEvent]:
    """``visit-paid`` event ``i``: client ``i % keys``, its ``i // keys``-th visit (a unique appointment id)."""
    out = []
    now = utcnow()
    start = now.replace(microsecond=0) - timedelta(hours=1)
    for i in range(events):
        c, seq = i % keys, i // keys
        client = bench_client(c)
        out.append(
            CloudEvent(
                id=new_event_id(),
                source=source_uri(SOURCE),
                type=EventName.VISIT_PAID.ce_type,
                time=now,
                subject=f"client/{client.id}",
                relayreceivedat=now,
                data=EventData(
                    client=client,
                    appointment=Appointment(
                        id=visit_ref(c, seq),
                        start=start,
                        status="paid",
                        paid=True,
                        total_cost=Decimal(1000 + c % 500) + Decimal("0.50"),
                        services=["Стрижка"],
                    ),
                ),
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
                appt = e.data.appointment
                key = kafka_key(e.source_name, e.data.client.id, appt.id if appt else None)
                futures.append(
                    await producer.send(EVENTS, e.kafka_value(), key=key.encode(), headers=e.kafka_headers())
                )
            await asyncio.gather(*futures)
        await producer.flush()
    finally:
        await producer.stop()


# -- measuring ---------------------------------------------------------------------------------------


def analyse(requests: list[dict[str, Any]], events: int, keys: int, offset: int = 0) -> dict[str, Any]:
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
    expected = {(str(FIRST_CLIENT + offset + i % keys), i // keys) for i in range(events)}
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


def analyse_orders(
    requests: list[dict[str, Any]], orders: list[dict[str, Any]], events: int, keys: int
) -> dict[str, Any]:
    """The two-step case from what the sandbox holds: a delivery is an order confirmed (``/_sandbox/orders``);
    the requests give the rate, repeats, set-order before confirm-order, and per-key order (the sequence
    number of a client's visit is the end of its orderId)."""
    expected = {f"{SOURCE}:{visit_ref(i % keys, i // keys)}" for i in range(events)}
    reqs = sorted((r for r in requests if r.get("path") in STEPS), key=lambda r: r["seq"])
    sent: dict[str, dict[str, int]] = {path: defaultdict(int) for path in STEPS}
    first: dict[tuple[str, str], int] = {}
    per_key: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in reqs:
        path, order = r["path"], str((r.get("body") or {}).get("orderId"))
        sent[path][order] += 1
        first.setdefault((path, order), r["seq"])
        if r.get("status") == 200 and r.get("error_code") is None and "-" in order:
            client, seq = order.split(":", 1)[-1].rsplit("-", 1)
            per_key[client].append((int(seq), STEPS.index(path)))
    # Relay-side time between a set-order's answer and its confirm-order's arrival (the ledger writes between
    # the steps).
    ends = {
        (r["path"], str((r.get("body") or {}).get("orderId"))): (
            r["time"],
            r["time"] + (r.get("duration_ms") or 0) / 1000,
        )
        for r in reversed(reqs)  # the first of each wins
    }
    step_gaps = [
        ends[("/confirm-order", o)][0] - ends[("/v2/set-order", o)][1]
        for o in sent["/confirm-order"]
        if ("/v2/set-order", o) in ends
    ]
    confirmed = {
        o["orderId"] for o in orders if o.get("status") == "confirmed" and o.get("confirmations", 0) >= 1
    }
    confirms = sent["/confirm-order"]
    times = [float(r["time"]) for r in reqs]
    span = max(times) - min(times) if len(times) > 1 else float("nan")
    done = len(confirmed & expected)
    return {
        "requests": len(reqs),
        "set_orders": sum(sent["/v2/set-order"].values()),
        "confirm_orders": sum(confirms.values()),
        "confirmed": done,
        "lost": len(expected - confirmed),
        # A second confirm-order of an order (the sandbox answers it 32), or a confirmation counted twice.
        "duplicates": sum(n - 1 for n in confirms.values() if n > 1)
        + sum(o.get("confirmations", 0) - 1 for o in orders if o.get("confirmations", 0) > 1),
        "set_repeats": sum(n - 1 for n in sent["/v2/set-order"].values() if n > 1),
        "confirm_before_set": sum(
            1
            for o in confirms
            if ("/v2/set-order", o) not in first or first[("/v2/set-order", o)] > first[("/confirm-order", o)]
        ),
        # A key whose requests did not arrive as set 0, confirm 0, set 1, confirm 1, ...
        "order_violations": sum(1 for s in per_key.values() if any(b < a for a, b in pairwise(s))),
        "span_s": span,
        "rate": done / span if span and span > 0 else float("nan"),
        "request_rate": len(reqs) / span if span and span > 0 else float("nan"),
        "status": sorted({(r["path"], r.get("status"), r.get("error_code")) for r in reqs}, key=str),
        "step_gap_ms": [1000 * pct(step_gaps, q) for q in (0.5, 0.95)],
        # How many requests the sandbox held at once on average: the concurrency the relay achieved.
        "open_avg": sum((r.get("duration_ms") or 0) / 1000 for r in reqs) / span
        if span and span > 0
        else float("nan"),
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


# -- processes ---------------------------------------------------------------------------------------


def start_role(
    procs: dict[str, subprocess.Popen[bytes]],
    work: Path,
    name: str,
    *cli: str,
    port: int,
    proc_env: dict[str, str],
) -> subprocess.Popen[bytes]:
    """``relay *cli`` on ``port`` as a subprocess, its output in ``work/{name}.log``, kept in ``procs``."""
    procs[name] = subprocess.Popen(
        [sys.executable, "-m", "services.cli", *cli, "--host", "127.0.0.1", "--port", str(port)],
        env=proc_env,
        stdout=(work / f"{name}.log").open("wb"),
        stderr=subprocess.STDOUT,
        preexec_fn=pdeathsig_preexec(),
    )
    return procs[name]


async def drain(
    http: httpx.AsyncClient,
    proc: subprocess.Popen[bytes],
    port: int,
    n: int,
    log_file: Path,
    rss: list[float],
) -> float:
    """Wait until the delivery process ``proc`` has settled ``n`` deliveries (or stalls 30 s); sample its RSS."""
    stop_rss = asyncio.Event()
    sampler = asyncio.create_task(sample_rss(proc.pid, rss, stop_rss))
    metrics = f"http://127.0.0.1:{port}/metrics/"
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        done, last_change, deadline = 0.0, time.monotonic(), time.monotonic() + 60 + n / 100
        while done < n and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{log_file.stem} exited with {proc.returncode}; see {log_file}")
            with contextlib.suppress(httpx.HTTPError):
                now_done = await settled(http, metrics)
                if now_done != done:
                    done, last_change = now_done, time.monotonic()
            if time.monotonic() - last_change > 30:
                log(f"no progress for 30 s at {done:.0f}/{n}; giving up")
                break
            await asyncio.sleep(0.25)
    finally:
        stop_rss.set()
        await sampler
    return done


# -- the two-step case's setup -----------------------------------------------------------------------


def order_config(work: Path, sandbox_url: str) -> Path:
    """One source, one Maxma connection: ``client-created`` -> new-client, ``visit-paid`` -> set-order (and,
    as ``confirm_on`` defaults to visit-paid, confirm-order) in the shop ``main``."""
    (work / "key").write_text(KEY)
    conn = {
        "target": "maxma",
        "base_url": sandbox_url,
        "processing_key": "${file:key}",
        "shop_code": SHOP_CODE,
        "shop_name": SHOP_NAME,
        "events": {"client-created": "new-client", "visit-paid": "set-order"},
    }
    config = work / "relay.yaml"
    src = {"name": SOURCE, "token": "${BENCH_TOKEN}", "connections": [conn]}
    config.write_text(yaml.safe_dump({"sources": [src]}, allow_unicode=True, sort_keys=False))
    return config


async def precreate(http: httpx.AsyncClient, keys: int, concurrency: int = 32) -> None:
    """Create clients ``0 .. keys-1`` in the sandbox (``new-client``), so every set-order finds its client."""
    gate = asyncio.Semaphore(concurrency)

    async def one(c: int) -> None:
        client = bench_client(c)
        body = {"client": {"phoneNumber": client.phone, "externalId": client.id}}
        async with gate:
            r = await http.post("/new-client", json=body, headers={"X-Processing-Key": KEY})
        r.raise_for_status()
        if "errorCode" in (answer := r.json()):
            raise RuntimeError(f"sandbox refused new-client of {body}: {answer}")

    await asyncio.gather(*(one(c) for c in range(keys)))


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
        return start_role(procs, work, name, *cli, port=port, proc_env=proc_env)

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
            done = await drain(http, maxma, maxma_port, n, work / "maxma.log", rss)
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


async def main_two_step(args: argparse.Namespace) -> int:
    """set-order + confirm-order per event, then the one-step case on the same broker, sandbox and latency."""
    n, k = args.events, min(args.keys, args.events)
    work = Path(tempfile.mkdtemp(prefix="relay-bench-delivery-two-step-"))
    sandbox_port, maxma_port = free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    config = order_config(work, sandbox_url)
    broker = EmbeddedBroker().start()
    base_env = relay_env(config, broker.bootstrap_servers, work)
    env = base_env | {"RELAY_DELIVERY__MAX_IN_FLIGHT": str(args.in_flight)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    rss: list[float] = []
    try:
        async with httpx.AsyncClient(base_url=sandbox_url, timeout=60) as http:
            start_role(procs, work, "sandbox-maxma", "sandbox", "maxma", "--key-file", str(work / "key"),
                       port=sandbox_port, proc_env=base_env)  # fmt: skip
            await wait_http(f"{sandbox_url}/_sandbox/latency")
            # The clients first, without latency, then only the timed run's requests stay recorded.
            t0 = time.monotonic()
            await asyncio.wait_for(precreate(http, k), 120)
            (await http.delete("/_sandbox/requests")).raise_for_status()
            (await http.post("/_sandbox/latency", json={"ms": args.latency_ms})).raise_for_status()
            log(f"pre-created {k} clients in {time.monotonic() - t0:.1f} s")
            kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, enable_idempotence=False)
            await asyncio.wait_for(ensure_topics(kafka), 30)
            t0 = time.monotonic()
            await asyncio.wait_for(prefill(broker.bootstrap_servers, make_visits(n, k)), 120)
            log(f"pre-filled {n} visit-paid events over {k} keys in {time.monotonic() - t0:.1f} s; {work}")
            await migrate(env["RELAY_DATABASE_URL"])

            # 1. Two steps per event.
            maxma = start_role(procs, work, "maxma-two-step", "maxma", port=maxma_port, proc_env=env)
            done = await drain(http, maxma, maxma_port, n, work / "maxma-two-step.log", rss)
            log(f"two-step settled {done:.0f}/{n}")
            two = analyse_orders(
                (await http.get("/_sandbox/requests")).json(),
                (await http.get("/_sandbox/orders")).json(),
                n,
                k,
            )
            stop_proc(maxma)

            # 2. One step per event: N client-created events for N other clients, the same consumer group (it
            # resumes after the visits), broker, sandbox and latency.
            (await http.delete("/_sandbox/requests")).raise_for_status()
            t0 = time.monotonic()
            await asyncio.wait_for(prefill(broker.bootstrap_servers, make_events(n, n, offset=k)), 120)
            log(f"pre-filled {n} client-created events in {time.monotonic() - t0:.1f} s")
            maxma = start_role(procs, work, "maxma-one-step", "maxma", port=maxma_port, proc_env=env)
            one_done = await drain(http, maxma, maxma_port, n, work / "maxma-one-step.log", [])
            log(f"one-step settled {one_done:.0f}/{n}")
            one = analyse((await http.get("/_sandbox/requests")).json(), n, n, offset=k)
            stop_proc(maxma)
    finally:
        for p in procs.values():
            stop_proc(p)
        broker.stop()

    ideal = args.in_flight / (2 * args.latency_ms / 1000)
    ideal_one = args.in_flight / (args.latency_ms / 1000)
    rate, one_rate = two["rate"], one["rate"]
    max_rss = max(rss) if rss else float("nan")
    print(f"{n} visit-paid events over {k} keys ({n // k} per key), sandbox latency {args.latency_ms:g} ms, "
          f"max in flight {args.in_flight}")  # fmt: skip
    print(f"{'':40}{'deliveries/s':>14}{'requests/s':>12}{'requests':>10}{'span s':>9}")
    print(f"{'two steps (set-order + confirm-order)':40}{rate:14.1f}{two['request_rate']:12.1f}"
          f"{two['requests']:10d}{two['span_s']:9.2f}")  # fmt: skip
    print(f"{'one step (new-client), same run':40}{one_rate:14.1f}{one_rate:12.1f}"
          f"{one['requests']:10d}{one['span_s']:9.2f}")  # fmt: skip
    print(f"{'ideal in_flight / (2 * latency)':40}{ideal:14.1f}{2 * ideal:12.1f}")
    print(f"two-step / one-step {rate / one_rate:.2f} (deliveries), {two['request_rate'] / one_rate:.2f} "
          f"(requests); two-step / ideal {rate / ideal:.2f}; one-step / its ideal {one_rate / ideal_one:.2f}")  # fmt: skip
    print(f"sandbox answers (path, status, errorCode): {two['status']}")
    print(f"between set-order answered and confirm-order sent: median {two['step_gap_ms'][0]:.0f} ms, p95 "
          f"{two['step_gap_ms'][1]:.0f} ms; requests open at the sandbox on average {two['open_avg']:.1f}")  # fmt: skip
    print(f"orders confirmed {two['confirmed']}/{n}; set-order requests {two['set_orders']} (repeated "
          f"{two['set_repeats']}), confirm-order requests {two['confirm_orders']}; confirm before its set-order "
          f"{two['confirm_before_set']}")  # fmt: skip
    print(f"lost {two['lost']}, duplicates {two['duplicates']}, keys out of order {two['order_violations']}, "
          f"max RSS of maxma {max_rss:.0f} MB; one-step: lost {one['lost']}, duplicates {one['duplicates']}")  # fmt: skip
    print(
        f"RESULT two_step_deliveries_per_s={rate:.1f} requests_per_s={two['request_rate']:.1f} "
        f"ideal_per_s={ideal:.1f} lost={two['lost']} duplicates={two['duplicates']} "
        f"out_of_order={two['order_violations']} one_step_per_s={one_rate:.1f} "
        f"two_step_over_one_step={rate / one_rate:.3f} ideal_ratio={rate / ideal:.3f} "
        f"confirm_before_set={two['confirm_before_set']} max_rss_mb={max_rss:.0f}"
    )
    ok = two["lost"] == two["duplicates"] == two["order_violations"] == two["confirm_before_set"] == 0
    ok = ok and one["lost"] == one["duplicates"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--case",
        choices=("one-step", "two-step"),
        default="one-step",
        help="one-step: client-created -> new-client vs a plain consumer; two-step: visit-paid -> set-order + "
        "confirm-order vs one-step (default events/keys: 10000/10000 and 5000/1000)",
    )
    parser.add_argument("--events", type=int, default=None)
    parser.add_argument("--keys", type=int, default=None)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--in-flight", type=int, default=100)
    parser.add_argument("--plain-seconds", type=float, default=20.0, help="one-step only")
    ns = parser.parse_args()
    two_step = ns.case == "two-step"
    ns.events = ns.events if ns.events is not None else (5000 if two_step else 10000)
    ns.keys = ns.keys if ns.keys is not None else (1000 if two_step else 10000)
    raise SystemExit(asyncio.run(main_two_step(ns) if two_step else main(ns)))
