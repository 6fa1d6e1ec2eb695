"""The long-running roles (ingest API and normalizer, maxma, the sandboxes, the broker) and `relay db`.

A role imports its service only inside its command, so a process carries just the service it runs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn

from services.cli.options import read_settings
from services.cli.render import config_failed, console
from services.common.config import ConfigError
from services.common.logging import configure_logging

ingest_app = typer.Typer(help="The ingest service roles.", no_args_is_help=True)
sandbox_app = typer.Typer(help="Fake target APIs for the local run, demos and tests.", no_args_is_help=True)
db_app = typer.Typer(help="The ledger database.", no_args_is_help=True)
kafka_app = typer.Typer(help="The Kafka topics.", no_args_is_help=True)

HostOpt = Annotated[str, typer.Option(help="Interface to listen on.")]
PortOpt = Annotated[int, typer.Option(help="HTTP port (webhooks, /metrics, /healthz, /readyz).")]
MigrateOpt = Annotated[bool, typer.Option(help="Apply ledger migrations at start (embedded SQLite).")]


def serve(asgi: Any, host: str, port: int, **options: Any) -> None:
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

    settings = read_settings()
    serve(create_api(settings, migrate=migrate), host, port, **uvicorn_options(settings.ingest))


@ingest_app.command("normalizer")
def ingest_normalizer(
    host: HostOpt = "0.0.0.0",  # noqa: S104
    port: PortOpt = 8081,
    migrate: MigrateOpt = False,
) -> None:
    """Turn inbox records into typed events on klientiks.events.v1."""
    from services.ingest.normalizer import create_normalizer

    serve(create_normalizer(read_settings(), migrate=migrate), host, port)


def delivery_role(name: str, title: str, default_port: int) -> Callable[..., None]:
    """The command of one registered target's delivery service (``relay maxma``, ...)."""

    def role(
        host: HostOpt = "0.0.0.0",  # noqa: S104
        port: PortOpt = default_port,
        migrate: MigrateOpt = False,
    ) -> None:
        from services.common.targets import create_delivery_app

        try:
            asgi = create_delivery_app(name, read_settings(), migrate=migrate)
        except ConfigError as e:
            raise config_failed(e) from None
        serve(asgi, host, port)

    role.__doc__ = f"Deliver events to {title}."
    return role


def delivery_group(name: str, title: str, default_port: int, commands: str) -> typer.Typer:
    """``relay <name>`` runs the delivery service; ``relay <name> <command>`` runs one of ``commands``' app."""
    import importlib

    role = delivery_role(name, title, default_port)
    group: typer.Typer = importlib.import_module(commands).app

    @group.callback(invoke_without_command=True)
    def run_or_command(
        ctx: typer.Context,
        host: HostOpt = "0.0.0.0",  # noqa: S104
        port: PortOpt = default_port,
        migrate: MigrateOpt = False,
    ) -> None:
        if ctx.invoked_subcommand is None:
            role(host=host, port=port, migrate=migrate)

    run_or_command.__doc__ = f"Deliver events to {title} (with no command), or run one of its commands."
    return group


@sandbox_app.command("maxma")
def sandbox_maxma(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8090,
    key_file: Annotated[Path | None, typer.Option(help="File holding the accepted X-Processing-Key.")] = None,
    shop: Annotated[
        list[str] | None,
        typer.Option(
            "--shop", metavar="CODE", help="A shop code the account has; repeat for more (default: main)."
        ),
    ] = None,
) -> None:
    """A fake Maxma API that answers like the real one and can be told to fail."""
    from services.sandbox.maxma import DEFAULT_SHOPS, create_maxma_app

    configure_logging()
    keys = {key_file.read_text().strip()} if key_file else None
    try:
        app = create_maxma_app(processing_keys=keys, shops=shop or DEFAULT_SHOPS)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--shop") from None
    serve(app, host, port)


@sandbox_app.command("cpahouse")
def sandbox_cpahouse(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8092,
    key_file: Annotated[
        Path | None, typer.Option(help="File holding the accepted api_key (without it any key is accepted).")
    ] = None,
    webmaster_id: Annotated[
        int, typer.Option(min=1, help="The id_webmaster of the accepted api_key.")
    ] = 1001,
) -> None:
    """A fake CPA.House lead API (send_order) that answers like the real one and can be told to fail."""
    from services.sandbox.cpahouse import create_cpahouse_app

    configure_logging()
    key = key_file.read_text().strip() if key_file else None
    if key == "":
        raise typer.BadParameter("the key file is empty", param_hint="--key-file")
    accounts = {key: str(webmaster_id)} if key is not None else None
    serve(create_cpahouse_app(accounts=accounts), host, port)


@sandbox_app.command("plarin")
def sandbox_plarin(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8094,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the token postbacks must carry as token=... (without it none)."),
    ] = None,
) -> None:
    """A fake Plarin conversion-postback receiver (GET /postback), strict and able to fail on demand."""
    from services.sandbox.plarin import create_plarin_app

    configure_logging()
    token = token_file.read_text().strip() if token_file else None
    if token == "":
        raise typer.BadParameter("the token file is empty", param_hint="--token-file")
    serve(create_plarin_app(token=token), host, port)


@sandbox_app.command("weeek")
def sandbox_weeek(
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8093,
    token_file: Annotated[
        Path | None,
        typer.Option(help="File holding the accepted Bearer token (without it any non-empty token)."),
    ] = None,
) -> None:
    """A fake Weeek CRM API (public v1, under /public/v1) that answers like the real one and can fail."""
    from services.sandbox.weeek import create_weeek_app

    configure_logging()
    token = token_file.read_text().strip() if token_file else None
    if token == "":
        raise typer.BadParameter("the token file is empty", param_hint="--token-file")
    try:
        app = create_weeek_app(tokens={token} if token is not None else None)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--token-file") from None
    serve(app, host, port)


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
    serve(create_klientiks_sandbox([account], seed=seed), host, port)


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

    asyncio.run(migrate(read_settings().database_url))
    console.print("ledger is up to date")


@kafka_app.command("create-topics")
def kafka_create_topics() -> None:
    """Create every topic with its partition count (kafka.partitions, else the defaults); existing ones stay."""
    from services.common.kafka import ensure_topics, topic_specs

    settings = read_settings()
    asyncio.run(ensure_topics(settings.kafka))
    for spec in topic_specs(settings.kafka):
        console.print(f"{spec.name}: {spec.partitions} partition(s)")
