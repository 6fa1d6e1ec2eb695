"""What `relay dlq` and `relay quarantine` share: reading their topics, the list body, a replay's progress."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.table import Table
from rich.text import Text

from services.cli.render import console, err, why
from services.common.display import safe_text

if TYPE_CHECKING:
    from services.common.config import Settings

T = TypeVar("T")


def read_topic(settings: Settings, what: str, read: Coroutine[Any, Any, list[T]]) -> list[T]:
    """Run ``read``; a broker that cannot be reached in time says so and exits 1."""
    from aiokafka.errors import KafkaError

    try:
        return asyncio.run(read)
    except (TimeoutError, KafkaError, OSError) as e:
        err.print(
            Text(
                f"cannot read {what} from {safe_text(settings.kafka.bootstrap_servers)}: {why(e)}; "
                "fix: check RELAY_KAFKA__BOOTSTRAP_SERVERS, or raise --timeout",
                style="red",
            )
        )
        raise typer.Exit(1) from None


def print_newest(
    found: Sequence[T],
    *,
    when: Callable[[T], datetime],
    limit: int,
    table: Callable[[Sequence[T]], Table],
    none: str,
    summary: str,
) -> None:
    """The newest ``limit`` of ``found`` in a table, then ``summary`` (how many match); ``none`` if none."""
    if not found:
        console.print(none)
        return
    newest = sorted(found, key=when, reverse=True)[:limit]
    console.print(table(newest))
    shown = f", showing the newest {len(newest)}" if len(newest) < len(found) else ""
    # Text, not markup: the counts name what the records say, and a reason like "[/]" would be read as a tag.
    console.print(Text(f"{summary}{shown}"))


def replay_with_progress(
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
                    f"replay stopped after {done} of {total}: {why(e)}; "
                    f"running the same command again is safe ({why_safe})",
                    style="red",
                )
            )
            raise typer.Exit(1) from None
