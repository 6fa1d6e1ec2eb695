"""Tests for services.common.embedded against the real Tansu binary."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.common.embedded import BrokerStartError, EmbeddedBroker, kafka_ready, tansu_binary

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _pid_gone(pid: int) -> bool:
    """True if the process no longer exists or is a zombie (killed, not yet reaped by init)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state is the first field after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _pid_gone(pid):
            return True
        time.sleep(0.02)
    return _pid_gone(pid)


@pytest.fixture
def broker() -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker().start()
    try:
        yield b
    finally:
        b.stop()


async def _quiet_stop(client: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient) -> None:
    # aiokafka's stop()/close() can raise (even CancelledError) once the broker is gone;
    # teardown must not mask the real test outcome.
    closer = client.close if isinstance(client, AIOKafkaAdminClient) else client.stop
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(closer(), timeout=5)


def test_binary_is_shipped() -> None:
    assert os.access(tansu_binary(), os.X_OK)


async def test_produce_consume_then_stop(broker: EmbeddedBroker) -> None:
    bootstrap = broker.bootstrap_servers
    host, port = bootstrap.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert kafka_ready(host, int(port))
    topic = "embedded-test"

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics([NewTopic(name=topic, num_partitions=3, replication_factor=1)])
        # Tansu auto-creates unknown topics (4 partitions), so make sure ours really was created.
        assert [err[1] for err in resp.topic_errors] == [0]
    finally:
        await _quiet_stop(admin)

    sent = {f"v{i}".encode() for i in range(12)}
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == {0, 1, 2}
        for i, value in enumerate(sorted(sent)):
            await producer.send_and_wait(topic, value, partition=i % 3)
    finally:
        await _quiet_stop(producer)

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id="embedded-test-group",
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    # Consumer start takes ~3 s: Tansu delays the first JoinGroup like Kafka's initial rebalance delay.
    await consumer.start()
    received: set[bytes] = set()
    partitions: set[int] = set()
    try:
        deadline = asyncio.get_running_loop().time() + 10
        while received != sent and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                partitions.add(tp.partition)
                received.update(r.value for r in records)
    finally:
        await _quiet_stop(consumer)

    assert received == sent
    assert partitions == {0, 1, 2}

    pid = broker.pid
    assert pid is not None
    broker.stop()
    assert _pid_gone(pid)
    assert broker.pid is None
    assert not broker.is_alive()
    assert not kafka_ready(host, int(port), timeout=0.5)


def test_port_taken_by_plain_listener() -> None:
    # Our socket accepts connections but never answers the Kafka probe; Tansu exits 0.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        b = EmbeddedBroker(port=port, start_timeout=5)
        with pytest.raises(BrokerStartError, match=str(port)):
            b.start()
        assert not b.is_alive()
        assert b.pid is None


def test_port_taken_by_another_kafka_broker(broker: EmbeddedBroker) -> None:
    # The other broker answers the probe, so liveness/ownership of our child must be checked.
    b = EmbeddedBroker(port=broker.port, start_timeout=5)
    with pytest.raises(BrokerStartError):
        b.start()
    assert not b.is_alive()
    assert broker.is_alive()


def test_broker_dies_with_parent() -> None:
    script = textwrap.dedent(
        """
        import time
        from services.common.embedded import EmbeddedBroker
        b = EmbeddedBroker().start()
        print(b.pid, b.port, flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    broker_pid = None
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 10)
        assert ready, "child did not report the broker"
        broker_pid, port = map(int, child.stdout.readline().split())
        assert kafka_ready("127.0.0.1", port)
        assert not _pid_gone(broker_pid)

        child.send_signal(signal.SIGKILL)
        child.wait(timeout=5)
        assert _wait_gone(broker_pid, 5), "broker outlived its parent"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if broker_pid is not None and not _pid_gone(broker_pid):
            os.kill(broker_pid, signal.SIGKILL)


def test_stop_idempotent_and_context_manager() -> None:
    b = EmbeddedBroker()
    b.stop()  # before start: no-op
    with b as started:
        assert started is b
        assert b.is_alive()
        pid = b.pid
        assert pid is not None
        assert b.start() is b  # already running: no-op, same process
        assert b.pid == pid
    assert not b.is_alive()
    assert b.pid is None
    assert _pid_gone(pid)
    b.stop()
    b.stop()
