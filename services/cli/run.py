"""`relay run` (the embedded broker, every role supervised, the live view of deliveries) and `relay demo`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import httpx
import typer
from rich.table import Table
from rich.text import Text

from services.cli.configcmd import print_urls, to_yaml
from services.cli.options import read_settings
from services.cli.render import cell, console, err
from services.common import targets
from services.common.config import Settings, load_settings
from services.common.display import safe_text

if TYPE_CHECKING:
    from services.common.embedded import EmbeddedBroker
    from services.common.supervisor import Process, Supervisor

STATE = Path(".relay")


def _roles() -> list[tuple[str, list[str], int]]:
    """(name, `relay` arguments, port) of every role, in start order: sandboxes, ingest, delivery services."""
    specs = [targets.get(name) for name in targets.names()]
    return [
        *((f"sandbox-{t.name}", ["sandbox", t.name], t.sandbox_port) for t in specs if t.sandbox_port),
        ("sandbox-klientiks", ["sandbox", "klientiks"], 8091),
        ("ingest-api", ["ingest", "api"], 8080),
        ("normalizer", ["ingest", "normalizer"], 8081),
        *((t.name, [t.name], t.port) for t in specs),
    ]


ROLES = _roles()


def _local(url: str, port: int) -> bool:
    """Whether ``url`` points at this machine's ``port`` (a sandbox that `relay run` would start)."""
    parts = urlsplit(url)
    return parts.hostname in ("127.0.0.1", "localhost", "::1") and parts.port == port


def roles_for(settings: Settings, ports: dict[str, int]) -> list[str]:
    """The roles a config needs, in start order: a delivery service only for a target it has connections
    for, a sandbox only when a connection or a source's Klientiks API points at it."""
    wanted = {"ingest-api", "normalizer"}
    for name in targets.names():
        spec = targets.get(name)
        conns = [conn for _, conn in targets.connections(settings, spec)]
        if conns:
            wanted.add(name)
        sandbox = f"sandbox-{name}"
        if sandbox in ports and any(_local(getattr(c, spec.url_key), ports[sandbox]) for c in conns):
            wanted.add(sandbox)
    if any(
        s.klientiks and _local(s.klientiks.base_url, ports["sandbox-klientiks"]) for s in settings.sources
    ):
        wanted.add("sandbox-klientiks")
    return [name for name, _, _ in ROLES if name in wanted]


def _secret(name: str) -> str:
    """A reference to a file in the state's ``secrets/``, resolved when the config is loaded."""
    return f"${{file:secrets/{name}}}"


def _demo_config(state: Path, sandbox_urls: dict[str, str], klientiks_url: str) -> Path:
    """Write the embedded demo config: one connection to each registered target's sandbox (``sandbox_urls``);
    its secrets live in files beside it, never in the YAML."""
    from services.common.embedded import private_secret

    connections = []
    for name, url in sandbox_urls.items():
        spec = targets.get(name)
        if spec.demo is not None and spec.sandbox_secret is not None:
            private_secret(state / "secrets" / spec.sandbox_secret[1])
            connections.append(spec.demo(url, _secret(spec.sandbox_secret[1])))
    for name in ("demo-token", "klientiks-token"):
        private_secret(state / "secrets" / name)
    private_secret(state / "secrets" / "phone-hash-key", 32)
    config: dict[str, Any] = {
        "phone_hash_key": _secret("phone-hash-key"),
        "sources": [
            {
                "name": "demo-salon",
                "token": _secret("demo-token"),
                "timezone": "Europe/Moscow",
                "phone_region": "RU",
                "klientiks": {
                    "account_id": "21947",
                    "user_id": "113421",
                    "access_token": _secret("klientiks-token"),
                    "base_url": f"{klientiks_url}/clientix/Restapi",
                },
                "connections": connections,
            }
        ],
    }
    path = state / "demo.yaml"
    path.write_text(
        "# Written by `relay run`: one demo salon, thin webhooks completed from the sandbox Klientiks API,\n"
        "# delivering to each target's sandbox.\n" + to_yaml(config),
        encoding="utf-8",
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
    sandbox_urls = {
        n[len("sandbox-") :]: f"http://127.0.0.1:{p}" for n, p in ports.items() if n.startswith("sandbox-")
    }
    sandbox_urls.pop("klientiks")
    sandbox_url = sandbox_urls.get("maxma", "")
    config = (
        Path(os.environ["RELAY_CONFIG"])
        if os.environ.get("RELAY_CONFIG")
        else _demo_config(STATE, sandbox_urls, f"http://127.0.0.1:{ports['sandbox-klientiks']}")
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
    settings = read_settings()
    if settings.phone_hash_key is None:
        # One's own config without a key still gets a phone index: a key kept with the other local secrets.
        key_file = STATE / "secrets" / "phone-hash-key"
        env["RELAY_PHONE_HASH_KEY"] = os.environ["RELAY_PHONE_HASH_KEY"] = private_secret(key_file, 32)
        settings = read_settings()
        console.print(
            f"{config} sets no phone_hash_key: this run uses the one in {key_file} "
            "(give it as RELAY_PHONE_HASH_KEY to `relay events find --phone`)"
        )

    from services.common.ledger import migrate

    asyncio.run(migrate(settings.database_url))
    roles = roles_for(settings, ports)
    args_of = {name: args for name, args, _ in ROLES}
    logs = {name: STATE / "logs" / f"{name}.log" for name in roles}
    # The demo config's credentials; with one's own config (and no demo run before), the sandboxes' defaults.
    secrets = [
        *(
            (f"sandbox-{t.name}", *t.sandbox_secret)
            for t in map(targets.get, targets.names())
            if t.sandbox_secret
        ),
        ("sandbox-klientiks", "--token-file", "klientiks-token"),
    ]
    extra = {
        name: [option, str(STATE / "secrets" / file)]
        for name, option, file in secrets
        if (STATE / "secrets" / file).exists()
    }

    def spawner(name: str, args: list[str]) -> Callable[[], subprocess.Popen[bytes]]:
        argv = [*args, "--port", str(ports[name]), "--host", "127.0.0.1", *extra.get(name, [])]
        return lambda: _spawn(argv, env, logs[name])

    supervisor = Supervisor(
        {name: spawner(name, args_of[name]) for name in roles}, logs=logs, pid_dir=STATE / "pids"
    )
    code = 0
    try:
        supervisor.start()
        procs = supervisor.procs
        for name in roles:
            probe = "/_sandbox/faults" if name.startswith("sandbox-") else "/readyz"
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
            print_urls(ingest_url, s.name, s.token.get_secret_value())
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
            if "sandbox-maxma" in roles:
                console.print(f"  curl {sandbox_url}/_sandbox/clients")
            if "sandbox-cpahouse" in roles:
                console.print(f"  curl http://127.0.0.1:{ports['sandbox-cpahouse']}/_sandbox/leads")
            console.print()
        if demo and settings.sources:
            _send_story(ingest_url, settings, 1)
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


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


# What each target's sandbox holds of one demo client's story: (control path, count of its effects).
_STORY: dict[str, tuple[str, Callable[[list[dict[str, Any]], str, str, str], str]]] = {
    "maxma": ("/_sandbox/orders", lambda orders, cid, vid, click: next(
        (f"order {o['orderId']} {o['status']}, {o['collectedBonuses']} bonuses" for o in orders
         if o["orderId"].endswith(f":{vid}")), "")),
    "cpahouse": ("/_sandbox/leads", lambda leads, cid, vid, click: next(
        (f"lead {lead['id']} (sub_id_1 {cid})" for lead in leads if lead.get("sub_id_1") == cid), "")),
    "weeek": ("/_sandbox/deals", lambda deals, cid, vid, click: next(
        (f"deal \"{d['title']}\" {d.get('winStatus') or 'open'}" for d in deals
         if str(d.get("description", "")).endswith(f"№{vid}")), "")),
    "plarin": ("/_sandbox/postbacks", lambda posts, cid, vid, click: next(
        (f"postback click_id={p['params'].get('click_id')} value={p['params'].get('value')}" for p in posts
         if p["params"].get("click_id") == click), "")),
}  # fmt: skip


def _send_story(base_url: str, settings: Settings, count: int) -> None:
    """A client's whole story per demo client: created, booked (from an ad), confirmed, paid; then what each
    target's sandbox holds of it."""
    from services.sandbox.samples import client_params

    source = settings.sources[0]
    token = source.token.get_secret_value()
    if source.klientiks is None:
        err.print("[red]the demo story needs the source's Klientiks API (the sandbox of `relay run`)[/red]")
        raise typer.Exit(2)
    klientiks = source.klientiks.base_url.removesuffix("/clientix/Restapi")
    sandboxes = {
        spec.name: _origin(str(getattr(conn, spec.url_key)))
        for spec in (targets.get(n) for n in targets.names())
        for _, conn in targets.connections(settings, spec)
    }
    hook = f"{base_url}/hooks/klientiks/{token}"
    stories: list[tuple[str, str, str]] = []
    with httpx.Client(timeout=10) as http:
        for i in range(count):
            params = client_params(int(time.time()) % 100_000 * 10 + i)
            kl = http.post(f"{klientiks}/_sandbox/clients", json={
                "account_id": source.klientiks.account_id, "phone": params["client_phone"],
                "first_name": params["client_first_name"], "second_name": params["client_second_name"],
                "patron_name": params["client_patron_name"], "email": params["client_email"]}).json()  # fmt: skip
            cid = str(kl["id"])
            http.get(f"{hook}/client-created", params={**params, "client_id": cid})
            start = datetime.now().replace(second=0, microsecond=0) + timedelta(days=1)
            visit = http.post(f"{klientiks}/_sandbox/appointments", json={
                "account_id": source.klientiks.account_id, "client_id": int(cid),
                "start_datetime": start.isoformat(), "services": ["Стрижка женская", "Укладка"]}).json()  # fmt: skip
            vid = str(visit["id"])
            click = f"demo{cid}x{vid}"
            http.get(f"{hook}/appointment-created", params={
                "client_id": cid, "client_phone": params["client_phone"], "client_name": params["client_name"],
                "appointment_id": vid, "appointment_date": f"{start:%d.%m.%Y}", "appointment_time": f"{start:%H:%M}",
                "services": "Стрижка женская, Укладка", "appointment_total_cost": "3300", "yclid": click})  # fmt: skip
            http.get(f"{hook}/appointment-changed", params={"appointment_id": vid, "status": "confirmed"})
            http.get(f"{hook}/visit-paid", params={
                "client_id": cid, "appointment_id": vid, "appointment_account_id": source.klientiks.account_id,
                "appointment_status": "finished", "appointment_paid": "1", "yclid": click})  # fmt: skip
            stories.append((cid, vid, click))
        console.print(
            f"sent {count} client stories (created, booked from an ad, confirmed, paid); waiting for them"
        )
        table = Table("Klientiks client", *sandboxes)
        deadline = time.monotonic() + 30
        rows: list[list[str]] = []
        while time.monotonic() < deadline:
            state = {n: http.get(url + _STORY[n][0]).json() for n, url in sandboxes.items() if n in _STORY}
            rows = [[cid, *(_STORY[n][1](state.get(n, []), cid, vid, click) if n in _STORY else "" for n in sandboxes)]
                    for cid, vid, click in stories]  # fmt: skip
            if all(all(cells[1:]) for cells in rows):
                break
            time.sleep(0.5)
        for cells in rows:
            # What the sandboxes hold came in by webhook: shown escaped, never as markup.
            table.add_row(*(cell(c) if c else Text("not yet", style="yellow") for c in cells))
    console.print(table)


def demo(
    base_url: Annotated[
        str, typer.Option(help="Base URL of the running ingest API.")
    ] = "http://127.0.0.1:8080",
    count: Annotated[int, typer.Option(help="How many demo clients.")] = 2,
    clients_only: Annotated[
        bool, typer.Option("--clients-only", help='Only "Добавление клиента" webhooks, no visits.')
    ] = False,
) -> None:
    """Send demo clients' stories (created, booked, confirmed, paid) to a running `relay run`; show each target's."""
    settings = read_settings() if os.environ.get("RELAY_CONFIG") else None
    if settings is None:
        demo_cfg = STATE / "demo.yaml"
        if not demo_cfg.exists():
            err.print("[red]no RELAY_CONFIG and no .relay/demo.yaml: start `relay run` first[/red]")
            raise typer.Exit(2)
        settings = load_settings(demo_cfg)
    if clients_only:
        _send_demo(base_url, settings.sources[0].token.get_secret_value(), count)
    else:
        _send_story(base_url, settings, count)
