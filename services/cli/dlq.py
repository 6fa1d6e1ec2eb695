"""`relay dlq`: list and replay dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from services.cli.options import (
    EventIdOpt,
    LimitOpt,
    read_settings,
    since_option,
    time_window,
    timeout_option,
    until_option,
    utf8,
)
from services.cli.render import cell, console, tally, utc
from services.cli.topics import print_newest, read_topic, replay_with_progress
from services.common.display import safe_text

if TYPE_CHECKING:
    from services.common.config import Settings
    from services.common.ops import DeadLetter, DlqFilter

dlq_app = typer.Typer(help="Dead letters: deliveries given up on, and replaying them.", no_args_is_help=True)

TargetsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--target",
        help="A target whose DLQ to read; repeat for more (default: every target).",
        callback=utf8,
    ),
]
SinceOpt = Annotated[str | None, since_option("Last attempt")]
UntilOpt = Annotated[str | None, until_option("Last attempt")]
ReasonOpt = Annotated[
    str | None, typer.Option(help="Only reasons containing this text (any case).", callback=utf8)
]
ReadTimeoutOpt = Annotated[float, timeout_option("the DLQ topics")]


def _filter(
    targets: list[str] | None, since: str | None, until: str | None, event_id: str | None, reason: str | None
) -> DlqFilter:
    from services.common.config import TARGETS
    from services.common.ops import DlqFilter

    unknown = sorted(set(targets or ()) - set(TARGETS))
    if unknown:
        names = ", ".join(safe_text(t) for t in unknown)
        raise typer.BadParameter(f"unknown target {names}; use one of {', '.join(TARGETS)}")
    after, before = time_window(since, until)
    return DlqFilter(
        targets=tuple(dict.fromkeys(targets or TARGETS)),
        since=after,
        until=before,
        event_id=event_id,
        reason=reason,
    )


def _read(settings: Settings, flt: DlqFilter, timeout: float) -> list[DeadLetter]:
    from services.common.ops import read_dlq

    read = read_dlq(settings.kafka.bootstrap_servers, flt.targets, flt, timeout=timeout)
    return read_topic(settings, "the DLQ topics", read)


def _table(dead_letters: Sequence[DeadLetter]) -> Table:
    from services.common.ops import mask_text

    table = Table(
        "Last attempt (UTC)", "Target", "Connection", "Action", "Event id", "Class", "HTTP",
        "Vendor code", "Attempts", "Reason",
    )  # fmt: skip
    for c in table.columns:
        c.overflow = "fold"  # never cut an event id short: it is what you copy into other commands
    for dl in dead_letters:
        table.add_row(
            cell(utc(dl.last_attempt_at)), cell(dl.target), cell(dl.conn_id), cell(dl.action),
            cell(dl.event_id), cell(dl.class_), cell(dl.http_status), cell(dl.vendor_code),
            cell(dl.attempts), cell(mask_text(_why(dl))),
        )  # fmt: skip
    return table


def _why(dl: DeadLetter) -> str:
    """The reason, the vendor's hint, and whether the connection's circuit opened on it."""
    why = dl.reason
    if dl.hint:
        why += f" (hint: {dl.hint})"
    if dl.opened_circuit:
        why += " [circuit opened: the connection's deliveries wait until this is fixed]"
    return why


def _per_target(dead_letters: Sequence[DeadLetter]) -> str:
    return tally(dl.target for dl in dead_letters)


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
    flt = _filter(target, since, until, event_id, reason)
    found = _read(read_settings(), flt, timeout)
    print_newest(
        found,
        when=lambda d: d.last_attempt_at,
        limit=limit,
        table=_table,
        none="no dead letters match",
        summary=f"{len(found)} dead letter(s) match ({_per_target(found)})",
    )


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

    settings = read_settings()
    flt = _filter(target, since, until, event_id, reason)
    found = _read(settings, flt, timeout)
    if not found:
        console.print("no dead letters match; nothing to replay")
        return
    console.print(Text(f"{len(found)} dead letter(s) match ({_per_target(found)})"))
    if dry_run:
        console.print(_table(sorted(found, key=lambda d: d.last_attempt_at)))
        console.print(f"dry run: {len(found)} would be replayed to {EVENTS}; nothing was published")
        return
    if not yes:
        typer.confirm(f"Replay {len(found)} dead letter(s) to {EVENTS}?", abort=True)
    count = replay_with_progress(
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
