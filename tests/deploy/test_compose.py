"""docker-compose.yml, Prometheus' scrape config and the compose example config (issue 12).

They are generated (services/deploy/compose.py): the committed files must be what the code renders, the
compose file must satisfy the compose specification, and every role, sandbox, secret and scrape job must be
wired the way the CLI and the config loader expect. A target registered here reaches all of them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer.main
import yaml
from pydantic import BaseModel, ConfigDict

from services.cli import app
from services.common import config as config_module
from services.common import targets
from services.common.config import DeliverySettings, load_settings
from services.deploy import compose
from services.deploy.roles import METRICS_PATH, roles, sandboxes

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ONE_SHOT = {"migrate": ["db", "upgrade"], "topics": ["kafka", "create-topics"]}
THIRD_PARTY = {"kafka", "postgres", "prometheus", "grafana"}


@pytest.fixture(autouse=True)
def _product_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the product's targets: another test may have registered one of its own in this process."""
    specs = {n: s for n, s in targets._specs.items() if n in targets.ENTRIES}
    monkeypatch.setattr(targets, "_specs", specs)
    monkeypatch.setattr(config_module, "_REGISTERED", set(config_module._REGISTERED))


def _load(rel: str) -> Any:
    return yaml.safe_load((ROOT / rel).read_text(encoding="utf-8"))


@pytest.fixture
def spec() -> dict[str, Any]:
    data: dict[str, Any] = _load(compose.COMPOSE_FILE)
    return data


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _resolve(argv: list[str]) -> Any:
    """Parse ``relay <argv>`` with the real CLI down to its command, without running it; its context."""
    command: Any = typer.main.get_command(app)
    ctx = command.make_context("relay", list(argv))
    while hasattr(command, "resolve_command"):  # a group: on to its subcommand
        rest = [*(getattr(ctx, "_protected_args", None) or []), *ctx.args]
        if not rest:
            break  # a group that runs without a subcommand (`relay weeek`)
        name, command, rest = command.resolve_command(ctx, rest)
        assert command is not None, f"relay {' '.join(argv)}: no command {name}"
        ctx = command.make_context(name, rest, parent=ctx)
    return ctx


def test_the_committed_files_are_what_the_code_renders() -> None:
    stale = [
        rel
        for rel, text in compose.render().items()
        if not (ROOT / rel).exists() or (ROOT / rel).read_text(encoding="utf-8") != text
    ]
    assert not stale, f"stale or missing: {stale}; run `relay deploy render`"


def test_rendering_is_deterministic() -> None:
    assert compose.render() == compose.render()


def test_the_compose_file_satisfies_the_compose_specification() -> None:
    out = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", ROOT / compose.COMPOSE_FILE],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_role_is_a_service_with_its_command_port_and_readiness_probe(spec: dict[str, Any]) -> None:
    services = spec["services"]
    for role in roles():
        service = services[role.name]
        command = service["command"]
        assert command[: len(role.args)] == list(role.args), role.name
        assert _option(command, "--port") == str(role.port)
        assert _option(command, "--host") == "0.0.0.0"
        assert service["image"] == compose.RELAY_IMAGE
        assert service["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
        assert f"http://127.0.0.1:{role.port}/readyz" in service["healthcheck"]["test"][3]
        assert service["environment"]["RELAY_CONFIG"] == compose.CONFIG_IN_CONTAINER
        assert any(v.endswith(f":{compose.CONFIG_IN_CONTAINER}:ro") for v in service["volumes"])
        assert service["read_only"] is True
        assert service["restart"] == "unless-stopped"
        # compose waits this long for the drain before SIGKILL
        drain = DeliverySettings.model_fields["shutdown_grace_s"].default
        assert int(service["stop_grace_period"].rstrip("s")) > drain
        deps = service["depends_on"]
        assert deps["migrate"] == {"condition": "service_completed_successfully"}
        assert deps["topics"] == {"condition": "service_completed_successfully"}
        if role.target is not None:
            assert deps[f"sandbox-{role.target}"] == {"condition": "service_healthy"}
    assert services["ingest-api"]["ports"] == ["8080:8080"]  # where Klientiks sends webhooks
    assert [name for name in services if name not in THIRD_PARTY | set(ONE_SHOT) | {"relay"}] == [
        *(r.name for r in roles()),
        *(f"sandbox-{n}" for n, _ in sandboxes()),
    ]


def test_every_sandbox_is_a_service_standing_in_for_its_target(spec: dict[str, Any]) -> None:
    services = spec["services"]
    for name, port in sandboxes():
        service = services[f"sandbox-{name}"]
        command = service["command"]
        assert command[:2] == ["sandbox", name]
        assert _option(command, "--port") == str(port)
        assert _option(command, "--host") == "0.0.0.0"
        assert f"http://127.0.0.1:{port}/_sandbox/faults" in service["healthcheck"]["test"][3]
        assert service["ports"] == [f"127.0.0.1:{port}:{port}"]
        option, secret = compose.sandbox_secret(name) or (None, None)
        assert option is not None, f"sandbox {name} has no credentials: it would accept anything"
        assert _option(command, option) == f"/run/secrets/{secret}"
        assert service["secrets"] == [secret]


def test_every_command_compose_runs_is_one_the_cli_has(spec: dict[str, Any]) -> None:
    for name, service in spec["services"].items():
        if name in THIRD_PARTY or name == "relay":  # `relay` (profile tools) runs --help
            continue
        command = service["command"]
        ctx = _resolve(command)  # an unknown command or option raises here
        words = [w for w in command if w.startswith("-")]
        leaf = command[: command.index(words[0])] if words else command
        assert ctx.info_name == leaf[-1], name
        assert not ctx.args, f"{name}: arguments left over: {ctx.args}"
        if "--port" in command:
            assert ctx.params["port"] == int(_option(command, "--port")), name
            assert ctx.params["host"] == "0.0.0.0", name
    assert spec["services"]["relay"]["command"] == ["--help"]
    assert spec["services"]["relay"]["profiles"] == ["tools"]
    for name, command in ONE_SHOT.items():
        service = spec["services"][name]
        assert service["command"] == command
        assert service["restart"] == "no"
    assert spec["services"]["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert spec["services"]["topics"]["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    # One service builds the image; the others name the same tag, so compose builds it once.
    built = [n for n, s in spec["services"].items() if "build" in s]
    assert built == ["migrate"]
    assert {s["image"] for n, s in spec["services"].items() if n not in THIRD_PARTY} == {compose.RELAY_IMAGE}


def test_dependencies_wait_for_what_can_report_it(spec: dict[str, Any]) -> None:
    services = spec["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep} to be healthy: it has no check"
                )
            elif cond["condition"] == "service_completed_successfully":
                assert services[dep]["restart"] == "no", f"{dep} is not a one-shot"
    kafka, postgres = services["kafka"], services["postgres"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "kafka-broker-api-versions.sh" in kafka["healthcheck"]["test"][1]
    assert kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{compose.KAFKA_BOOTSTRAP}"
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]


def test_the_readiness_probe_fails_unless_ready(tmp_path: Path) -> None:
    """The healthcheck's one-liner, run against a server answering 200, then 503, then nothing."""
    import http.server
    import threading

    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    test = compose.probe(8080, "/readyz")["test"]
    code = test[3].replace("127.0.0.1:8080", f"127.0.0.1:{port}")

    def probe() -> int:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode

    try:
        assert probe() == 0
        status["code"] = 503
        assert probe() != 0
    finally:
        server.shutdown()
        server.server_close()
    assert probe() != 0  # connection refused


def test_prometheus_scrapes_every_role_and_loads_the_alerts(tmp_path: Path) -> None:
    prom = _load(compose.PROMETHEUS_FILE)
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert list(jobs) == [r.name for r in roles()]
    for role in roles():
        job = jobs[role.name]
        assert job["metrics_path"] == METRICS_PATH == "/metrics/"
        assert job["static_configs"] == [{"targets": [f"{role.name}:{role.port}"]}]
    assert prom["rule_files"] == ["/etc/prometheus/alerts.yml"]
    mounts = _load(compose.COMPOSE_FILE)["services"]["prometheus"]["volumes"]
    assert f"./{compose.PROMETHEUS_FILE}:/etc/prometheus/prometheus.yml:ro" in mounts
    assert f"./{compose.ALERTS_FILE}:/etc/prometheus/alerts.yml:ro" in mounts
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian's prometheus package; .ci/run installs it)")
    # promtool reads the rule file where the config names it: point it at the repository's copy.
    alerts = ROOT / compose.ALERTS_FILE
    prom["rule_files"] = [str(alerts)] if alerts.exists() else []
    copy = tmp_path / "prometheus.yml"
    copy.write_text(yaml.safe_dump(prom))
    out = subprocess.run(
        [promtool, "check", "config", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_gets_the_provisioning_and_dashboards_the_observability_files_name() -> None:
    grafana = _load(compose.COMPOSE_FILE)["services"]["grafana"]
    assert f"./{compose.GRAFANA_PROVISIONING}:/etc/grafana/provisioning:ro" in grafana["volumes"]
    assert (
        f"./{compose.GRAFANA_DASHBOARDS}:{compose.GRAFANA_DASHBOARDS_IN_CONTAINER}:ro" in grafana["volumes"]
    )
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        f"/run/secrets/{compose.GRAFANA_PASSWORD}"
    )
    try:
        from services.deploy import observability
    except ModuleNotFoundError:
        pytest.skip("services.deploy.observability (dashboards, alerts, provisioning) is not there yet")
    files = observability.render()
    assert compose.ALERTS_FILE in files
    assert any(p.startswith(f"{compose.GRAFANA_DASHBOARDS}/") and p.endswith(".json") for p in files)
    provisioning = {
        p: yaml.safe_load(t) for p, t in files.items() if p.startswith(compose.GRAFANA_PROVISIONING)
    }
    datasources = [
        ds for p, d in provisioning.items() if "/datasources/" in p for ds in d.get("datasources", [])
    ]
    providers = [pr for p, d in provisioning.items() if "/dashboards/" in p for pr in d.get("providers", [])]
    assert any(ds.get("url") == f"http://prometheus:{compose.PROMETHEUS_PORT}" for ds in datasources), (
        datasources
    )
    assert any(
        pr.get("options", {}).get("path", "").rstrip("/") == compose.GRAFANA_DASHBOARDS_IN_CONTAINER
        for pr in providers
    ), providers


def _example_settings(tmp_path: Path) -> Any:
    """The example config as a container reads it, its /run/secrets files taken from deploy/compose/secrets."""
    text = (ROOT / compose.EXAMPLE_CONFIG).read_text(encoding="utf-8")
    path = tmp_path / "relay.yaml"
    path.write_text(text.replace("/run/secrets/", f"{ROOT / compose.SECRETS_DIR}/"), encoding="utf-8")
    return load_settings(path)


def test_the_example_config_loads_and_every_connection_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    settings = _example_settings(tmp_path)
    assert targets.check(settings) == []
    assert settings.kafka.bootstrap_servers == compose.KAFKA_BOOTSTRAP
    assert settings.database_url == (
        "postgresql+asyncpg://relay:"
        + (ROOT / compose.SECRETS_DIR / compose.POSTGRES_PASSWORD).read_text().strip()
        + "@postgres:5432/relay"
    )
    assert settings.phone_hash_key is not None
    (source,) = settings.sources
    assert source.klientiks is not None
    assert (
        source.klientiks.base_url
        == f"http://sandbox-klientiks:{dict(sandboxes())['klientiks']}/clientix/Restapi"
    )
    # One connection to each target's sandbox, at the sandbox's compose host name and port.
    connected = {c.target: c for c in source.connections}
    with_demo = [n for n, _ in sandboxes() if n != "klientiks" and targets.get(n).demo is not None]
    assert sorted(connected) == sorted(with_demo)
    for name, conn in connected.items():
        url = httpx.URL(getattr(conn, targets.get(name).url_key))
        assert (url.host, url.port) == (f"sandbox-{name}", dict(sandboxes())[name])


def test_every_secret_the_config_references_is_mounted_where_it_is_read(spec: dict[str, Any]) -> None:
    text = (ROOT / compose.EXAMPLE_CONFIG).read_text(encoding="utf-8")
    referenced = re.findall(r"\$\{file:/run/secrets/([^}]+)\}", text)
    assert referenced, "the example config references no secret file"
    assert "${" not in re.sub(r"\$\{file:/run/secrets/[^}]+\}", "", text), "only secret files, no env refs"
    declared = spec["secrets"]
    for name in referenced:
        assert name in declared
        for service in [*(r.name for r in roles()), *ONE_SHOT, "relay"]:
            assert name in spec["services"][service]["secrets"], (service, name)
    for name, entry in declared.items():
        assert entry == {"file": f"${{RELAY_COMPOSE_SECRETS:-./{compose.SECRETS_DIR}}}/{name}"}
        value = (ROOT / compose.SECRETS_DIR / name).read_text(encoding="utf-8").strip()
        assert value.endswith("-demo-value-replace-me"), f"{name} must be an obviously-demo value"
    for service in spec["services"].values():
        for name in service.get("secrets", []):
            assert name in declared
    readme = (ROOT / compose.EXAMPLE_DIR / "README.md").read_text(encoding="utf-8")
    assert "demo values" in readme
    assert "Replace them" in readme


def test_the_relay_containers_run_read_only_without_privileges(spec: dict[str, Any]) -> None:
    for name, service in spec["services"].items():
        if name in THIRD_PARTY:
            continue
        assert service["read_only"] is True, name
        assert service["tmpfs"] == ["/tmp"], name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "user" not in service, f"{name}: the image's non-root user, not one set here"


def test_ports_do_not_collide() -> None:
    ports = [r.port for r in roles()] + [p for _, p in sandboxes()]
    assert len(ports) == len(set(ports))
    assert not {compose.PROMETHEUS_PORT, compose.GRAFANA_PORT} & set(ports)


class _NewConnection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str
    name: str
    enabled: bool = True
    events: dict[str, str] | None = None
    rate_limit_per_s: float | None = None
    base_url: str
    api_key: str


def test_a_new_target_reaches_every_compose_file_with_no_hand_edit() -> None:
    spec = targets.TargetSpec(
        name="newvendor",
        title="New Vendor",
        connection=_NewConnection,
        deliverer=lambda source, conn, transport: None,  # type: ignore[arg-type,return-value]
        port=8086,
        sandbox_port=8095,
        sandbox_secret=("--key-file", "newvendor-key"),
        demo=lambda url, key: {"target": "newvendor", "base_url": url, "api_key": key},
    )
    targets.register(spec)
    files = compose.render()
    services = yaml.safe_load(files[compose.COMPOSE_FILE])["services"]
    assert services["newvendor"]["command"][:1] == ["newvendor"]
    assert services["newvendor"]["depends_on"]["sandbox-newvendor"] == {"condition": "service_healthy"}
    assert "newvendor-key" in services["newvendor"]["secrets"]
    assert services["sandbox-newvendor"]["command"][-2:] == ["--key-file", "/run/secrets/newvendor-key"]
    jobs = yaml.safe_load(files[compose.PROMETHEUS_FILE])["scrape_configs"]
    assert {"job_name": "newvendor", "metrics_path": METRICS_PATH} | {
        "static_configs": [{"targets": ["newvendor:8086"]}]
    } in jobs
    config = yaml.safe_load(files[compose.EXAMPLE_CONFIG])
    assert {
        "target": "newvendor",
        "base_url": "http://sandbox-newvendor:8095",
        "api_key": "${file:/run/secrets/newvendor-key}",
    } in config["sources"][0]["connections"]
    assert files[f"{compose.SECRETS_DIR}/newvendor-key"].strip() == compose.demo_secret("newvendor-key")
