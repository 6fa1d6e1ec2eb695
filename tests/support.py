"""Helpers shared by the integration tests: real HTTP servers, subprocess roles, Kafka look-ups."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.common import targets
from services.common.events import (
    Appointment,
    Client,
    CloudEvent,
    EventData,
    EventName,
    kafka_key,
    source_uri,
)
from services.common.kafka import EVENTS
from services.common.ledger import Ledger, upgrade
from services.sandbox.maxma import MaxmaSandbox, create_maxma_app

MAXMA_KEY = "test-processing-key-0123456789"
SOURCE_TOKEN = "salon-token-0123456789abcdef"
PHONE_KEY = "test-phone-hash-key-0123456789abcdef"


class _TestServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would take SIGINT/SIGTERM from pytest while serving.
        yield


@contextlib.asynccontextmanager
async def serve_app(
    app: Any, *, startup_timeout: float = 10.0, shutdown_timeout: float = 5.0, **config: Any
) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on a free 127.0.0.1 port in this event loop; yield its base URL."""
    # Bind first and hand the socket over: picking a port and binding later races with other tests.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config.setdefault("log_level", "warning")
    config.setdefault("timeout_graceful_shutdown", shutdown_timeout)
    server = _TestServer(uvicorn.Config(app, host="127.0.0.1", port=port, **config))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(startup_timeout):
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("uvicorn exited before it started")
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), shutdown_timeout + 5)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        sock.close()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+): a port from that range, picked now and bound
    by a process seconds later, may meanwhile become some client connection's local port."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


def write_config(
    path: Path, *, maxma_url: str | None = None, urls: Mapping[str, str] | None = None, **options: object
) -> Path:
    """One source, ``salon``, with a connection to each target in ``urls`` (and Maxma at ``maxma_url``).

    Each connection is its target's demo connection from the registry, its secret read from
    ``RELAY_TEST_<TARGET>_KEY``; ``options`` are added to every connection.
    """
    wanted = {**(urls or {}), **({"maxma": maxma_url} if maxma_url else {})}
    connections = [
        {**demo_connection(name, url, f"${{RELAY_TEST_{name.upper()}_KEY}}"), **options}
        for name, url in wanted.items()
    ]
    source = {"name": "salon", "token": "${RELAY_TEST_SOURCE_TOKEN}", "timezone": "Europe/Moscow",
              "phone_region": "RU", "connections": connections}  # fmt: skip
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


def demo_connection(target: str, url: str, secret: str) -> dict[str, Any]:
    """``target``'s connection to the server at ``url``, as the registry's demo config writes it."""
    spec = targets.get(target)
    assert spec.demo is not None, f"{target} declares no demo connection"
    return spec.demo(url, secret)


@dataclass
class Target:
    """A sandbox Maxma on real HTTP, a migrated SQLite ledger and a config file pointing at both."""

    sandbox: MaxmaSandbox
    ledger: Ledger
    db_url: str
    config: Path
    runtime: Any = None  # the in-process DeliveryRuntime, when a test starts one


@contextlib.asynccontextmanager
async def maxma_target(tmp_path: Path, **connection: object) -> AsyncIterator[Target]:
    sandbox = MaxmaSandbox()
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    ledger = Ledger.from_url(db_url)
    await upgrade(ledger.engine)
    try:
        async with serve_app(create_maxma_app(processing_keys={MAXMA_KEY}, state=sandbox)) as maxma_url:
            config = write_config(tmp_path / "relay.yaml", maxma_url=maxma_url, **connection)
            yield Target(sandbox, ledger, db_url, config)
    finally:
        await ledger.close()


def client_event(event_id: str, client_id: str, phone: str | None, name: str = "Попова Дарья") -> CloudEvent:
    """A client-created event of source `salon`, as the normalizer makes it."""
    now = datetime.now(UTC)
    return CloudEvent(
        id=event_id, source=source_uri("salon"), type=EventName.CLIENT_CREATED.ce_type, time=now,
        relayreceivedat=now, subject=f"client/{client_id}",
        data=EventData(client=Client(id=client_id, full_name=name, phone=phone)),
    )  # fmt: skip


def paid_visit(event_id: str, client_id: str, phone: str, visit: str, amount: str = "2500.00") -> CloudEvent:
    """A visit-paid event of source `salon` as the normalizer makes it once the Klientiks API completed it."""
    now = datetime.now(UTC)
    appt = Appointment(id=visit, total_cost=Decimal(amount), services=["Стрижка женская"])
    return CloudEvent(
        id=event_id, source=source_uri("salon"), type=EventName.VISIT_PAID.ce_type, time=now,
        relayreceivedat=now, subject=f"client/{client_id}",
        data=EventData(client=Client(id=client_id, phone=phone), appointment=appt),
    )  # fmt: skip


def event_id_of(request: Any) -> str:
    """The event id a sandbox request was made for (the end of its Idempotency-Key)."""
    return str(request.headers["idempotency-key"]).rsplit(":", 1)[-1]


async def publish_events(bootstrap: str, *events: CloudEvent, key: str | None = None) -> None:
    """Publish events to klientiks.events.v1 as the normalizer does (binary mode, per-client key)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for e in events:
            client, appt = e.data.client, e.data.appointment
            k = key or kafka_key(e.source_name, client.id if client else None, appt.id if appt else None)
            await producer.send_and_wait(EVENTS, e.kafka_value(), key=k.encode(), headers=e.kafka_headers())
    finally:
        await producer.stop()


# Fast retries for tests: three attempts in well under a second, short throttle and circuit pauses.
FAST_DELIVERY = {
    "retry_schedule": "0,0.2s",
    "throttle_floor_s": 1.0,
    "circuit_open_s": 1.0,
    "park_poll_s": 0.2,
    "commit_interval_s": 0.2,
}


def role_env(config: Path, bootstrap: str, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_CONFIG=str(config),
        RELAY_KAFKA__BOOTSTRAP_SERVERS=bootstrap,
        RELAY_KAFKA__ENABLE_IDEMPOTENCE="false",
        RELAY_DATABASE_URL=database_url,
        RELAY_LOG_FORMAT="json",
        RELAY_TEST_SOURCE_TOKEN=SOURCE_TOKEN,
        RELAY_TEST_MAXMA_KEY=MAXMA_KEY,
        # Tansu lets a consumer join its group in session_timeout_ms / 2, and a killed member holds its
        # partitions that long: a short session keeps every start and every kill short.
        RELAY_KAFKA__SESSION_TIMEOUT_MS="3000",
        RELAY_KAFKA__HEARTBEAT_INTERVAL_MS="600",
        **{f"RELAY_DELIVERY__{k.upper()}": str(v) for k, v in FAST_DELIVERY.items()},
    )
    env.update(extra)
    return env


class Roles:
    """Process roles started as `relay ...` subprocesses, as in production."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        port = free_port()
        out = (self.logs / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args, "--host", "127.0.0.1", "--port", str(port)],
            env={**self.env, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        self.procs[name], self.ports[name] = proc, port
        return proc

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    async def ready(self, *names: str, timeout: float = 30.0) -> None:
        async with httpx.AsyncClient() as client:
            for name in names:
                deadline = time.monotonic() + timeout
                while True:
                    proc = self.procs[name]
                    if proc.poll() is not None:
                        raise AssertionError(
                            f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get(self.url(name) + "/readyz", timeout=2)).status_code == 200:
                            break
                    if time.monotonic() > deadline:
                        raise AssertionError(f"{name} not ready:\n{self.log(name)[-3000:]}")
                    await asyncio.sleep(0.1)

    async def wait_exit(self, name: str, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while self.procs[name].poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} still running:\n{self.log(name)[-3000:]}")
            await asyncio.sleep(0.05)
        return int(self.procs[name].returncode)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return int(proc.returncode)

    async def terminate(self, name: str, sig: int = signal.SIGTERM, timeout: float = 40.0) -> int:
        """Signal a role and wait for it without blocking this event loop (it may serve the sandbox)."""
        self.procs[name].send_signal(sig)
        return await self.wait_exit(name, timeout)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(interval)


async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """Committed offsets of ``group`` on ``topic`` (Tansu needs ``partitions=``)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(await partition_count(bootstrap, topic))]
        offsets = await admin.list_consumer_group_offsets(group, partitions=parts)
        return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}
    finally:
        await admin.close()


async def partition_count(bootstrap: str, topic: str) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        meta = await admin.describe_topics([topic])
        return len(meta[0]["partitions"])
    finally:
        await admin.close()


async def read_all(
    bootstrap: str,
    topic: str,
    *,
    expect: int,
    timeout: float = 15.0,
    done: Callable[[list[Any]], bool] | None = None,
) -> list[Any]:
    """Every record of ``topic`` from the start, waiting until ``expect`` have arrived (or ``done`` says so)."""
    done = done or (lambda records: len(records) >= expect)
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while not done(records) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
    finally:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(consumer.stop(), 5)
    return records
