"""`relay run` as a user starts it (Tansu, every role, real HTTP): a killed role comes back, data is private.

Issue 8: part 7 (the ledger file's mode, the keyed phone index) and part 6 (`kill -9` of the maxma child
lost the webhooks already answered 202; now the role is restarted and the broker kept). One `relay run`
in a temporary working folder (its `.relay/`), on free ports, serves the first two tests, in order: the
second stops it with SIGTERM. The last test kills the broker of a run of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli import ROLES
from services.common.embedded import free_port

pytestmark = pytest.mark.timeout(240)


@dataclass
class Run:
    cwd: Path
    proc: subprocess.Popen[bytes]
    out: Path
    kafka_port: int
    ports: dict[str, int]

    @property
    def state(self) -> Path:
        return self.cwd / ".relay"

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def pid(self, role: str) -> int:
        return int((self.state / "pids" / role).read_text())

    def url(self, role: str) -> str:
        return f"http://127.0.0.1:{self.ports[role]}"

    def webhook(self, client_id: str, phone: str) -> httpx.Response:
        token = (self.state / "secrets" / "demo-token").read_text().strip()
        return httpx.get(
            f"{self.url('ingest-api')}/hooks/klientiks/{token}/client-created",
            params={"client_id": client_id, "client_phone": phone, "client_name": "Попова Дарья"},
            timeout=10,
        )

    def sandbox_requests(self, client_id: str) -> list[dict[str, Any]]:
        """The sandbox Maxma's requests for one Klientiks client (its externalId)."""
        requests = httpx.get(f"{self.url('sandbox-maxma')}/_sandbox/requests").json()
        return [r for r in requests if f'"{client_id}"' in json.dumps(r["body"])]

    def clients(self) -> list[dict[str, Any]]:
        clients: list[dict[str, Any]] = httpx.get(f"{self.url('sandbox-maxma')}/_sandbox/clients").json()
        return clients


def _until(check: Callable[[], object], what: str, run: Run, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError, OSError, ValueError, sqlite3.Error):
            if check():
                return
        if run.proc.poll() is not None:
            raise AssertionError(f"relay run exited ({run.proc.returncode}):\n{run.output()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{run.output()[-4000:]}")
        time.sleep(0.2)


def _free_offset() -> int:
    """An offset that puts every role's HTTP port on a free port."""
    for _ in range(50):
        offset = random.randrange(20000, 40000)
        try:
            with contextlib.ExitStack() as stack:
                for _, _, port in ROLES:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return offset
    raise RuntimeError("no free ports for relay run")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _tansu_pids(kafka_port: int) -> list[int]:
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                cmd = (d / "cmdline").read_bytes().split(b"\0")
                if cmd[0].endswith(b"tansu") and f"tcp://127.0.0.1:{kafka_port}".encode() in cmd:
                    found.append(int(d.name))
    return found


@contextlib.contextmanager
def _relay_run(cwd: Path) -> Iterator[Run]:
    """`relay run` on the demo config in ``cwd`` on free ports, once up; killed after if still running."""
    offset, kafka_port = _free_offset(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["COLUMNS"] = "300"  # one line per live-view entry
    out = cwd / "relay-run.out"
    argv = ["run", "--kafka-port", str(kafka_port), "--port-offset", str(offset)]
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *argv],
            cwd=cwd,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    r = Run(cwd, proc, out, kafka_port, {name: port + offset for name, _, port in ROLES})
    try:
        _until(lambda: "Deliveries" in r.output(), "relay run to start", r, timeout=120)
        yield r
    finally:
        if proc.poll() is None:
            proc.kill()  # its children get SIGKILL too (PR_SET_PDEATHSIG)
            proc.wait()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    with _relay_run(tmp_path_factory.mktemp("relay-run")) as r:
        yield r


def _event_row(db: Path, event_id: str) -> tuple[str | None] | None:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        row: tuple[str | None] | None = conn.execute(
            "SELECT phone_hash FROM events WHERE id = ?", (event_id,)
        ).fetchone()
        return row


def test_issue11_relay_demo_tells_a_clients_whole_story_through_all_four_targets(run: Run) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    demo = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--base-url", run.url("ingest-api"), "--count", "1"],
        cwd=run.cwd, env={**env, "COLUMNS": "400"}, capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert "not yet" not in out, out
    for shown in ("confirmed", "lead ", "won", "postback click_id=", "value=3300.00"):
        assert shown in out, out


def test_part7_ledger_is_private_and_the_phone_index_keyed(run: Run) -> None:
    assert stat.S_IMODE(run.state.stat().st_mode) == 0o700
    for name in ("relay.db", "relay.db-wal", "relay.db-shm"):
        assert stat.S_IMODE((run.state / name).stat().st_mode) == 0o600, name
    key_file = run.state / "secrets" / "phone-hash-key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = key_file.read_text().strip()
    assert len(key) >= 32
    assert key not in (run.state / "demo.yaml").read_text()  # referenced, never written in the YAML

    r = run.webhook("7007", "8 (916) 700-00-07")
    assert r.status_code == 202, r.text
    event_id = r.json()["event_id"]
    db = run.state / "relay.db"
    _until(lambda: (_event_row(db, event_id) or (None,))[0], "the event in the ledger", run)
    row = _event_row(db, event_id)
    assert row is not None
    e164 = "+79167000007"
    assert row[0] == hmac.new(key.encode(), e164.encode(), hashlib.sha256).hexdigest()
    assert row[0] != hashlib.sha256(e164.encode()).hexdigest()

    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_CONFIG=str(run.state / "demo.yaml"),
        RELAY_DATABASE_URL=f"sqlite+aiosqlite:///{db}",
        COLUMNS="250",
    )
    relay = [sys.executable, "-m", "services.cli", "events", "find", "--phone", "+7 916 700 00 07"]
    found = subprocess.run(relay, env=env, cwd=run.cwd, capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stdout + found.stderr
    assert event_id in found.stdout
    env.pop("RELAY_CONFIG")  # no key: phone search says what is missing instead of finding nothing
    nokey = subprocess.run(relay, env=env, cwd=run.cwd, capture_output=True, text=True, timeout=60)
    assert nokey.returncode == 2
    assert "phone_hash_key" in nokey.stdout + nokey.stderr


def test_part6_a_killed_maxma_is_restarted_and_accepted_webhooks_are_delivered(run: Run) -> None:
    others = {name: run.pid(name) for name, _, _ in ROLES if name != "maxma"}
    killed = run.pid("maxma")
    latency = f"{run.url('sandbox-maxma')}/_sandbox/latency"
    httpx.post(latency, json={"ms": 2000}).raise_for_status()
    before = run.webhook("6001", "79990006001")
    assert before.status_code == 202, before.text
    # Killed with this webhook's delivery on the wire: answered 202, not delivered yet.
    _until(lambda: run.sandbox_requests("6001"), "the delivery of the first webhook under way", run)
    os.kill(killed, signal.SIGKILL)
    httpx.post(latency, json={"ms": 0}).raise_for_status()
    # Answered 202 while maxma is down: these waited in the broker, which `relay run` kept.
    during = [run.webhook(f"600{i}", f"7999000600{i}") for i in range(2, 5)]
    assert [r.status_code for r in during] == [202, 202, 202]

    _until(lambda: "maxma exited (killed by SIGKILL), restart 1 in 0.5 s" in run.output(), "the exit", run)
    _until(lambda: run.pid("maxma") != killed, "the restart", run)
    assert f"maxma restarted (restart 1, pid {run.pid('maxma')})" in run.output()
    assert "see .relay/logs/maxma.log" in run.output()
    assert {name: run.pid(name) for name in others} == others  # no other role was touched

    wanted = {"6001", "6002", "6003", "6004"}
    _until(lambda: wanted <= {c["externalId"] for c in run.clients()}, "the accepted webhooks", run, 90)
    after = run.webhook("6005", "79990006005")
    assert after.status_code == 202, after.text
    _until(lambda: "6005" in {c["externalId"] for c in run.clients()}, "a webhook after the restart", run)
    ids = [c["externalId"] for c in run.clients() if c["externalId"].startswith("600")]
    assert sorted(ids) == ["6001", "6002", "6003", "6004", "6005"]  # each once
    # The restarted maxma sent the interrupted delivery again; Maxma's externalId kept it one client.
    assert len(run.sandbox_requests("6001")) >= 2

    # SIGTERM stops everything cleanly: roles first, then the broker; nothing is left running.
    roles = {name: run.pid(name) for name, _, _ in ROLES}
    brokers = _tansu_pids(run.kafka_port)
    assert len(brokers) == 1
    run.proc.send_signal(signal.SIGTERM)
    assert run.proc.wait(timeout=60) == 0, run.output()[-4000:]
    assert run.output().rstrip().endswith("stopped")
    assert "Finished server process" in (run.state / "logs" / "maxma.log").read_text()
    for name, pid in [*roles.items(), ("broker", brokers[0])]:
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"{name} (pid {pid}) still running"
    assert list((run.state / "pids").iterdir()) == []


def test_part6_a_dead_broker_is_said_plainly_and_stops_everything(tmp_path: Path) -> None:
    with _relay_run(tmp_path) as r:
        roles = {name: r.pid(name) for name, _, _ in ROLES}
        (broker,) = _tansu_pids(r.kafka_port)
        os.kill(broker, signal.SIGKILL)
        assert r.proc.wait(timeout=60) == 1, r.output()[-4000:]
        out = r.output()
        assert "The embedded Kafka broker exited. It kept everything in memory, so that is lost" in out
        assert out.rstrip().endswith("stopped")
        assert "restarted" not in out  # the roles were stopped, not restarted on an empty broker
        for pid in roles.values():
            assert not _alive(pid)
