"""`relay ledger`: the ledger's retention, purged on demand (the normalizer also purges every interval)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from services.cli.events import _ledger_failed, _open_ledger
from services.cli.options import read_settings
from services.cli.render import cell, console, utc

if TYPE_CHECKING:
    from services.common.config import Settings
    from services.common.ledger.retention import PurgeReport, RetentionPolicy

ledger_app = typer.Typer(help="The ledger's retention of personal data.", no_args_is_help=True)

# What each table holds, for the operator deciding whether its retention fits.
HOLDS = {
    "events": "raw webhook requests and normalized events",
    "delivery_attempts": "each attempt: the vendor's answer, errors",
    "deliveries": "settled deliveries: the idempotency keys",
    "delivery_steps": "finished steps of those deliveries (the target's ids)",
    "entity_map": "Klientiks id -> the target's id",
    "ingest_dedupe": "fingerprints of recent webhooks",
}


def _days(days: float | None) -> str:
    return "kept" if days is None else f"{days:g} days"


def retention_text(policy: RetentionPolicy) -> dict[str, str]:
    """How long each table keeps its rows, as the table shows it."""
    attempts, deliveries = _days(policy.attempts_days), _days(policy.deliveries_days)
    if policy.deliveries_days is not None:
        attempts += ", or with their delivery"
    entities = _days(policy.entities_days)
    if policy.entities_days is not None:
        entities += ", never a pending one"
    dedupe = "kept" if policy.dedupe_s is None else f"{policy.dedupe_s:g} s (2 x ingest.dedupe_window_s)"
    return {
        "events": _days(policy.events_days),
        "delivery_attempts": attempts,
        "deliveries": deliveries,
        "delivery_steps": f"with their delivery ({deliveries})",
        "entity_map": entities,
        "ingest_dedupe": dedupe,
    }


async def _purge(settings: Settings, dry_run: bool) -> tuple[RetentionPolicy, PurgeReport]:
    from services.common.retention import retention_policy

    policy = retention_policy(settings)
    ledger = _open_ledger(settings)
    try:
        report = await ledger.purge(
            policy, now=datetime.now(UTC), dry_run=dry_run, batch=settings.retention.batch
        )
    finally:
        await ledger.close()
    return policy, report


@ledger_app.command("purge")
def ledger_purge(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be removed; remove nothing.")
    ] = False,
) -> None:
    """Remove the ledger's rows past their retention (retention.* settings), in batches."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.common.ledger.retention import KEPT, TABLES

    settings = read_settings()
    try:
        policy, report = asyncio.run(_purge(settings, dry_run))
    except (SQLAlchemyError, OSError) as e:
        raise _ledger_failed(settings, e) from None
    retention = retention_text(policy)
    verb = "Would remove" if dry_run else "Removed"
    table = Table("Table", "Holds", "Retention", "Cutoff (UTC)", verb)
    for name in TABLES:
        cutoff = report.cutoffs[name]
        table.add_row(
            cell(name), cell(HOLDS[name]), cell(retention[name]), cell(utc(cutoff) if cutoff else "-"),
            cell(report.rows[name]),
        )  # fmt: skip
    console.print(table)
    done = "would be removed (dry run: nothing was)" if dry_run else "removed"
    console.print(Text(f"{report.total} row(s) {done}; {', '.join(KEPT)} hold live work and are kept"))
