"""What many commands take: the settings, option types and checks, the one --since/--until parser."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer

from services.cli.render import config_failed
from services.common.config import ConfigError, Settings, load_settings
from services.common.display import safe_text
from services.common.logging import configure_logging

MAX_LIMIT = 1_000_000
MAX_TIMEOUT = 3600.0
_Text = TypeVar("_Text", str | None, list[str] | None)


def read_settings() -> Settings:
    """The settings of ``RELAY_CONFIG`` and ``RELAY_*``, logging configured; a bad config exits 2."""
    try:
        settings = load_settings()
    except ConfigError as e:
        raise config_failed(e) from None
    configure_logging(settings.log_level, settings.log_format)
    return settings


def utf8(value: _Text) -> _Text:
    """Option callback: reject text that is not UTF-8 (argv bytes that decode to lone surrogates).

    Such text cannot be in the ledger or match a record, and the database drivers fail on it.
    """
    for text in [value] if isinstance(value, str) else value or []:
        try:
            text.encode()
        except UnicodeEncodeError:
            raise typer.BadParameter(f"{safe_text(text)} is not UTF-8 text") from None
    return value


def seconds(value: float) -> float:
    """Option callback for --timeout: click's FloatRange lets nan through, and inf or 0 can never work."""
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise typer.BadParameter(f"{value} is not a number of seconds above 0 and at most {MAX_TIMEOUT:g}")
    return value


EventIdOpt = Annotated[str | None, typer.Option("--event-id", help="Only this event.", callback=utf8)]
LimitOpt = Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="Show at most this many, newest first.")]


def timeout_option(what: str) -> Any:
    """The --timeout of a command that reads ``what`` from Kafka."""
    return typer.Option(help=f"Seconds allowed to read {what} (at most {MAX_TIMEOUT:g}).", callback=seconds)


def since_option(what: str) -> Any:
    """--since of a filter on the time ``what`` says (the last attempt, the time received)."""
    return typer.Option(
        help=f"{what} at or after: an ISO time (UTC without an offset) or an age: 30m, 1h, 2d."
    )


def until_option(what: str) -> Any:
    """--until, the other end of :func:`since_option`."""
    return typer.Option(help=f"{what} before: an ISO time or an age, as --since.")


def time_window(since: str | None, until: str | None) -> tuple[datetime | None, datetime | None]:
    """--since and --until read as times; a bad one is a usage error naming its option."""
    from services.common.ops import parse_when

    times: list[datetime | None] = []
    for name, value in (("--since", since), ("--until", until)):
        try:
            times.append(parse_when(value) if value else None)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint=name) from None
    return times[0], times[1]
