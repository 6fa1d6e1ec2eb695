"""``relay``: every process role and operator command. The one place that imports more than one service."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import httpx
import typer
import uvicorn
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from services.common.config import ConfigError, Settings, load_settings
from services.common.display import safe_text
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
MigrateOpt = Annotated[bool, typer.Option(help="Apply ledger migrations at start (embedded SQLite).")]


def _settings() -> Settings:
    try:
        settings = load_settings()
    except ConfigError as e:
        err.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _serve(asgi: Any, host: str, port: int, **options: Any) -> None:
    """Serve ``asgi`` with uvicorn; ``options`` are more uvicorn keywords (the ingest API's limits)."""
    # No access log: request lines carry the source token and personal data in the URL.
    uvicorn.run(
        asgi,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=20,
        **options,
    )


@ingest_app.command("api")
def ingest_api(
    host: HostOpt = "0.0.0.0",  # noqa: S104
    port: PortOpt = 8080,
    migrate: MigrateOpt = False,
) -> None:
    """Receive webhooks and publish them to klientiks.inbox.v1 (spooled in the ledger while Kafka is down)."""
    from services.ingest.api import create_api
    from services.ingest.server import uvicorn_options

    settings = _settings()
    _serve(create_api(settings, migrate=migrate), host, port, **uvicorn_options(settings.ingest))


@ingest_app.command("normalizer")
def ingest_normalizer(
    host: HostOpt = "0.0.0.0",  # noqa: S104
    port: PortOpt = 8081,
    migrate: MigrateOpt = False,
) -> None:
    """Turn inbox records into typed events on klientiks.events.v1."""
    from services.ingest.normalizer import create_normalizer

    _serve(create_normalizer(_settings(), migrate=migrate), host, port)


@app.command("maxma")
def maxma(
    host: HostOpt = "0.0.0.0",  # noqa: S104
    port: PortOpt = 8082,
    migrate: MigrateOpt = False,
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


@sandbox_app.command("klientiks")
def sandbox_klientiks(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8091,
    token_file: Annotated[Path | None, typer.Option(help="File holding the accepted access token.")] = None,
    account_id: Annotated[str, typer.Option(help="Accepted account_id.")] = "21947",
    user_id: Annotated[str, typer.Option(help="Accepted user_id.")] = "113421",
    seed: Annotated[int, typer.Option(help="Seed of the generated clients and visits.")] = 1,
) -> None:
    """A fake Klientiks REST API (visits, clients) that answers like the real one and can be told to fail."""
    from services.sandbox.klientiks import DEFAULT_ACCOUNT, SandboxAccount, create_klientiks_sandbox

    configure_logging()
    token = token_file.read_text().strip() if token_file else DEFAULT_ACCOUNT.access_token
    account = SandboxAccount(account_id, user_id, token)
    _serve(create_klientiks_sandbox([account], seed=seed), host, port)


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


class _NoAliases(yaml.SafeDumper):
    """Repeated parts written out in full: a published document should read without YAML anchors."""

    def ignore_aliases(self, data: object) -> bool:
        return True


@app.command("docs")
def docs(out: Annotated[Path, typer.Option(help="Folder to write into.")] = Path("docs")) -> None:
    """Write the contract generated from the code: JSON Schemas, AsyncAPI, OpenAPI."""
    import json

    from services.common.config import Settings
    from services.common.contract import asyncapi_document, cloudevent_schema, event_data_schema
    from services.ingest.api import create_api

    (out / "schemas").mkdir(parents=True, exist_ok=True)
    files = {
        out / "schemas" / "event-data.v1.json": json.dumps(event_data_schema(), indent=2, ensure_ascii=False),
        out / "schemas" / "cloudevent.v1.json": json.dumps(cloudevent_schema(), indent=2, ensure_ascii=False),
        out / "openapi.json": json.dumps(create_api(Settings()).openapi(), indent=2, ensure_ascii=False),
        out / "asyncapi.yaml": yaml.dump(
            asyncapi_document(), Dumper=_NoAliases, sort_keys=False, allow_unicode=True
        ),
    }
    for path, text in files.items():
        path.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        console.print(f"wrote {path}")


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
    ("sandbox-klientiks", ["sandbox", "klientiks"], 8091),
    ("ingest-api", ["ingest", "api"], 8080),
    ("normalizer", ["ingest", "normalizer"], 8081),
    ("maxma", ["maxma"], 8082),
]


if TYPE_CHECKING:
    from services.common.embedded import EmbeddedBroker
    from services.common.supervisor import Process, Supervisor


def _demo_config(state: Path, sandbox_url: str, klientiks_url: str) -> Path:
    """Write the embedded demo config once; its secrets live in files beside it, never in the YAML."""
    from services.common.embedded import private_secret

    for name in ("demo-token", "maxma-key", "klientiks-token"):
        private_secret(state / "secrets" / name)
    private_secret(state / "secrets" / "phone-hash-key", 32)
    path = state / "demo.yaml"
    path.write_text(
        "# Written by `relay run`: one demo salon, thin webhooks completed from the sandbox Klientiks API,\n"
        "# delivering to the sandbox Maxma.\n"
        "phone_hash_key: ${file:secrets/phone-hash-key}\n"
        "sources:\n"
        "  - name: demo-salon\n"
        "    token: ${file:secrets/demo-token}\n"
        "    timezone: Europe/Moscow\n"
        "    phone_region: RU\n"
        "    klientiks:\n"
        "      account_id: '21947'\n"
        "      user_id: '113421'\n"
        "      access_token: ${file:secrets/klientiks-token}\n"
        f"      base_url: {klientiks_url}/clientix/Restapi\n"
        "    connections:\n"
        "      - target: maxma\n"
        f"        base_url: {sandbox_url}\n"
        "        processing_key: ${file:secrets/maxma-key}\n"
        "        events:\n"
        "          client-created: new-client\n"
    )
    return path


def _wait_ready(url: str, proc: Process, timeout: float = 30.0) -> None:
    from services.common.supervisor import describe_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = proc.poll()
        if status is not None:
            raise RuntimeError(f"exited ({describe_status(status)})")
        try:
            if httpx.get(url, timeout=1).status_code in (200, 204):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"not ready after {timeout:.0f} s ({url})")


def _spawn(args: Sequence[str], env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    from services.common.embedded import pdeathsig_preexec

    with log_file.open("ab") as out:
        return subprocess.Popen(  # noqa: S603 - our own interpreter and module, no shell
            [sys.executable, "-m", "services.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pdeathsig_preexec(),  # the children must not outlive `relay run`
            # A terminal's Ctrl-C reaches `relay run` only, which stops the roles in order (and not
            # a role that dies of it and is restarted before `relay run` has noticed the Ctrl-C).
            start_new_session=True,
        )


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt


@app.command("run")
def run(
    demo: Annotated[bool, typer.Option(help="Send a few sample webhooks once everything is up.")] = False,
    kafka_port: Annotated[int, typer.Option(help="Port of the embedded broker.")] = 9092,
    port_offset: Annotated[
        int, typer.Option(help="Added to every HTTP port (ingest 8080, sandbox Maxma 8090, ...).")
    ] = 0,
) -> None:
    """Start everything on the embedded defaults, restart a role that dies, show deliveries as they happen."""
    from services.common.embedded import EmbeddedBroker, private_secret
    from services.common.supervisor import Supervisor

    # SIGTERM stops everything as Ctrl-C does; by default it would end `relay run` and SIGKILL the roles.
    signal.signal(signal.SIGTERM, _interrupted)
    # The ledger, the secrets and the logs hold personal data and credentials.
    STATE.mkdir(mode=0o700, exist_ok=True)
    STATE.chmod(0o700)
    (STATE / "logs").mkdir(exist_ok=True)
    ports = {name: port + port_offset for name, _, port in ROLES}
    ingest_url = f"http://127.0.0.1:{ports['ingest-api']}"
    sandbox_url = f"http://127.0.0.1:{ports['sandbox-maxma']}"
    config = (
        Path(os.environ["RELAY_CONFIG"])
        if os.environ.get("RELAY_CONFIG")
        else _demo_config(STATE, sandbox_url, f"http://127.0.0.1:{ports['sandbox-klientiks']}")
    )
    env = dict(os.environ)
    env.update(RELAY_CONFIG=str(config.resolve()), RELAY_LOG_FORMAT="json")
    db = (STATE / "relay.db").resolve()
    env.setdefault("RELAY_DATABASE_URL", f"sqlite+aiosqlite:///{db}")
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if f.exists():
            f.chmod(0o600)  # made 0644 by earlier versions; the ledger creates new files 0600
    broker_proc = None
    if "RELAY_KAFKA__BOOTSTRAP_SERVERS" not in env:
        broker_proc = EmbeddedBroker(port=kafka_port).start()
        env["RELAY_KAFKA__BOOTSTRAP_SERVERS"] = broker_proc.bootstrap_servers
        env["RELAY_KAFKA__ENABLE_IDEMPOTENCE"] = "false"  # Tansu has no idempotent producer
    os.environ.update(env)
    settings = _settings()
    if settings.phone_hash_key is None:
        # One's own config without a key still gets a phone index: a key kept with the other local secrets.
        key_file = STATE / "secrets" / "phone-hash-key"
        env["RELAY_PHONE_HASH_KEY"] = os.environ["RELAY_PHONE_HASH_KEY"] = private_secret(key_file, 32)
        settings = _settings()
        console.print(
            f"{config} sets no phone_hash_key: this run uses the one in {key_file} "
            "(give it as RELAY_PHONE_HASH_KEY to `relay events find --phone`)"
        )

    from services.common.ledger import migrate

    asyncio.run(migrate(settings.database_url))
    logs = {name: STATE / "logs" / f"{name}.log" for name, _, _ in ROLES}
    # The demo config's credentials; with one's own config (and no demo run before), the sandboxes' defaults.
    extra = {
        name: [option, str(f)]
        for name, option, f in (
            ("sandbox-maxma", "--key-file", STATE / "secrets" / "maxma-key"),
            ("sandbox-klientiks", "--token-file", STATE / "secrets" / "klientiks-token"),
        )
        if f.exists()
    }

    def spawner(name: str, args: list[str]) -> Callable[[], subprocess.Popen[bytes]]:
        argv = [*args, "--port", str(ports[name]), "--host", "127.0.0.1", *extra.get(name, [])]
        return lambda: _spawn(argv, env, logs[name])

    supervisor = Supervisor(
        {name: spawner(name, args) for name, args, _ in ROLES}, logs=logs, pid_dir=STATE / "pids"
    )
    code = 0
    try:
        supervisor.start()
        procs = supervisor.procs
        for name, _, _ in ROLES:
            probe = "/_sandbox/clients" if name.startswith("sandbox-") else "/readyz"
            try:
                _wait_ready(f"http://127.0.0.1:{ports[name]}{probe}", procs[name])
            except RuntimeError as e:
                # At start a role that cannot come up is a problem to fix, not one to retry forever.
                err.print(f"[red]{name} did not start: {e}; see {logs[name]}[/red]")
                raise typer.Exit(1) from None
        console.print(
            f"[green]klientiks-relay is running[/green] (Kafka {env['RELAY_KAFKA__BOOTSTRAP_SERVERS']}, "
            f"ledger {settings.database_url}, logs in {STATE / 'logs'}, pids in {STATE / 'pids'})"
        )
        if broker_proc is not None:
            console.print(
                "[yellow]The embedded broker keeps everything in memory: stopping `relay run` loses "
                "what is not delivered yet. For local use only.[/yellow]"
            )
        for s in settings.sources:
            _print_urls(ingest_url, s.name, s.token.get_secret_value())
        if settings.sources:
            s0 = settings.sources[0]
            console.print('\nTry it (a seed-style "Добавление клиента" webhook):')
            console.print(
                f"  curl -G '{ingest_url}/hooks/klientiks/{s0.token.get_secret_value()}/client-created' "
                "--data-urlencode client_id=1001 --data-urlencode client_phone=79991234567 "
                "--data-urlencode 'client_name=Иванова Анна Сергеевна' --data-urlencode client_first_name=Анна "
                "--data-urlencode client_second_name=Иванова --data-urlencode client_email=anna@example.ru",
                soft_wrap=True,
            )
            console.print(f"  curl {sandbox_url}/_sandbox/clients\n")
        if demo and settings.sources:
            _send_demo(ingest_url, settings.sources[0].token.get_secret_value(), 5)
        code = asyncio.run(_live_view(settings.database_url, supervisor, broker_proc))
    except KeyboardInterrupt:
        pass
    finally:
        _stop(supervisor, broker_proc)
    if code:
        raise typer.Exit(code)


def _stop(supervisor: Supervisor, broker: EmbeddedBroker | None) -> None:
    """The roles first (they finish what is on the wire and commit), then the broker they use."""
    console.print("stopping (Ctrl-C again kills everything at once)")
    supervisor.stop()
    if broker is not None:
        broker.stop()
    console.print("stopped")


async def _live_view(database_url: str, supervisor: Supervisor, broker: EmbeddedBroker | None) -> int:
    """Deliveries and restarts as they happen, until Ctrl-C (0) or the embedded broker's death (1)."""
    from rich.markup import escape

    from services.common.display import safe_text
    from services.common.ledger import Ledger
    from services.common.supervisor import Exited, Restarted, describe_status

    ledger = Ledger.from_url(database_url)
    since = datetime.now(UTC)
    console.print("[bold]Deliveries[/bold] (Ctrl-C stops everything):")
    try:
        while True:
            for ev in supervisor.poll():
                at = f"{datetime.now(UTC):%H:%M:%S}"
                if isinstance(ev, Exited):
                    console.print(
                        f"{at} [red]{ev.role} exited ({describe_status(ev.status)})[/red], "
                        f"restart {ev.attempt} in {ev.delay_s:g} s; see {escape(str(ev.log))}"
                    )
                elif isinstance(ev, Restarted):
                    console.print(
                        f"{at} [yellow]{ev.role} restarted[/yellow] (restart {ev.attempt}, pid {ev.pid})"
                    )
                else:
                    console.print(
                        f"{at} [red]{ev.role} could not be started: {escape(ev.error)}[/red], restart "
                        f"{ev.attempt} in {ev.delay_s:g} s"
                    )
            if broker is not None and not broker.is_alive():
                err.print(
                    "[red]The embedded Kafka broker exited. It kept everything in memory, so that is lost: "
                    "webhooks answered 202 but not delivered yet, the topics, the consumer offsets. Stopping "
                    "everything; start `relay run` again.[/red]"
                )
                return 1
            for d in await ledger.recent(since):
                since = max(since, d.updated_at)
                colour = {"delivered": "green", "failed": "red"}.get(d.status.value, "yellow")
                # A vendor's code and message are text from outside: no markup, no terminal escapes.
                code = f" code {escape(safe_text(d.vendor_code))}" if d.vendor_code else ""
                note = f" ({escape(safe_text(d.error))})" if d.error else ""
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


# ---------------------------------------------------------------------------------------------- operations

if TYPE_CHECKING:
    from services.common.ledger import Delivery, EventRecord, Ledger
    from services.common.ops import DeadLetter, DlqFilter, Quarantined, QuarantineFilter

dlq_app = typer.Typer(help="Dead letters: deliveries given up on, and replaying them.", no_args_is_help=True)
events_app = typer.Typer(help="The event history kept in the ledger.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
app.add_typer(events_app, name="events")
quarantine_app = typer.Typer(
    help="Inbox records the normalizer could not turn into events, and replaying them.",
    no_args_is_help=True,
)
app.add_typer(quarantine_app, name="quarantine")

_MAX_LIMIT = 1_000_000
_MAX_TIMEOUT = 3600.0
_Text = TypeVar("_Text", str | None, list[str] | None)


def _utf8(value: _Text) -> _Text:
    """Option callback: reject text that is not UTF-8 (argv bytes that decode to lone surrogates).

    Such text cannot be in the ledger or match a record, and the database drivers fail on it.
    """
    for text in [value] if isinstance(value, str) else value or []:
        try:
            text.encode()
        except UnicodeEncodeError:
            raise typer.BadParameter(f"{safe_text(text)} is not UTF-8 text") from None
    return value


def _seconds(value: float) -> float:
    """Option callback for --timeout: click's FloatRange lets nan through, and inf or 0 can never work."""
    if not (math.isfinite(value) and 0 < value <= _MAX_TIMEOUT):
        raise typer.BadParameter(f"{value} is not a number of seconds above 0 and at most {_MAX_TIMEOUT:g}")
    return value


TargetsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        help="A target whose DLQ to read; repeat for more (default: every target).",
        callback=_utf8,
    ),
]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        help="Last attempt at or after: an ISO time (UTC without an offset) or an age: 30m, 1h, 2d."
    ),
]
UntilOpt = Annotated[str | None, typer.Option(help="Last attempt before: an ISO time or an age, as --since.")]
EventIdOpt = Annotated[str | None, typer.Option("--event-id", help="Only this event.", callback=_utf8)]
ReasonOpt = Annotated[
    str | None, typer.Option(help="Only reasons containing this text (any case).", callback=_utf8)
]
LimitOpt = Annotated[int, typer.Option(min=1, max=_MAX_LIMIT, help="Show at most this many, newest first.")]
ReadTimeoutOpt = Annotated[
    float, typer.Option(help="Seconds allowed to read the DLQ topics (at most 3600).", callback=_seconds)
]


def _utc(t: datetime) -> str:
    return f"{t.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def _cell(value: object) -> Text:
    # Text, not a str: rich would read "[...]" in vendor messages and masks as markup. Escaped, as it may
    # hold a webhook's escape sequences.
    return Text("" if value is None else safe_text(str(value)))


def _why(e: BaseException) -> str:
    # A TimeoutError says nothing in str(e).
    return safe_text(str(e) or type(e).__name__)


def _dlq_filter(
    targets: list[str] | None, since: str | None, until: str | None, event_id: str | None, reason: str | None
) -> DlqFilter:
    from services.common.config import TARGETS
    from services.common.ops import DlqFilter, parse_when

    unknown = sorted(set(targets or ()) - set(TARGETS))
    if unknown:
        names = ", ".join(safe_text(t) for t in unknown)
        raise typer.BadParameter(f"unknown target {names}; use one of {', '.join(TARGETS)}")
    times: dict[str, datetime | None] = {}
    for name, value in (("--since", since), ("--until", until)):
        try:
            times[name] = parse_when(value) if value else None
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=name) from None
    return DlqFilter(
        targets=tuple(dict.fromkeys(targets or TARGETS)),
        since=times["--since"],
        until=times["--until"],
        event_id=event_id,
        reason=reason,
    )


def _read_dead_letters(settings: Settings, flt: DlqFilter, timeout: float) -> list[DeadLetter]:
    from aiokafka.errors import KafkaError

    from services.common.ops import read_dlq

    try:
        return asyncio.run(read_dlq(settings.kafka.bootstrap_servers, flt.targets, flt, timeout=timeout))
    except (TimeoutError, KafkaError, OSError) as e:
        err.print(
            Text(
                f"cannot read the DLQ topics from {safe_text(settings.kafka.bootstrap_servers)}: {_why(e)}; "
                "fix: check RELAY_KAFKA__BOOTSTRAP_SERVERS, or raise --timeout",
                style="red",
            )
        )
        raise typer.Exit(1) from None


def _dlq_table(dead_letters: Sequence[DeadLetter]) -> Table:
    from services.common.ops import mask_text

    table = Table(
        "Last attempt (UTC)", "Target", "Connection", "Action", "Event id", "Class", "HTTP",
        "Vendor code", "Attempts", "Reason",
    )  # fmt: skip
    for c in table.columns:
        c.overflow = "fold"  # never cut an event id short: it is what you copy into other commands
    for dl in dead_letters:
        table.add_row(
            _cell(_utc(dl.last_attempt_at)), _cell(dl.target), _cell(dl.conn_id), _cell(dl.action),
            _cell(dl.event_id), _cell(dl.class_), _cell(dl.http_status), _cell(dl.vendor_code),
            _cell(dl.attempts), _cell(mask_text(dl.reason)),
        )  # fmt: skip
    return table


def _per_target(dead_letters: Sequence[DeadLetter]) -> str:
    counts: dict[str, int] = {}
    for dl in dead_letters:
        counts[dl.target] = counts.get(dl.target, 0) + 1
    return ", ".join(f"{safe_text(t)} {n}" for t, n in sorted(counts.items()))


@dlq_app.command("list")
def dlq_list(
    target: TargetsOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    event_id: EventIdOpt = None,
    reason: ReasonOpt = None,
    limit: LimitOpt = 50,
    timeout: ReadTimeoutOpt = 30.0,
) -> None:
    """List dead letters, newest first (reasons are shown with personal data masked)."""
    flt = _dlq_filter(target, since, until, event_id, reason)
    found = _read_dead_letters(_settings(), flt, timeout)
    if not found:
        console.print("no dead letters match")
        return
    newest = sorted(found, key=lambda d: d.last_attempt_at, reverse=True)[:limit]
    console.print(_dlq_table(newest))
    shown = f", showing the newest {len(newest)}" if len(newest) < len(found) else ""
    # Text, not markup: the counts name what the records say.
    console.print(Text(f"{len(found)} dead letter(s) match ({_per_target(found)}){shown}"))


@dlq_app.command("replay")
def dlq_replay(
    target: TargetsOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    event_id: EventIdOpt = None,
    reason: ReasonOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be replayed; publish nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    timeout: ReadTimeoutOpt = 30.0,
) -> None:
    """Publish matching dead letters' events again, each aimed at the one delivery that failed.

    Safe to repeat: a delivery that has since succeeded is not made twice (the ledger keeps it delivered).
    """
    from services.common.kafka import EVENTS
    from services.common.ops import replay

    settings = _settings()
    flt = _dlq_filter(target, since, until, event_id, reason)
    found = _read_dead_letters(settings, flt, timeout)
    if not found:
        console.print("no dead letters match; nothing to replay")
        return
    console.print(Text(f"{len(found)} dead letter(s) match ({_per_target(found)})"))
    if dry_run:
        console.print(_dlq_table(sorted(found, key=lambda d: d.last_attempt_at)))
        console.print(f"dry run: {len(found)} would be replayed to {EVENTS}; nothing was published")
        return
    if not yes:
        typer.confirm(f"Replay {len(found)} dead letter(s) to {EVENTS}?", abort=True)
    count = _replay_with_progress(
        settings,
        len(found),
        lambda bootstrap, on_progress, config: replay(
            bootstrap, found, on_progress=on_progress, producer_config=config
        ),
        "delivered events are not delivered twice",
    )
    console.print(
        Text(
            f"replayed {count} dead letter(s) to {EVENTS} ({_per_target(found)}); the delivery services "
            "retry them now. The dead letters stay in their DLQ topics: narrow a later replay with --since."
        )
    )


def _replay_with_progress(
    settings: Settings,
    total: int,
    run: Callable[[str, Callable[[int], None], dict[str, Any]], Coroutine[Any, Any, int]],
    why_safe: str,
) -> int:
    """Run one replay under a progress bar; on a broker error say how far it got and exit 1."""
    from aiokafka.errors import KafkaError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # Idempotence stays off: Tansu cannot do it, and a duplicate replay is harmless (event ids dedupe).
    config: dict[str, Any] = {
        "client_id": f"{settings.kafka.client_id}-replay",
        "request_timeout_ms": settings.kafka.request_timeout_ms,
    }
    done = 0
    with Progress(
        TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        task = progress.add_task("replay", total=total)

        def progress_to(n: int) -> None:
            nonlocal done
            done = n
            progress.update(task, completed=n)

        try:
            return asyncio.run(run(settings.kafka.bootstrap_servers, progress_to, config))
        except (TimeoutError, KafkaError, OSError) as e:
            progress.stop()
            err.print(
                Text(
                    f"replay stopped after {done} of {total}: {_why(e)}; "
                    f"running the same command again is safe ({why_safe})",
                    style="red",
                )
            )
            raise typer.Exit(1) from None


QReasonOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--reason",
        help="Only this reason code (no_id, bad_body, unknown_source, ...); repeat for more.",
        callback=_utf8,
    ),
]
QSourceOpt = Annotated[
    list[str] | None, typer.Option("--source", help="Only this source; repeat for more.", callback=_utf8)
]
QEventOpt = Annotated[
    list[str] | None,
    typer.Option("--event", help="Only this webhook (client-created, ...); repeat for more.", callback=_utf8),
]
QSinceOpt = Annotated[
    str | None,
    typer.Option(help="Received at or after: an ISO time (UTC without an offset) or an age: 30m, 1h, 2d."),
]
QUntilOpt = Annotated[str | None, typer.Option(help="Received before: an ISO time or an age, as --since.")]
QReadTimeoutOpt = Annotated[
    float,
    typer.Option(help="Seconds allowed to read the quarantine topic (at most 3600).", callback=_seconds),
]


def _quarantine_filter(
    reason: list[str] | None,
    source: list[str] | None,
    event: list[str] | None,
    since: str | None,
    until: str | None,
    event_id: str | None,
) -> QuarantineFilter:
    from services.common.ops import QuarantineFilter, parse_when

    times: dict[str, datetime | None] = {}
    for name, value in (("--since", since), ("--until", until)):
        try:
            times[name] = parse_when(value) if value else None
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=name) from None
    return QuarantineFilter(
        reasons=tuple(reason or ()),
        sources=tuple(source or ()),
        events=tuple(event or ()),
        since=times["--since"],
        until=times["--until"],
        event_id=event_id,
    )


def _read_quarantined(settings: Settings, flt: QuarantineFilter, timeout: float) -> list[Quarantined]:
    from aiokafka.errors import KafkaError

    from services.common.kafka import QUARANTINE
    from services.common.ops import read_quarantine

    try:
        return asyncio.run(read_quarantine(settings.kafka.bootstrap_servers, flt, timeout=timeout))
    except (TimeoutError, KafkaError, OSError) as e:
        err.print(
            Text(
                f"cannot read {QUARANTINE} from {safe_text(settings.kafka.bootstrap_servers)}: {_why(e)}; "
                "fix: check RELAY_KAFKA__BOOTSTRAP_SERVERS, or raise --timeout",
                style="red",
            )
        )
        raise typer.Exit(1) from None


def _quarantine_table(records: Sequence[Quarantined], params: bool = False) -> Table:
    from services.common.ops import mask_text, quarantine_params

    columns = ["Received (UTC)", "Source", "Webhook", "Event id", "Reason", "Detail"]
    table = Table(*columns, *(["Parameters"] if params else []))
    for c in table.columns:
        c.overflow = "fold"
    for q in records:
        # Everything read from the record is masked: a bad_record may carry personal data in any field.
        row = [
            _cell(_utc(q.received_at)),
            *(_cell(mask_text(v)) for v in (q.source, q.event, q.event_id, q.reason, q.detail)),
        ]
        if params:
            # One parameter a line: each name and value escaped on its own, so the line breaks stay.
            pairs = quarantine_params(q)
            row.append(Text("\n".join(f"{safe_text(k)}={safe_text(v)}" for k, v in pairs)))
        table.add_row(*row)
    return table


def _per_reason(records: Sequence[Quarantined]) -> str:
    from services.common.ops import mask_text

    counts: dict[str, int] = {}
    for q in records:
        counts[q.reason or "none"] = counts.get(q.reason or "none", 0) + 1
    return ", ".join(f"{safe_text(mask_text(r))} {n}" for r, n in sorted(counts.items()))


@quarantine_app.command("list")
def quarantine_list(
    reason: QReasonOpt = None,
    source: QSourceOpt = None,
    event: QEventOpt = None,
    since: QSinceOpt = None,
    until: QUntilOpt = None,
    event_id: EventIdOpt = None,
    params: Annotated[
        bool, typer.Option("--params", help="Also show the request's parameters (personal data masked).")
    ] = False,
    limit: LimitOpt = 50,
    timeout: QReadTimeoutOpt = 30.0,
) -> None:
    """List quarantined inbox records, newest first (personal data masked)."""
    flt = _quarantine_filter(reason, source, event, since, until, event_id)
    found = _read_quarantined(_settings(), flt, timeout)
    if not found:
        console.print("no quarantined records match")
        return
    newest = sorted(found, key=lambda q: q.received_at, reverse=True)[:limit]
    console.print(_quarantine_table(newest, params))
    shown = f", showing the newest {len(newest)}" if len(newest) < len(found) else ""
    # Text, not markup: a reason like "[/]" would be read as a tag.
    console.print(Text(f"{len(found)} quarantined record(s) match ({_per_reason(found)}){shown}"))


@quarantine_app.command("replay")
def quarantine_replay(
    reason: QReasonOpt = None,
    source: QSourceOpt = None,
    event: QEventOpt = None,
    since: QSinceOpt = None,
    until: QUntilOpt = None,
    event_id: EventIdOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be replayed; publish nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    timeout: QReadTimeoutOpt = 30.0,
) -> None:
    """Put matching quarantined records back on the inbox, so the normalizer tries them again.

    Fix the normalizer or the config first. Safe to repeat: a record keeps its event id, so an event is
    never delivered twice.
    """
    from services.common.kafka import INBOX, QUARANTINE
    from services.common.ops import distinct, replay_quarantine

    settings = _settings()
    flt = _quarantine_filter(reason, source, event, since, until, event_id)
    found = _read_quarantined(settings, flt, timeout)
    # A record quarantined again after an earlier replay is on the topic twice; it goes back once.
    chosen = distinct(found)
    if not chosen:
        console.print("no quarantined records match; nothing to replay")
        return
    repeats = f"; {len(found) - len(chosen)} repeated id(s) counted once" if len(found) > len(chosen) else ""
    console.print(Text(f"{len(chosen)} quarantined record(s) match ({_per_reason(chosen)}){repeats}"))
    if dry_run:
        console.print(_quarantine_table(chosen))
        console.print(f"dry run: {len(chosen)} would be replayed to {INBOX}; nothing was published")
        return
    if not yes:
        typer.confirm(f"Replay {len(chosen)} record(s) to {INBOX}?", abort=True)
    count = _replay_with_progress(
        settings,
        len(chosen),
        lambda bootstrap, on_progress, config: replay_quarantine(
            bootstrap, chosen, on_progress=on_progress, producer_config=config
        ),
        "an event is never delivered twice",
    )
    console.print(
        f"replayed {count} record(s) to {INBOX}; the normalizer tries them again now. They stay in "
        f"{QUARANTINE}, and one that still fails is quarantined once more."
    )


def _ledger_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the ledger, without creating an empty SQLite file as a side effect."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return "not a database URL"
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not Path(db).exists():
        return "the SQLite file does not exist"
    return None


def _open_ledger(settings: Settings) -> Ledger:
    from services.common.ledger import Ledger
    from services.common.logging import redact_url

    problem = _ledger_url_problem(settings.database_url)
    if problem:
        err.print(
            Text(
                f"cannot open the ledger {safe_text(redact_url(settings.database_url))}: {problem}; "
                "fix: set RELAY_DATABASE_URL to the services' database",
                style="red",
            )
        )
        raise typer.Exit(2)
    return Ledger.from_url(settings.database_url, phone_key=settings.phone_hash_key)


def _ledger_failed(settings: Settings, e: Exception) -> typer.Exit:
    from services.common.logging import redact_url
    from services.common.ops import mask_text

    first = (str(e).splitlines() or [type(e).__name__])[0]
    err.print(
        Text(
            f"cannot read the ledger {safe_text(redact_url(settings.database_url))}: "
            f"{safe_text(mask_text(first))}; fix: check RELAY_DATABASE_URL and run `relay db upgrade`",
            style="red",
        )
    )
    return typer.Exit(2)


async def _load_event(
    settings: Settings, event_id: str
) -> tuple[EventRecord, list[Delivery], dict[str, list[Any]]] | None:
    ledger = _open_ledger(settings)
    try:
        record = await ledger.event(event_id)
        if record is None:
            return None
        deliveries = await ledger.for_event(event_id)
        attempts = {d.idempotency_key: await ledger.attempts(d.idempotency_key) for d in deliveries}
        return record, deliveries, attempts
    finally:
        await ledger.close()


@events_app.command("show")
def events_show(
    event_id: Annotated[
        str, typer.Argument(help="The event id (the ingest API's answer, or ce_id).", callback=_utf8)
    ],
) -> None:
    """What arrived, what it was normalized to, and every delivery attempt (personal data masked)."""
    from sqlalchemy.exc import SQLAlchemyError

    settings = _settings()
    try:
        found = asyncio.run(_load_event(settings, event_id))
    except (SQLAlchemyError, OSError) as e:
        raise _ledger_failed(settings, e) from None
    if found is None:
        err.print(Text(f"no event '{safe_text(event_id)}' in the ledger", style="red"))
        raise typer.Exit(1)
    record, deliveries, attempts = found
    _print_event_header(record)
    _print_arrived(record)
    _print_normalized(record)
    _print_deliveries(deliveries, attempts)


def _print_event_header(record: EventRecord) -> None:
    table = Table(show_header=False, box=None, title=Text(f"Event {safe_text(record.id)}", style="bold"))
    status = f"quarantined: {record.quarantine_reason}" if record.quarantine_reason else "normalized"
    if not record.quarantine_reason and record.normalized is None:
        status = "not normalized"
    if record.duplicate_of:
        status = f"dropped: a repeat of {record.duplicate_of} inside the dedupe window"
    for name, value in (
        ("Source", record.source),
        ("Webhook", record.event),
        ("Received (UTC)", _utc(record.received_at)),
        ("Kafka key", record.kafka_key),
        ("Status", status),
    ):
        table.add_row(_cell(name), _cell(value))
    console.print(table)


def _print_arrived(record: EventRecord) -> None:
    from urllib.parse import parse_qsl

    from pydantic import ValidationError

    from services.common.ops import mask_pairs, mask_text
    from services.ingest.inbox import InboxRecord
    from services.ingest.parsing import ParamsError, request_params

    console.print(Text("\nWhat arrived", style="bold"))
    try:
        inbox = InboxRecord.from_bytes(record.inbox.encode())
    except ValidationError:
        console.print(Text(f"an unreadable inbox record: {safe_text(mask_text(record.inbox))}"))
        return
    console.print(
        Text(
            f"{safe_text(inbox.method)} at {_utc(inbox.received_at)} UTC, "
            f"content type {safe_text(inbox.content_type or 'none')}"
        )
    )
    try:
        pairs = request_params(inbox.query, inbox.content_type, inbox.body_bytes())
    except ParamsError as e:
        pairs = parse_qsl(inbox.query, keep_blank_values=True)
        body = mask_text(inbox.body or "<binary>")
        console.print(Text(f"the body could not be read ({_why(e)}): {safe_text(body)}"))
    table = Table("Parameter", "Value")
    table.columns[1].overflow = "fold"
    for name, value in mask_pairs(pairs):
        table.add_row(_cell(name), _cell(value))
    console.print(table)


def _print_normalized(record: EventRecord) -> None:
    import json

    from rich.highlighter import JSONHighlighter

    from services.common.display import safe_json
    from services.common.ops import mask_data, mask_text

    console.print(Text("\nHow it was normalized", style="bold"))
    if record.normalized is None:
        console.print(Text(f"quarantined: {safe_text(record.quarantine_reason or 'no reason recorded')}"))
        return
    try:
        data = json.loads(record.normalized)
    except ValueError:
        console.print(Text(safe_text(mask_text(record.normalized))))
        return
    # Not console.print_json: its json.dumps leaves DEL, C1 controls, bidi marks and lone surrogates raw (a
    # "\ud800" escape in the record's JSON is one), and printing a surrogate raises UnicodeEncodeError.
    text = JSONHighlighter()(safe_json(mask_data(data)))
    text.no_wrap = True
    console.print(text, soft_wrap=True)


def _print_deliveries(deliveries: Sequence[Delivery], attempts: dict[str, list[Any]]) -> None:
    from services.common.ops import mask_text

    console.print(Text("\nDeliveries", style="bold"))
    if not deliveries:
        console.print("none recorded: no connection takes this event, or no delivery service has seen it yet")
        return
    summary = Table("Target", "Connection", "Action", "Status", "Attempts", "Updated (UTC)", "Target ref")
    for d in sorted(deliveries, key=lambda d: (d.target, d.id)):
        summary.add_row(
            _cell(d.target), _cell(f"{d.source}/{d.connection}"), _cell(d.action), _cell(d.status.value),
            _cell(d.attempts), _cell(_utc(d.updated_at)), _cell(d.target_ref),
        )  # fmt: skip
    console.print(summary)
    for d in sorted(deliveries, key=lambda d: (d.target, d.id)):
        table = Table(
            "#", "Started (UTC)", "Duration ms", "Outcome", "HTTP", "Vendor code", "Error",
            title=Text(safe_text(f"{d.target} {d.source}/{d.connection} {d.action}: {d.status.value}")),
        )  # fmt: skip
        table.columns[-1].overflow = "fold"
        for a in attempts.get(d.idempotency_key, []):
            table.add_row(
                _cell(a.number), _cell(_utc(a.started_at)), _cell(f"{a.duration_ms:.1f}"), _cell(a.outcome),
                _cell(a.http_status), _cell(a.vendor_code), _cell(mask_text(a.error) if a.error else None),
            )  # fmt: skip
        console.print(table)


async def _find_events(
    settings: Settings, phone: str | None, client_id: str | None, source: str | None, limit: int
) -> list[tuple[EventRecord, list[Delivery]]]:
    ledger = _open_ledger(settings)
    try:
        records = await ledger.find_events(phone=phone, client_id=client_id, source=source, limit=limit)
        return [(r, await ledger.for_event(r.id)) for r in records]
    finally:
        await ledger.close()


@events_app.command("find")
def events_find(
    phone: Annotated[
        str | None, typer.Option(help="The client's phone in any spelling.", callback=_utf8)
    ] = None,
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="The Klientiks client id.", callback=_utf8)
    ] = None,
    source: Annotated[str | None, typer.Option(help="Only this source.", callback=_utf8)] = None,
    region: Annotated[
        str, typer.Option(help="Phone region for numbers without a country code.", callback=_utf8)
    ] = "RU",
    limit: Annotated[int, typer.Option(min=1, max=_MAX_LIMIT, help="At most this many, newest first.")] = 20,
) -> None:
    """Find events by the client's phone or id, newest first."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.common.logging import mask_phone
    from services.ingest.parsing import normalize_phone

    if not phone and not client_id:
        raise typer.BadParameter("give --phone or --client-id")
    e164 = None
    if phone:
        e164 = normalize_phone(phone, region.upper())
        if e164 is None:
            raise typer.BadParameter(
                f"{safe_text(mask_phone(phone))} is not a valid phone number of region "
                f"{safe_text(region.upper())}",
                param_hint="--phone",
            )
    settings = _settings()
    if e164 and settings.phone_hash_key is None:
        from services.common.ledger import PhoneSearchUnavailable

        err.print(str(PhoneSearchUnavailable()), style="red", markup=False)
        raise typer.Exit(2)
    try:
        found = asyncio.run(_find_events(settings, e164, client_id, source, limit))
    except (SQLAlchemyError, OSError) as e:
        raise _ledger_failed(settings, e) from None
    if not found:
        console.print("no events found")
        return
    table = Table("Received (UTC)", "Event id", "Source", "Webhook", "Client id", "Deliveries")
    table.columns[1].overflow = "fold"
    for r, deliveries in found:
        statuses = ", ".join(f"{d.target}/{d.action} {d.status.value}" for d in deliveries) or "none"
        table.add_row(
            _cell(_utc(r.received_at)), _cell(r.id), _cell(r.source), _cell(r.event), _cell(r.client_id),
            _cell(statuses),
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} event(s); `relay events show ID` shows one in full")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
