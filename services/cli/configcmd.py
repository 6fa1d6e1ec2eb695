"""`relay config check`, `relay urls`, `relay token`, `relay docs`, and the one YAML writer."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from services.cli.options import read_settings
from services.cli.render import config_failed, console
from services.common.config import ConfigError
from services.common.events import EventName

config_app = typer.Typer(help="The configuration file.", no_args_is_help=True)


class _NoAliases(yaml.SafeDumper):
    """Repeated parts written out in full: a published document should read without YAML anchors."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def to_yaml(data: Any) -> str:
    """``data`` as block-style YAML, keys in their given order, no anchors, non-ASCII text as it is."""
    return yaml.dump(data, Dumper=_NoAliases, sort_keys=False, allow_unicode=True)


@config_app.command("check")
def config_check() -> None:
    """Validate RELAY_CONFIG, including every connection's target-specific keys."""
    from services.common import targets

    settings = read_settings()
    problems = targets.check(settings)
    if problems:
        raise config_failed(ConfigError(problems, str(settings.config) if settings.config else None))
    conns = sum(len(s.connections) for s in settings.sources)
    console.print(f"ok: {len(settings.sources)} source(s), {conns} connection(s)")


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
        out / "asyncapi.yaml": to_yaml(asyncapi_document()),
    }
    for path, text in files.items():
        path.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
        console.print(f"wrote {path}")


def token() -> None:
    """Print a new random source token."""
    console.print(secrets.token_urlsafe(24))


def urls(
    base_url: Annotated[
        str, typer.Option(help="Public base URL of the ingest API.")
    ] = "http://127.0.0.1:8080",
    source: Annotated[str | None, typer.Option(help="Source name (default: every source).")] = None,
) -> None:
    """Print the URL to paste into Klientiks for every event of a source."""
    settings = read_settings()
    chosen = [settings.source(source)] if source else settings.sources
    for s in chosen:
        print_urls(base_url, s.name, s.token.get_secret_value())


def print_urls(base_url: str, source: str, token: str) -> None:
    from services.ingest.templates import TITLES, webhook_url

    console.print(f"[bold]Webhook URLs of source {source}[/bold] (Klientiks → Настройки → События-webhook):")
    for event in EventName:
        console.print(
            f"  [cyan]{TITLES[event]}[/cyan]\n    {webhook_url(base_url, token, event)}", soft_wrap=True
        )
