"""`relay quarantine`: list and replay the inbox records the normalizer set aside."""

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
    from services.common.ops import Quarantined, QuarantineFilter

quarantine_app = typer.Typer(
    help="Inbox records the normalizer could not turn into events, and replaying them.",
    no_args_is_help=True,
)

QReasonOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--reason",
        help="Only this reason code (no_id, bad_body, unknown_source, ...); repeat for more.",
        callback=utf8,
    ),
]
QSourceOpt = Annotated[
    list[str] | None, typer.Option("--source", help="Only this source; repeat for more.", callback=utf8)
]
QEventOpt = Annotated[
    list[str] | None,
    typer.Option("--event", help="Only this webhook (client-created, ...); repeat for more.", callback=utf8),
]
QSinceOpt = Annotated[str | None, since_option("Received")]
QUntilOpt = Annotated[str | None, until_option("Received")]
QReadTimeoutOpt = Annotated[float, timeout_option("the quarantine topic")]


def _filter(
    reason: list[str] | None,
    source: list[str] | None,
    event: list[str] | None,
    since: str | None,
    until: str | None,
    event_id: str | None,
) -> QuarantineFilter:
    from services.common.ops import QuarantineFilter

    after, before = time_window(since, until)
    return QuarantineFilter(
        reasons=tuple(reason or ()),
        sources=tuple(source or ()),
        events=tuple(event or ()),
        since=after,
        until=before,
        event_id=event_id,
    )


def _read(settings: Settings, flt: QuarantineFilter, timeout: float) -> list[Quarantined]:
    from services.common.kafka import QUARANTINE
    from services.common.ops import read_quarantine

    read = read_quarantine(settings.kafka.bootstrap_servers, flt, timeout=timeout)
    return read_topic(settings, QUARANTINE, read)


def _table(records: Sequence[Quarantined], params: bool = False) -> Table:
    from services.common.ops import mask_text, quarantine_params

    columns = ["Received (UTC)", "Source", "Webhook", "Event id", "Reason", "Detail"]
    table = Table(*columns, *(["Parameters"] if params else []))
    for c in table.columns:
        c.overflow = "fold"
    for q in records:
        # Everything read from the record is masked: a bad_record may carry personal data in any field.
        row = [
            cell(utc(q.received_at)),
            *(cell(mask_text(v)) for v in (q.source, q.event, q.event_id, q.reason, q.detail)),
        ]
        if params:
            # One parameter a line: each name and value escaped on its own, so the line breaks stay.
            pairs = quarantine_params(q)
            row.append(Text("\n".join(f"{safe_text(k)}={safe_text(v)}" for k, v in pairs)))
        table.add_row(*row)
    return table


def _per_reason(records: Sequence[Quarantined]) -> str:
    from services.common.ops import mask_text

    return tally((q.reason or "none" for q in records), mask_text)


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
    flt = _filter(reason, source, event, since, until, event_id)
    found = _read(read_settings(), flt, timeout)
    print_newest(
        found,
        when=lambda q: q.received_at,
        limit=limit,
        table=lambda records: _table(records, params),
        none="no quarantined records match",
        summary=f"{len(found)} quarantined record(s) match ({_per_reason(found)})",
    )


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

    settings = read_settings()
    flt = _filter(reason, source, event, since, until, event_id)
    found = _read(settings, flt, timeout)
    # A record quarantined again after an earlier replay is on the topic twice; it goes back once.
    chosen = distinct(found)
    if not chosen:
        console.print("no quarantined records match; nothing to replay")
        return
    repeats = f"; {len(found) - len(chosen)} repeated id(s) counted once" if len(found) > len(chosen) else ""
    console.print(Text(f"{len(chosen)} quarantined record(s) match ({_per_reason(chosen)}){repeats}"))
    if dry_run:
        console.print(_table(chosen))
        console.print(f"dry run: {len(chosen)} would be replayed to {INBOX}; nothing was published")
        return
    if not yes:
        typer.confirm(f"Replay {len(chosen)} record(s) to {INBOX}?", abort=True)
    count = replay_with_progress(
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
