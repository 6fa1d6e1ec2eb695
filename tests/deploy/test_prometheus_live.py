"""A real Prometheus scrapes every role through a salon's burst of webhooks; then every dashboard query and
every alert expression is evaluated through its HTTP API.

The roles run as processes against Tansu and the sandboxes (Maxma answers 20% of calls with 503, CPA.House
refuses one lead with a message about its key), so retries, dead letters, an open circuit, skips, a quarantined
record, a repeat, a thin webhook completed from the Klientiks API and a refused request all leave series. A
query that errors fails the test, and so does a panel query without a series after that traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from services.common.config import KafkaSettings
from services.common.ledger import Ledger, upgrade
from services.deploy import observability as obs
from services.deploy.roles import METRICS_PATH, roles
from services.sandbox.cpahouse import CpaHouseSandbox, create_cpahouse_app
from services.sandbox.klientiks import SandboxAccount, create_klientiks_sandbox
from services.sandbox.maxma import MaxmaSandbox, create_maxma_app
from services.sandbox.plarin import PlarinSandbox, create_plarin_app
from services.sandbox.weeek import WeeekSandbox, create_weeek_app
from tests.support import MAXMA_KEY, SOURCE_TOKEN, Roles, demo_connection, free_port, role_env, serve_app

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CPA_KEY = "cpa-house-api-key-0123456789"
WEEEK_TOKEN = "weeek-token-0123456789abcdef"
PLARIN_TOKEN = "plarin-token-0123456789"
CLIENTS = 240  # client-created webhooks: each a Maxma client, a CPA.House lead and a Weeek contact
_accounts = itertools.count(int(time.time()) % 100000 * 100 + 40)

# Panel queries that may rightly find no series after this traffic.
MAY_BE_EMPTY = {
    # Only a batch that failed (Kafka or the ledger unavailable) creates it.
    "Failed batches/s",
}


def _prometheus() -> str:
    path = shutil.which("prometheus")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (Debian's prometheus package); CI must have it")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    return path


@dataclass
class Prometheus:
    url: str
    http: httpx.AsyncClient

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now; a query error fails the test."""
        r = await self.http.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = r.json()
        assert r.status_code == 200, f"{expr}\n-> {r.status_code} {body}"
        assert body["status"] == "success", f"{expr}\n-> {body}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def label_values(self, metric: str, label: str) -> list[str]:
        r = await self.http.get(f"{self.url}/api/v1/label/{label}/values", params={"match[]": metric})
        values: list[str] = r.json()["data"]
        return values


@contextlib.contextmanager
def _prometheus_process(binary: str, jobs: dict[str, str], tmp: Path) -> Iterator[str]:
    """Prometheus on loopback scraping ``jobs`` (job -> host:port) every second, with the alert rules."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / obs.ALERTS)],
        "scrape_configs": [
            {"job_name": job, "metrics_path": METRICS_PATH, "static_configs": [{"targets": [target]}]}
            for job, target in jobs.items()
        ],
    }
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _config(path: Path, urls: dict[str, str], klientiks_url: str, account: SandboxAccount) -> Path:
    source = {
        "name": "salon", "token": "${RELAY_TEST_SOURCE_TOKEN}", "timezone": "Europe/Moscow", "phone_region": "RU",
        "rate_limit_per_s": 10000,
        "klientiks": {"account_id": account.account_id, "user_id": account.user_id,
                      "access_token": account.access_token, "base_url": f"{klientiks_url}/clientix/Restapi",
                      "rate_limit_per_s": 50},
        "connections": [
            demo_connection("maxma", urls["maxma"], "${RELAY_TEST_MAXMA_KEY}"),
            demo_connection("cpahouse", urls["cpahouse"], CPA_KEY),
            {**demo_connection("weeek", urls["weeek"], WEEEK_TOKEN), "rate_limit_per_s": 20},
            demo_connection("plarin", urls["plarin"], PLARIN_TOKEN),
        ],
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"sources": [source]}, allow_unicode=True, sort_keys=False))
    return path


@dataclass
class Stack:
    roles: Roles
    prometheus: Prometheus
    klientiks: Any
    account: SandboxAccount


@pytest.fixture
async def stack(kafka: KafkaSettings, tmp_path: Path) -> AsyncIterator[Stack]:
    binary = _prometheus()
    account = SandboxAccount(str(next(_accounts)), "113421", "kl-access-token-7f3a9c1e5b2d")
    klientiks_app = create_klientiks_sandbox([account], seed=5)
    maxma, cpa = MaxmaSandbox(), CpaHouseSandbox()
    maxma.add_fault({"mode": "http_status", "status": 503, "probability": 0.2, "seed": 12})
    cpa.add_fault({"mode": "error_msg", "msg": "Неверный api_key"})  # the first lead: a dead letter
    db_url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"
    ledger = Ledger.from_url(db_url)
    await upgrade(ledger.engine)
    await ledger.close()
    async with (
        serve_app(create_maxma_app({MAXMA_KEY}, maxma)) as maxma_url,
        serve_app(create_cpahouse_app({CPA_KEY: "1001"}, cpa)) as cpa_url,
        serve_app(create_weeek_app({WEEEK_TOKEN}, WeeekSandbox())) as weeek_url,
        serve_app(create_plarin_app(PLARIN_TOKEN, PlarinSandbox())) as plarin_url,
        serve_app(klientiks_app) as klientiks_url,
        httpx.AsyncClient(timeout=10) as http,
    ):
        urls = {"maxma": maxma_url, "cpahouse": cpa_url, "weeek": weeek_url, "plarin": plarin_url}
        config = _config(tmp_path / "relay.yaml", urls, klientiks_url, account)
        # A short grace: the roles stop at once, whatever is still being retried.
        env = role_env(config, kafka.bootstrap_servers, db_url, RELAY_DELIVERY__SHUTDOWN_GRACE_S="1")
        procs = Roles(env, tmp_path)
        try:
            for role in roles():
                procs.start(role.name, *role.args)
            jobs = {obs.scrape_job(r): f"127.0.0.1:{procs.ports[r.name]}" for r in roles()}
            with _prometheus_process(binary, jobs, tmp_path) as url:
                await procs.ready(*(r.name for r in roles()), timeout=60)
                await _until(lambda: _ok(http, f"{url}/-/ready"), 20, "Prometheus ready")
                yield Stack(procs, Prometheus(url, http), klientiks_app.state.sandbox, account)
        finally:
            for proc in procs.procs.values():  # all at once, then wait for each
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            procs.stop_all()


async def _ok(http: httpx.AsyncClient, url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get(url)).status_code == 200
    return False


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def _traffic(stack: Stack) -> None:
    """A few hundred webhooks, with the odd one that becomes a quarantined record, a repeat or a thin one."""
    api = f"{stack.roles.url('ingest-api')}/hooks/klientiks/{SOURCE_TOKEN}"
    gate = asyncio.Semaphore(16)

    async with httpx.AsyncClient(timeout=10) as http:

        async def hook(event: str, **params: str) -> None:
            async with gate:
                r = await http.get(f"{api}/{event}", params=params)
            assert r.status_code == 202, r.text

        def client(i: int) -> dict[str, str]:
            return {"client_id": str(500000 + i), "client_phone": f"7916{1000000 + i}",
                    "client_name": f"Клиентка {i}", "client_email": ""}  # fmt: skip

        await asyncio.gather(*(hook("client-created", **client(i)) for i in range(CLIENTS)))
        await hook("client-created", **client(0))  # the same webhook again: deduplicated
        await hook("client-created", client_name="без номера")  # no id at all: quarantined
        # A thin webhook (seed 004's template) the Klientiks API completes.
        kl, acc = stack.klientiks, stack.account.account_id
        c = kl.add_client({"account_id": acc, "phone": "+79035550011", "first_name": "Ольга"})
        visit = kl.add_appointment({"account_id": acc, "client_id": int(c["id"]),
                                    "start_datetime": "2030-05-01T12:00:00", "services": ["Стрижка"]})  # fmt: skip
        await hook("appointment-changed", appointment_id=str(visit["id"]), status="confirmed")
        # A paid visit the API does not know: a Maxma dead letter (no amount), a Plarin skip (no click id).
        await hook(
            "visit-paid", client_id=str(c["id"]), appointment_id="99999999", appointment_status="finished"
        )
        r = await http.get(f"{stack.roles.url('ingest-api')}/hooks/klientiks/not-a-token/client-created")
        assert r.status_code == 404
        with contextlib.suppress(httpx.HTTPError):  # 431, and the connection is closed
            await http.get(f"{api}/client-created", headers={"X-Padding": "x" * 20000})


def _resolve(expr: str, variables: dict[str, str]) -> str:
    for name, value in variables.items():
        expr = expr.replace(f"${name}", value)
    assert "$" not in expr, expr
    return expr


async def _variables(p: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each query variable as Grafana's "All" renders it in a regex: every value its query finds."""
    out = {"__rate_interval": "15s"}
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", var["definition"])
        assert m, var["definition"]
        values = await p.label_values(m.group(1), m.group(2))
        assert values, f"${var['name']}: {var['definition']} finds nothing"
        assert all(re.fullmatch(r"[\w-]+", v) for v in values), values  # nothing Grafana would escape
        out[var["name"]] = "(" + "|".join(values) + ")"
    return out


def _panel_queries() -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for d in obs.DASHBOARDS:
        model = json.loads((ROOT / obs.DASHBOARDS_DIR / d.file).read_text(encoding="utf-8"))
        for panel in model["panels"]:
            out.extend((panel["title"], t["expr"], model) for t in panel["targets"])
    return out


async def test_dashboards_and_alerts_evaluate_on_a_real_prometheus(stack: Stack) -> None:
    p = stack.prometheus
    # Compose's scrape jobs and the ServiceMonitors use METRICS_PATH: every role must answer it.
    for role in roles():
        r = await p.http.get(stack.roles.url(role.name) + METRICS_PATH, follow_redirects=False)
        assert r.status_code == 200, f"{role.name} answers {r.status_code} at {METRICS_PATH}"
    await _traffic(stack)

    queries = _panel_queries()
    empty: list[str] = []

    async def all_have_series() -> bool:
        empty.clear()
        for title, expr, model in queries:
            if title in MAY_BE_EMPTY:
                continue
            resolved = _resolve(expr, await _variables(p, model))
            if not await p.query(resolved):
                empty.append(f"{title}: {resolved}")
        return not empty

    deadline = time.monotonic() + 45
    while not await all_have_series():
        assert time.monotonic() < deadline, "panel queries without a series:\n" + "\n".join(empty)
        await asyncio.sleep(1)

    # Every role is scraped under the job the rules name.
    up = {r["metric"]["job"]: r["value"][1] for r in await p.query("up")}
    assert up == {obs.scrape_job(r): "1" for r in roles()}

    rules = [
        rule for group in yaml.safe_load((ROOT / obs.ALERTS).read_text())["groups"] for rule in group["rules"]
    ]
    for rule in rules:
        await p.query(rule["expr"])  # no error
    for quiet in ("RelayProcessDown", "RelayProcessMissing", "RelayIngestUnavailable", "RelayIngestSpooling"):
        (rule,) = [r for r in rules if r["alert"] == quiet]
        assert await p.query(rule["expr"]) == [], quiet

    # Prometheus's own rule manager evaluated every rule, without an error.
    async def evaluated() -> bool:
        body = (await p.http.get(f"{p.url}/api/v1/rules")).json()["data"]["groups"]
        loaded = {r["name"]: r for g in body for r in g["rules"]}
        assert set(loaded) == {r["alert"] for r in rules}
        bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] == "err"}
        assert not bad, bad
        return all(r["health"] == "ok" for r in loaded.values())

    await _until(evaluated, 10, "every rule evaluated")
