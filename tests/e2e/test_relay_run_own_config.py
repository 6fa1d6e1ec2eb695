"""`relay run` with one's own config (issue 9): the roles it needs, no sandbox it does not point at.

The config's Maxma is an external HTTP server (a sandbox Maxma the test starts on a port of its own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from services.cli.run import ROLES, roles_for
from services.common.config import load_settings
from services.common.embedded import free_port
from tests.e2e.test_relay_run import Run, _free_offset, _until

pytestmark = pytest.mark.timeout(240)
TOKEN = "own-config-token-0123456789"
KEY = "own-maxma-key-0123456789"


def _config(path: Path, maxma_url: str, klientiks_url: str | None = None) -> Path:
    klientiks = (
        f"    klientiks:\n      account_id: '1'\n      user_id: '1'\n      access_token: t\n"
        f"      base_url: {klientiks_url}\n"
        if klientiks_url
        else ""
    )
    path.write_text(
        "sources:\n  - name: salon\n    token: ${OWN_TOKEN}\n" + klientiks
        + "    connections:\n      - target: maxma\n"
        f"        base_url: {maxma_url}\n        processing_key: ${{file:maxma-key}}\n"
        "        events:\n          client-created: new-client\n"
    )  # fmt: skip
    (path.parent / "maxma-key").write_text(KEY)
    return path


def test_roles_follow_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OWN_TOKEN", TOKEN)
    ports = {name: port for name, _, port in ROLES}
    external = load_settings(_config(tmp_path / "a.yaml", "https://api.maxma.com"))
    assert roles_for(external, ports) == ["ingest-api", "normalizer", "maxma"]
    local = load_settings(
        _config(tmp_path / "b.yaml", "http://127.0.0.1:8090", "http://localhost:8091/clientix/Restapi")
    )
    assert roles_for(local, ports) == [
        "sandbox-maxma",
        "sandbox-klientiks",
        "ingest-api",
        "normalizer",
        "maxma",
    ]
    elsewhere = load_settings(_config(tmp_path / "c.yaml", "http://127.0.0.1:9999"))
    assert "sandbox-maxma" not in roles_for(elsewhere, ports)  # a local server of one's own, not the sandbox


def test_relay_run_with_ones_own_config_delivers_to_its_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    maxma_port = free_port()
    (tmp_path / "sandbox-key").write_text(KEY)
    external = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "sandbox", "maxma", "--host", "127.0.0.1", "--port", str(maxma_port),
         "--key-file", str(tmp_path / "sandbox-key")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    config = _config(tmp_path / "relay.yaml", f"http://127.0.0.1:{maxma_port}")
    offset, kafka_port = _free_offset(), free_port()
    out = tmp_path / "relay-run.out"
    with out.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", "--kafka-port", str(kafka_port),
             "--port-offset", str(offset)],
            cwd=tmp_path, env={**env, "RELAY_CONFIG": str(config), "OWN_TOKEN": TOKEN, "COLUMNS": "300"},
            stdout=f, stderr=subprocess.STDOUT,
        )  # fmt: skip
    run = Run(tmp_path, proc, out, kafka_port, {name: port + offset for name, _, port in ROLES})
    try:
        _until(lambda: "Deliveries" in run.output(), "relay run to start", run, timeout=120)
        assert sorted(p.name for p in (run.state / "pids").iterdir()) == ["ingest-api", "maxma", "normalizer"]
        for sandbox in ("sandbox-maxma", "sandbox-klientiks"):
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{run.url(sandbox)}/_sandbox/clients", timeout=2)
        r = httpx.get(
            f"{run.url('ingest-api')}/hooks/klientiks/{TOKEN}/client-created",
            params={"client_id": "4242", "client_phone": "79164242424"},
            timeout=10,
        )
        assert r.status_code == 202, r.text

        def delivered() -> bool:
            clients = httpx.get(f"http://127.0.0.1:{maxma_port}/_sandbox/clients", timeout=2).json()
            return [c.get("externalId") for c in clients] == ["4242"]

        _until(delivered, "the client at the config's own Maxma", run)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        external.terminate()
        external.wait(timeout=10)
