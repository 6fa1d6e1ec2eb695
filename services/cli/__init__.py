"""``relay``: every process role and operator command. The one place that imports more than one service.

One module per command group: ``roles`` (the long-running processes and ``db``), ``run`` (the local run and
``demo``), ``events``, ``ledgercmd`` (``relay ledger``), ``dlq``, ``quarantine``, ``configcmd`` (config, urls,
token, docs); ``options``, ``render`` and ``topics`` are what they share. Services are imported inside the
commands that need them.
"""

from __future__ import annotations

import typer

from services.cli import configcmd, deploycmd, dlq, events, ledgercmd, quarantine, roles, run
from services.cli.run import ROLES
from services.common import targets

__all__ = ["ROLES", "app", "main"]

app = typer.Typer(
    help="klientiks-relay: Klientiks webhooks to Kafka events to Maxma, CPA.House, Weeek, Plarin.",
    no_args_is_help=True,
)
# `relay --help` lists the commands, then the groups, each in the order they are added here.
for _name in targets.names():  # `relay maxma`, ...: one delivery service per registered target
    _spec = targets.get(_name)
    if _spec.commands is None:
        app.command(_name)(roles.delivery_role(_name, _spec.title, _spec.port))
    else:  # `relay weeek` runs the service; `relay weeek funnels` is one of its operator commands
        app.add_typer(roles.delivery_group(_name, _spec.title, _spec.port, _spec.commands), name=_name)
app.command("broker")(roles.broker)
app.command("docs")(configcmd.docs)
app.command("token")(configcmd.token)
app.command("urls")(configcmd.urls)
app.command("run")(run.run)
app.command("demo")(run.demo)
app.add_typer(roles.ingest_app, name="ingest")
app.add_typer(roles.sandbox_app, name="sandbox")
app.add_typer(roles.db_app, name="db")
app.add_typer(roles.kafka_app, name="kafka")
app.add_typer(deploycmd.deploy_app, name="deploy")
app.add_typer(configcmd.config_app, name="config")
app.add_typer(dlq.dlq_app, name="dlq")
app.add_typer(events.events_app, name="events")
app.add_typer(ledgercmd.ledger_app, name="ledger")
app.add_typer(quarantine.quarantine_app, name="quarantine")


def main() -> None:
    """The ``relay`` console script."""
    app()
