"""`relay weeek funnels` and `relay weeek statuses --funnel ID`: what an operator needs to set a connection up.

They call Weeek with a connection's own token from the config, so nobody pastes a token into curl.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

if TYPE_CHECKING:
    from services.weeek.settings import WeeekConnection

app = typer.Typer(no_args_is_help=False)

ConnectionOpt = Annotated[
    str | None,
    typer.Option("--connection", help="SOURCE/CONNECTION whose token to use (default: the only Weeek one)."),
]


def _connection(which: str | None) -> WeeekConnection:
    from services.cli.options import read_settings
    from services.common import targets

    found = {f"{s.name}/{c.name}": c for s, c in targets.connections(read_settings(), targets.get("weeek"))}
    if which is not None:
        if which not in found:
            raise typer.BadParameter(
                f"no Weeek connection {which!r}; there are: {', '.join(found) or 'none'}"
            )
        return found[which]  # type: ignore[no-any-return]
    if len(found) != 1:
        raise typer.BadParameter(
            f"{len(found)} Weeek connections in the config; name one with --connection ({', '.join(found)})"
            if found else "the config has no Weeek connection"
        )  # fmt: skip
    return next(iter(found.values()))  # type: ignore[no-any-return]


def _list(conn: WeeekConnection, path: str, entity: str) -> list[dict[str, Any]]:
    from services.common.httpclient import make_transport
    from services.weeek.client import WeeekClient

    async def run() -> list[dict[str, Any]]:
        transport = make_transport(2)
        try:
            api = WeeekClient(transport, conn.base_url, conn.token.get_secret_value(), conn.timeout_s)
            return await api.list(path, entity)
        finally:
            await transport.aclose()

    try:
        return asyncio.run(run())
    except RuntimeError as e:
        from services.cli.render import err, why

        err.print(Text(why(e), style="red"))  # Weeek's own message, escaped
        raise typer.Exit(1) from None


def _table(title: str, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    from rich.table import Table

    from services.cli.render import cell, console

    table = Table(*columns, title=title)
    table.columns[0].no_wrap = True  # an id is copied into the config: never cut it short
    table.columns[0].min_width = max((len(str(r.get(columns[0], ""))) for r in rows), default=2)
    for row in rows:
        table.add_row(*(cell(row.get(c)) for c in columns))
    console.print(table)


@app.command("funnels")
def funnels(connection: ConnectionOpt = None) -> None:
    """List the workspace's funnels (their ids go to `relay weeek statuses --funnel ID`)."""
    _table(
        "Weeek funnels",
        _list(_connection(connection), "/crm/funnels", "funnels"),
        ("id", "name", "dealsCount"),
    )


@app.command("statuses")
def statuses(
    funnel: Annotated[str, typer.Option("--funnel", help="The funnel's id (`relay weeek funnels`).")],
    connection: ConnectionOpt = None,
) -> None:
    """List a funnel's statuses: an id goes to the connection's status_id or status_map."""
    if not funnel.replace("-", "").isalnum():
        raise typer.BadParameter("a funnel id is letters, digits and '-'", param_hint="--funnel")
    rows = _list(_connection(connection), f"/crm/funnels/{funnel}/statuses", "statuses")
    _table(f"Statuses of funnel {funnel}", rows, ("id", "name", "dealsCount"))
