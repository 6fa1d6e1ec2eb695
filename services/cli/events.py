"""`relay events`: the event history kept in the ledger, one event in full or found by phone or client id."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from services.cli.options import MAX_LIMIT, read_settings, utf8
from services.cli.render import cell, console, err, utc, why
from services.common.display import safe_text

if TYPE_CHECKING:
    from services.common.config import Settings
    from services.common.ledger import Delivery, EventRecord, Ledger

events_app = typer.Typer(help="The event history kept in the ledger.", no_args_is_help=True)


def _ledger_url_problem(url: str) -> str | None:
    """Why ``url`` cannot be the ledger, without creating an empty SQLite file as a side effect."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:
        return "not a database URL"
    db = parsed.database
    if parsed.get_backend_name() == "sqlite" and db and db != ":memory:" and not Path(db).exists():
        return "the SQLite file does not exist"
    return None


def _open_ledger(settings: Settings) -> Ledger:
    from services.common.ledger import Ledger
    from services.common.logging import redact_url

    problem = _ledger_url_problem(settings.database_url)
    if problem:
        err.print(
            Text(
                f"cannot open the ledger {safe_text(redact_url(settings.database_url))}: {problem}; "
                "fix: set RELAY_DATABASE_URL to the services' database",
                style="red",
            )
        )
        raise typer.Exit(2)
    return Ledger.from_url(settings.database_url, phone_key=settings.phone_hash_key)


def _ledger_failed(settings: Settings, e: Exception) -> typer.Exit:
    from services.common.logging import redact_url
    from services.common.ops import mask_text

    first = (str(e).splitlines() or [type(e).__name__])[0]
    err.print(
        Text(
            f"cannot read the ledger {safe_text(redact_url(settings.database_url))}: "
            f"{safe_text(mask_text(first))}; fix: check RELAY_DATABASE_URL and run `relay db upgrade`",
            style="red",
        )
    )
    return typer.Exit(2)


async def _load_event(
    settings: Settings, event_id: str
) -> tuple[EventRecord, list[Delivery], dict[str, list[Any]]] | None:
    ledger = _open_ledger(settings)
    try:
        record = await ledger.event(event_id)
        if record is None:
            return None
        deliveries = await ledger.for_event(event_id)
        attempts = {d.idempotency_key: await ledger.attempts(d.idempotency_key) for d in deliveries}
        return record, deliveries, attempts
    finally:
        await ledger.close()


@events_app.command("show")
def events_show(
    event_id: Annotated[
        str, typer.Argument(help="The event id (the ingest API's answer, or ce_id).", callback=utf8)
    ],
) -> None:
    """What arrived, what it was normalized to, and every delivery attempt (personal data masked)."""
    from sqlalchemy.exc import SQLAlchemyError

    settings = read_settings()
    try:
        found = asyncio.run(_load_event(settings, event_id))
    except (SQLAlchemyError, OSError) as e:
        raise _ledger_failed(settings, e) from None
    if found is None:
        err.print(Text(f"no event '{safe_text(event_id)}' in the ledger", style="red"))
        raise typer.Exit(1)
    record, deliveries, attempts = found
    _print_event_header(record)
    _print_arrived(record)
    _print_normalized(record)
    _print_deliveries(deliveries, attempts)


def _print_event_header(record: EventRecord) -> None:
    table = Table(show_header=False, box=None, title=Text(f"Event {safe_text(record.id)}", style="bold"))
    status = f"quarantined: {record.quarantine_reason}" if record.quarantine_reason else "normalized"
    if not record.quarantine_reason and record.normalized is None:
        status = "not normalized"
    if record.duplicate_of:
        status = f"dropped: a repeat of {record.duplicate_of} inside the dedupe window"
    for name, value in (
        ("Source", record.source),
        ("Webhook", record.event),
        ("Received (UTC)", utc(record.received_at)),
        ("Kafka key", record.kafka_key),
        ("Status", status),
    ):
        table.add_row(cell(name), cell(value))
    console.print(table)


def _print_arrived(record: EventRecord) -> None:
    from urllib.parse import parse_qsl

    from pydantic import ValidationError

    from services.common.ops import mask_pairs, mask_text
    from services.ingest.inbox import InboxRecord
    from services.ingest.parsing import ParamsError, request_params

    console.print(Text("\nWhat arrived", style="bold"))
    try:
        inbox = InboxRecord.from_bytes(record.inbox.encode())
    except ValidationError:
        console.print(Text(f"an unreadable inbox record: {safe_text(mask_text(record.inbox))}"))
        return
    console.print(
        Text(
            f"{safe_text(inbox.method)} at {utc(inbox.received_at)} UTC, "
            f"content type {safe_text(inbox.content_type or 'none')}"
        )
    )
    try:
        pairs = request_params(inbox.query, inbox.content_type, inbox.body_bytes())
    except ParamsError as e:
        pairs = parse_qsl(inbox.query, keep_blank_values=True)
        body = mask_text(inbox.body or "<binary>")
        console.print(Text(f"the body could not be read ({why(e)}): {safe_text(body)}"))
    table = Table("Parameter", "Value")
    table.columns[1].overflow = "fold"
    for name, value in mask_pairs(pairs):
        table.add_row(cell(name), cell(value))
    console.print(table)


def _print_normalized(record: EventRecord) -> None:
    import json

    from rich.highlighter import JSONHighlighter

    from services.common.display import safe_json
    from services.common.ops import mask_data, mask_text

    console.print(Text("\nHow it was normalized", style="bold"))
    if record.normalized is None:
        console.print(Text(f"quarantined: {safe_text(record.quarantine_reason or 'no reason recorded')}"))
        return
    try:
        data = json.loads(record.normalized)
    except ValueError:
        console.print(Text(safe_text(mask_text(record.normalized))))
        return
    # Not console.print_json: its json.dumps leaves DEL, C1 controls, bidi marks and lone surrogates raw (a
    # "\ud800" escape in the record's JSON is one), and printing a surrogate raises UnicodeEncodeError.
    text = JSONHighlighter()(safe_json(mask_data(data)))
    text.no_wrap = True
    console.print(text, soft_wrap=True)


def _print_deliveries(deliveries: Sequence[Delivery], attempts: dict[str, list[Any]]) -> None:
    from services.common.ops import mask_text

    console.print(Text("\nDeliveries", style="bold"))
    if not deliveries:
        console.print("none recorded: no connection takes this event, or no delivery service has seen it yet")
        return
    summary = Table("Target", "Connection", "Action", "Status", "Attempts", "Updated (UTC)", "Target ref")
    for d in sorted(deliveries, key=lambda d: (d.target, d.id)):
        summary.add_row(
            cell(d.target), cell(f"{d.source}/{d.connection}"), cell(d.action), cell(d.status.value),
            cell(d.attempts), cell(utc(d.updated_at)), cell(d.target_ref),
        )  # fmt: skip
    console.print(summary)
    for d in sorted(deliveries, key=lambda d: (d.target, d.id)):
        table = Table(
            "#", "Started (UTC)", "Duration ms", "Outcome", "HTTP", "Vendor code", "Error",
            title=Text(safe_text(f"{d.target} {d.source}/{d.connection} {d.action}: {d.status.value}")),
        )  # fmt: skip
        table.columns[-1].overflow = "fold"
        for a in attempts.get(d.idempotency_key, []):
            table.add_row(
                cell(a.number), cell(utc(a.started_at)), cell(f"{a.duration_ms:.1f}"), cell(a.outcome),
                cell(a.http_status), cell(a.vendor_code), cell(mask_text(a.error) if a.error else None),
            )  # fmt: skip
        console.print(table)


async def _find_events(
    settings: Settings, phone: str | None, client_id: str | None, source: str | None, limit: int
) -> list[tuple[EventRecord, list[Delivery]]]:
    ledger = _open_ledger(settings)
    try:
        records = await ledger.find_events(phone=phone, client_id=client_id, source=source, limit=limit)
        return [(r, await ledger.for_event(r.id)) for r in records]
    finally:
        await ledger.close()


@events_app.command("find")
def events_find(
    phone: Annotated[
        str | None, typer.Option(help="The client's phone in any spelling.", callback=utf8)
    ] = None,
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="The Klientiks client id.", callback=utf8)
    ] = None,
    source: Annotated[str | None, typer.Option(help="Only this source.", callback=utf8)] = None,
    region: Annotated[
        str, typer.Option(help="Phone region for numbers without a country code.", callback=utf8)
    ] = "RU",
    limit: Annotated[int, typer.Option(min=1, max=MAX_LIMIT, help="At most this many, newest first.")] = 20,
) -> None:
    """Find events by the client's phone or id, newest first."""
    from sqlalchemy.exc import SQLAlchemyError

    from services.common.logging import mask_phone
    from services.ingest.parsing import normalize_phone

    if not phone and not client_id:
        raise typer.BadParameter("give --phone or --client-id")
    e164 = None
    if phone:
        e164 = normalize_phone(phone, region.upper())
        if e164 is None:
            raise typer.BadParameter(
                f"{safe_text(mask_phone(phone))} is not a valid phone number of region "
                f"{safe_text(region.upper())}",
                param_hint="--phone",
            )
    settings = read_settings()
    if e164 and settings.phone_hash_key is None:
        from services.common.ledger import PhoneSearchUnavailable

        err.print(str(PhoneSearchUnavailable()), style="red", markup=False)
        raise typer.Exit(2)
    try:
        found = asyncio.run(_find_events(settings, e164, client_id, source, limit))
    except (SQLAlchemyError, OSError) as e:
        raise _ledger_failed(settings, e) from None
    if not found:
        console.print("no events found")
        return
    table = Table("Received (UTC)", "Event id", "Source", "Webhook", "Client id", "Deliveries")
    table.columns[1].overflow = "fold"
    for r, deliveries in found:
        statuses = ", ".join(f"{d.target}/{d.action} {d.status.value}" for d in deliveries) or "none"
        table.add_row(
            cell(utc(r.received_at)), cell(r.id), cell(r.source), cell(r.event), cell(r.client_id),
            cell(statuses),
        )  # fmt: skip
    console.print(table)
    console.print(f"{len(found)} event(s); `relay events show ID` shows one in full")
