"""``relay``: every process role and operator command. The one place that imports more than one service."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from rich.console import Console
from rich.table import Table

from services.common.config import ConfigError, Settings, load_settings
from services.common.events import EventName
from services.common.logging import configure_logging

app = typer.Typer(
    help="klientiks-relay: Klientiks webhooks to Kafka events to Maxma, CPA.House, Weeek, Plarin.",
    no_args_is_help=True,
)
ingest_app = typer.Typer(help="The ingest service roles.", no_args_is_help=True)
sandbox_app = typer.Typer(help="Fake target APIs for the local run, demos and tests.", no_args_is_help=True)
db_app = typer.Typer(help="The ledger database.", no_args_is_help=True)
config_app = typer.Typer(help="The configuration file.", no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")
app.add_typer(sandbox_app, name="sandbox")
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")

console = Console()
err = Console(stderr=True)

HostOpt = Annotated[str, typer.Option(help="Interface to listen on.")]
PortOpt = Annotated[int, typer.Option(help="HTTP port (webhooks, /metrics, /healthz, /readyz).")]


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _serve(asgi: Any, host: str, port: int) -> None:
    # No access log: request lines carry the source token and personal data in the URL.
    uvicorn.run(
        asgi,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=20,
    )


@ingest_app.command("api")
def ingest_api(host: HostOpt = "0.0.0.0", port: PortOpt = 8080) -> None:  # noqa: S104
    """Receive webhooks and publish them to klientiks.inbox.v1."""
    from services.ingest.api import create_api

    _serve(create_api(_settings()), host, port)


@ingest_app.command("normalizer")
def ingest_normalizer(host: HostOpt = "0.0.0.0", port: PortOpt = 8081) -> None:  # noqa: S104
    """Turn inbox records into typed events on klientiks.events.v1."""
    from services.ingest.normalizer import create_normalizer

    _serve(create_normalizer(_settings()), host, port)


@app.command("maxma")
def maxma(
    host: HostOpt = "0.0.0.0",  # noqa: S104
    port: PortOpt = 8082,
    migrate: Annotated[
        bool, typer.Option(help="Apply ledger migrations at start (embedded SQLite).")
    ] = False,
) -> None:
    """Deliver events to Maxma."""
    from services.maxma.app import create_app

    try:
        asgi = create_app(_settings(), migrate=migrate)
    except ConfigError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    _serve(asgi, host, port)


@sandbox_app.command("maxma")
def sandbox_maxma(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8090,
    key_file: Annotated[Path | None, typer.Option(help="File holding the accepted X-Processing-Key.")] = None,
) -> None:
    """A fake Maxma API that answers like the real one and can be told to fail."""
    from services.sandbox.maxma import create_maxma_app

    configure_logging()
    keys = {key_file.read_text().strip()} if key_file else None
    _serve(create_maxma_app(processing_keys=keys), host, port)


@app.command("broker")
def broker(port: Annotated[int, typer.Option(help="Kafka port.")] = 9092) -> None:
    """Run the embedded Tansu broker in the foreground (memory storage: a restart loses everything)."""
    from services.common.embedded import EmbeddedBroker

    with EmbeddedBroker(port=port).start() as b:
        console.print(f"Kafka-protocol broker on {b.bootstrap_servers} (pid {b.pid}); Ctrl-C stops it")
        try:
            while b.is_alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply the ledger's Alembic migrations to RELAY_DATABASE_URL."""
    from services.common.ledger import migrate

    asyncio.run(migrate(_settings().database_url))
    console.print("ledger is up to date")


@config_app.command("check")
def config_check() -> None:
    """Validate RELAY_CONFIG, including every connection's target-specific keys."""
    from services.common.config import target_connections
    from services.maxma.settings import MaxmaConnection

    settings = _settings()
    try:
        list(target_connections(settings, "maxma", MaxmaConnection))
    except ConfigError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    conns = sum(len(s.connections) for s in settings.sources)
    console.print(f"ok: {len(settings.sources)} source(s), {conns} connection(s)")


@app.command("token")
def token() -> None:
    """Print a new random source token."""
    console.print(secrets.token_urlsafe(24))


@app.command("urls")
def urls(
    base_url: Annotated[
        str, typer.Option(help="Public base URL of the ingest API.")
    ] = "http://127.0.0.1:8080",
    source: Annotated[str | None, typer.Option(help="Source name (default: every source).")] = None,
) -> None:
    """Print the URL to paste into Klientiks for every event of a source."""
    settings = _settings()
    chosen = [settings.source(source)] if source else settings.sources
    for s in chosen:
        _print_urls(base_url, s.name, s.token.get_secret_value())


def _print_urls(base_url: str, source: str, token: str) -> None:
    from services.ingest.templates import TITLES, webhook_url

    console.print(f"[bold]Webhook URLs of source {source}[/bold] (Klientiks → Настройки → События-webhook):")
    for event in EventName:
        console.print(
            f"  [cyan]{TITLES[event]}[/cyan]\n    {webhook_url(base_url, token, event)}", soft_wrap=True
        )


# ---------------------------------------------------------------------------------------------- local run


STATE = Path(".relay")
ROLES: list[tuple[str, list[str], int]] = [
    ("sandbox-maxma", ["sandbox", "maxma"], 8090),
    ("ingest-api", ["ingest", "api"], 8080),
    ("normalizer", ["ingest", "normalizer"], 8081),
    ("maxma", ["maxma"], 8082),
]


def _demo_config(state: Path, sandbox_url: str) -> Path:
    """Write the embedded demo config once; its secrets live in files beside it, never in the YAML."""
    secrets_dir = state / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    for name in ("demo-token", "maxma-key"):
        f = secrets_dir / name
        if not f.exists():
            f.write_text(secrets.token_urlsafe(24))
            f.chmod(0o600)
    path = state / "demo.yaml"
    path.write_text(
        "# Written by `relay run`: one demo salon delivering to the sandbox Maxma.\n"
        "sources:\n"
        "  - name: demo-salon\n"
        "    token: ${file:secrets/demo-token}\n"
        "    timezone: Europe/Moscow\n"
        "    phone_region: RU\n"
        "    connections:\n"
        "      - target: maxma\n"
        f"        base_url: {sandbox_url}\n"
        "        processing_key: ${file:secrets/maxma-key}\n"
        "        events:\n"
        "          client-created: new-client\n"
    )
    return path


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code in (200, 204):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout:.0f} s ({url})")


def _spawn(args: Sequence[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    from services.common.embedded import pdeathsig_preexec

    out = log_file.open("ab")
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
        [sys.executable, "-m", "services.cli", *args],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        preexec_fn=pdeathsig_preexec(),  # the children must not outlive `relay run`
    )


@app.command("run")
def run(
    demo: Annotated[bool, typer.Option(help="Send a few sample webhooks once everything is up.")] = False,
    kafka_port: Annotated[int, typer.Option(help="Port of the embedded broker.")] = 9092,
) -> None:
    """Start everything on the embedded defaults and show deliveries as they happen."""
    from services.common.embedded import EmbeddedBroker

    STATE.mkdir(exist_ok=True)
    (STATE / "logs").mkdir(exist_ok=True)
    sandbox_port = next(p for name, _, p in ROLES if name == "sandbox-maxma")
    config = (
        Path(os.environ["RELAY_CONFIG"])
        if os.environ.get("RELAY_CONFIG")
        else _demo_config(STATE, f"http://127.0.0.1:{sandbox_port}")
    )
    env = dict(os.environ)
    env.update(RELAY_CONFIG=str(config.resolve()), RELAY_LOG_FORMAT="json")
    env.setdefault("RELAY_DATABASE_URL", f"sqlite+aiosqlite:///{(STATE / 'relay.db').resolve()}")
    broker_proc = None
    if "RELAY_KAFKA__BOOTSTRAP_SERVERS" not in env:
        broker_proc = EmbeddedBroker(port=kafka_port).start()
        env["RELAY_KAFKA__BOOTSTRAP_SERVERS"] = broker_proc.bootstrap_servers
        env["RELAY_KAFKA__ENABLE_IDEMPOTENCE"] = "false"  # Tansu has no idempotent producer
    os.environ.update(env)
    settings = _settings()

    from services.common.ledger import migrate

    asyncio.run(migrate(settings.database_url))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, args, port in ROLES:
            extra = ["--key-file", str(STATE / "secrets" / "maxma-key")] if name == "sandbox-maxma" else []
            procs[name] = _spawn(
                [*args, "--port", str(port), "--host", "127.0.0.1", *extra],
                env,
                STATE / "logs" / f"{name}.log",
            )
        for name, _, port in ROLES:
            probe = "/_sandbox/clients" if name == "sandbox-maxma" else "/readyz"
            try:
                _wait_ready(f"http://127.0.0.1:{port}{probe}", procs[name])
            except RuntimeError as e:
                err.print(f"[red]{name} did not start: {e}; see {STATE / 'logs' / (name + '.log')}[/red]")
                raise typer.Exit(1) from None
        console.print(
            f"[green]klientiks-relay is running[/green] (Kafka {env['RELAY_KAFKA__BOOTSTRAP_SERVERS']}, "
            f"ledger {settings.database_url}, logs in {STATE / 'logs'})"
        )
        for s in settings.sources:
            _print_urls("http://127.0.0.1:8080", s.name, s.token.get_secret_value())
        if settings.sources:
            s0 = settings.sources[0]
            console.print('\nTry it (a seed-style "Добавление клиента" webhook):')
            console.print(
                f"  curl -G 'http://127.0.0.1:8080/hooks/klientiks/{s0.token.get_secret_value()}/client-created' "
                "--data-urlencode client_id=1001 --data-urlencode client_phone=79991234567 "
                "--data-urlencode 'client_name=Иванова Анна Сергеевна' --data-urlencode client_first_name=Анна "
                "--data-urlencode client_second_name=Иванова --data-urlencode client_email=anna@example.ru",
                soft_wrap=True,
            )
            console.print(f"  curl http://127.0.0.1:{sandbox_port}/_sandbox/clients\n")
        if demo and settings.sources:
            _send_demo("http://127.0.0.1:8080", settings.sources[0].token.get_secret_value(), 5)
        asyncio.run(_live_view(settings.database_url, procs))
    except KeyboardInterrupt:
        pass
    finally:
        _stop(procs)
        if broker_proc is not None:
            broker_proc.stop()
        console.print("stopped")


def _stop(procs: dict[str, subprocess.Popen[bytes]]) -> None:
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 25
    for p in procs.values():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


async def _live_view(database_url: str, procs: dict[str, subprocess.Popen[bytes]]) -> None:
    from services.common.ledger import Ledger

    ledger = Ledger.from_url(database_url)
    since = datetime.now(UTC)
    console.print("[bold]Deliveries[/bold] (Ctrl-C stops everything):")
    try:
        while True:
            for name, p in procs.items():
                if p.poll() is not None:
                    err.print(
                        f"[red]{name} exited with status {p.returncode}; see .relay/logs/{name}.log[/red]"
                    )
                    return
            for d in await ledger.recent(since):
                since = max(since, d.updated_at)
                colour = {"delivered": "green", "failed": "red"}.get(d.status.value, "yellow")
                code = f" code {d.vendor_code}" if d.vendor_code else ""
                note = f" ({d.error})" if d.error else ""
                console.print(
                    f"{d.updated_at:%H:%M:%S} [{colour}]{d.status.value:<9}[/{colour}] {d.target}/{d.action} "
                    f"event {d.event_id} source {d.source} attempts {d.attempts}{code}{note}"
                )
            await asyncio.sleep(0.3)
    finally:
        await ledger.close()


def _send_demo(base_url: str, token: str, count: int) -> None:
    from services.sandbox.samples import client_params, query

    table = Table("client_id", "HTTP", "event_id")
    with httpx.Client(timeout=10) as client:
        for i in range(count):
            params = client_params(int(time.time()) % 100_000 * 10 + i)
            r = client.get(f"{base_url}/hooks/klientiks/{token}/client-created?{query(params)}")
            table.add_row(params["client_id"], str(r.status_code), r.json().get("event_id", r.text))
    console.print(table)


@app.command("demo")
def demo(
    base_url: Annotated[
        str, typer.Option(help="Base URL of the running ingest API.")
    ] = "http://127.0.0.1:8080",
    count: Annotated[int, typer.Option(help="How many client-created webhooks.")] = 5,
) -> None:
    """Send sample "Добавление клиента" webhooks to a running `relay run`."""
    settings = _settings() if os.environ.get("RELAY_CONFIG") else None
    if settings is None:
        demo_cfg = STATE / "demo.yaml"
        if not demo_cfg.exists():
            err.print("[red]no RELAY_CONFIG and no .relay/demo.yaml: start `relay run` first[/red]")
            raise typer.Exit(2)
        settings = load_settings(demo_cfg)
    _send_demo(base_url, settings.sources[0].token.get_secret_value(), count)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
