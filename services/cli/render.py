"""How commands print: the two consoles, table cells, UTC times, counts and errors, all safe to show."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.text import Text

from services.common.display import safe_text

if TYPE_CHECKING:
    from services.common.config import ConfigError

console = Console()
err = Console(stderr=True)


def utc(t: datetime) -> str:
    return f"{t.astimezone(UTC):%Y-%m-%d %H:%M:%S}"


def cell(value: object) -> Text:
    # Text, not a str: rich would read "[...]" in vendor messages and masks as markup. Escaped, as it may
    # hold a webhook's escape sequences.
    return Text("" if value is None else safe_text(str(value)))


def why(e: BaseException) -> str:
    # A TimeoutError says nothing in str(e).
    return safe_text(str(e) or type(e).__name__)


def tally(values: Iterable[str], show: Callable[[str], str] = str) -> str:
    """``"a 2, b 1"``: how often each value occurs, sorted by value, each shown through ``show``."""
    return ", ".join(f"{safe_text(show(v))} {n}" for v, n in sorted(Counter(values).items()))


def config_failed(e: ConfigError) -> typer.Exit:
    """Say what is wrong with the configuration; the caller raises the exit (code 2)."""
    err.print(f"[red]{e}[/red]")
    return typer.Exit(2)
