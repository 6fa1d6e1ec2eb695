"""End to end: webhook accepted (202) -> sandbox Maxma received, at a fixed rate, on the embedded stack.

Side by side in the same run: one bare Kafka hop (aiokafka acks=all producer -> consumer) on the same
broker, the floor any Kafka pipeline pays per hop. Run: ``make bench`` or ``python -m bench.e2e``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.stack import TOKEN, maxma_config, pct, relay_env, rss_mb, stop_proc, wait_http
from services.common.embedded import EmbeddedBroker, free_port
from services.common.httpclient import make_http_client
from services.common.ledger import migrate
from services.sandbox.samples import client_params


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

    task = asyncio.create_task(consume())
    start = time.monotonic()
    for i in range(count):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        key = f"k{i}".encode()
        await producer.send_and_wait("bench.hop", b"x" * 400, key=key)
        sent[key] = time.time()  # like the webhook: measured from the moment the write was acknowledged
    await asyncio.wait_for(task, 30)
    await producer.stop()
    await consumer.stop()
    # A record can be fetched before its producer ack returns: that hop cost nothing after the ack.
    return [max(0.0, got[k] - t) for k, t in sent.items()]


async def main(rate: float, seconds: float) -> int:
    count = int(rate * seconds)
    work = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    broker = EmbeddedBroker().start()
    sandbox_port, api_port, norm_port, maxma_port = (free_port() for _ in range(4))
    config = maxma_config(work, f"http://127.0.0.1:{sandbox_port}")
    env = relay_env(config, broker.bootstrap_servers, work)
    roles = {
        "sandbox-maxma": (["sandbox", "maxma", "--key-file", str(work / "key")], sandbox_port),
        "ingest-api": (["ingest", "api"], api_port),
        "normalizer": (["ingest", "normalizer"], norm_port),
        "maxma": (["maxma"], maxma_port),
    }
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        await migrate(env["RELAY_DATABASE_URL"])
        hop = await kafka_hop(broker.bootstrap_servers, rate, count)
        for name, (args, port) in roles.items():
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *args, "--host", "127.0.0.1", "--port", str(port)],
                env=env,
                stdout=(work / f"{name}.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        await wait_http(f"http://127.0.0.1:{sandbox_port}/_sandbox/clients")
        for name in ("ingest-api", "normalizer", "maxma"):
            await wait_http(f"http://127.0.0.1:{roles[name][1]}/readyz")
        await asyncio.sleep(4)  # consumer groups join in ~3 s on Tansu

        accepted: dict[str, float] = {}
        ingest_ms: list[float] = []
        url = f"http://127.0.0.1:{api_port}/hooks/klientiks/{TOKEN}/client-created"
        # The load generator must not be the bottleneck: httpcore's pool is (see services.common.httpclient).
        async with make_http_client(64) as http:

            async def send(i: int) -> None:
                params = client_params(i, seed=int(time.time()))
                t0 = time.perf_counter()
                r = await http.get(url, params=params)
                ingest_ms.append((time.perf_counter() - t0) * 1000)
                if r.status_code == 202:
                    accepted[params["client_id"]] = time.time()

            start, tasks = time.monotonic(), []
            for i in range(count):
                await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
                tasks.append(asyncio.create_task(send(i)))
            await asyncio.gather(*tasks)
            sent_rate = count / (time.monotonic() - start)
            deadline = time.monotonic() + 60
            received: list[dict[str, object]] = []
            while time.monotonic() < deadline:
                received = (await http.get(f"http://127.0.0.1:{sandbox_port}/_sandbox/requests")).json()
                if len(
                    {str((r.get("body") or {}).get("client", {}).get("externalId")) for r in received}
                ) >= len(accepted):
                    break
                await asyncio.sleep(0.5)
        rss = {name: rss_mb(p.pid) for name, p in procs.items()} | {"broker": rss_mb(broker.pid or 0)}
        first_seen: dict[str, float] = {}
        per_client: dict[str, int] = {}
        for r in received:
            ext = str((r.get("body") or {}).get("client", {}).get("externalId"))  # type: ignore[union-attr]
            per_client[ext] = per_client.get(ext, 0) + 1
            first_seen.setdefault(ext, float(r["time"]))  # type: ignore[arg-type]
        e2e = [(first_seen[c] - t) * 1000 for c, t in accepted.items() if c in first_seen]
        lost = len(accepted) - len(e2e)
        dupes = sum(n - 1 for n in per_client.values() if n > 1)
        hop_ms = [h * 1000 for h in hop]
    finally:
        for p in procs.values():
            stop_proc(p)
        broker.stop()

    p50, p99, h50, h99 = pct(e2e, 0.5), pct(e2e, 0.99), pct(hop_ms, 0.5), pct(hop_ms, 0.99)
    print(f"rate asked {rate:.0f}/s, sent {sent_rate:.0f}/s, {count} webhooks, {len(accepted)} accepted")
    print(f"{'':28}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}")
    print(
        f"{'ingest request (202)':28}{pct(ingest_ms, 0.5):10.1f}{pct(ingest_ms, 0.99):10.1f}{statistics.fmean(ingest_ms):10.1f}"
    )
    print(f"{'one Kafka hop (floor)':28}{h50:10.1f}{h99:10.1f}{statistics.fmean(hop_ms):10.1f}")
    print(
        f"{'end to end (202 -> Maxma)':28}{p50:10.1f}{p99:10.1f}{statistics.fmean(e2e) if e2e else float('nan'):10.1f}"
    )
    print(f"end to end / one hop: p50 {p50 / h50:.2f}x, p99 {p99 / h99:.2f}x (the pipeline has two hops)")
    print("RSS MB: " + ", ".join(f"{k} {v:.0f}" for k, v in rss.items()))
    print(f"lost {lost}, duplicate requests {dupes}")
    print(
        f"RESULT e2e_p50_ms={p50:.1f} e2e_p99_ms={p99:.1f} hop_p50_ms={h50:.1f} hop_p99_ms={h99:.1f} "
        f"ratio_p50={p50 / h50:.2f} rate={sent_rate:.0f} lost={lost} duplicates={dupes} "
        f"max_rss_mb={max(v for k, v in rss.items() if k != 'broker'):.0f}"
    )
    return 0 if lost == 0 and dupes == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    raise SystemExit(asyncio.run(main(args.rate, args.seconds)))
