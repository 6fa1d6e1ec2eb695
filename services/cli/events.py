"""`relay events`: the event history kept in the ledger, one event in full or found by phone or client id, and
one client's personal data erased (`forget`)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from services.cli.options import MAX_LIMIT, read_settings, timeout_option, utf8
from services.cli.render import cell, console, err, utc, why
from services.common.display import safe_text

if TYPE_CHECKING:
    from services.common.config import Settings
    from services.common.ledger import Delivery, EventRecord, Ledger
    from services.common.ledger.erasure import ClientMatch, ErasureReport

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
    from services.common.ledger.erasure import forgotten_at

    table = Table(show_header=False, box=None, title=Text(f"Event {safe_text(record.id)}", style="bold"))
    erased = forgotten_at(record.inbox)
    status = f"quarantined: {record.quarantine_reason}" if record.quarantine_reason else "normalized"
    if not record.quarantine_reason and record.normalized is None and erased is None:
        status = "not normalized"
    if record.duplicate_of:
        status = f"dropped: a repeat of {record.duplicate_of} inside the dedupe window"
    if erased is not None:
        status += f"; personal data erased on request ({utc(erased)} UTC)"
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
    if _erased(record):
        return
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
    if _erased(record):
        return
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


def _erased(record: EventRecord) -> bool:
    """Say so if the event's personal data was erased (`relay events forget`): nothing of it is left to show."""
    from services.common.ledger.erasure import forgotten_at

    if forgotten_at(record.inbox) is None:
        return False
    console.print("erased on request (`relay events forget`); the ids and delivery states are kept")
    return True


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


# ------------------------------------------------------------------------------------------------ forget

# `relay events forget`: the ledger erased, the topics could not be read (no other command exits 3).
BROKER_UNREACHABLE = 3


def _retention(topic: str) -> timedelta:
    """How long ``topic`` keeps a record, as the relay creates it; a broker set otherwise keeps it that long."""
    from services.common.kafka import retention_ms

    return timedelta(milliseconds=retention_ms(topic))


@dataclass(frozen=True)
class HeldRecord:
    """A Kafka record that holds the client (Kafka cannot delete one record: its topic's retention will)."""

    topic: str
    partition: int
    offset: int
    event_id: str
    timestamp: datetime  # when it was written to the topic
    what: str  # "dead letter maxma salon/maxma new-client", "quarantined: no_id"

    @property
    def retention_ends(self) -> datetime:
        return self.timestamp + _retention(self.topic)


async def client_records(
    bootstrap: str,
    match: ClientMatch,
    event_ids: Iterable[str],
    *,
    timeout: float,  # noqa: ASYNC109 - as read_dlq's
) -> list[HeldRecord]:
    """The dead letters and quarantined records of the client: by event id, or naming the client's id or phone.

    Read from the start of each topic to its end as of now, with no consumer group (nothing committed).
    Raise as :func:`services.common.ops.read_dlq` does.
    """
    from services.common import targets
    from services.common.ops import (
        DeadLetter,
        DlqFilter,
        Quarantined,
        QuarantineFilter,
        read_dlq,
        read_quarantine,
    )

    ids = frozenset(event_ids)

    class Letters(DlqFilter):
        def matches(self, dl: DeadLetter) -> bool:
            # A dead letter's value is the event's data: the phone in it is E.164 already.
            return dl.source == match.source and (dl.event_id in ids or match.holds_event_data(dl.value))

    class Records(QuarantineFilter):
        def matches(self, q: Quarantined) -> bool:
            return q.source == match.source and (q.event_id in ids or match.holds_inbox(q.value))

    letters, quarantined = await asyncio.gather(
        read_dlq(bootstrap, targets.names(), Letters(), timeout=timeout),
        read_quarantine(bootstrap, Records(), timeout=timeout),
    )
    return [
        *(HeldRecord(d.topic, d.partition, d.offset, d.event_id, d.timestamp,
                     f"dead letter {d.target} {d.conn_id} {d.action}") for d in letters),
        *(HeldRecord(q.topic, q.partition, q.offset, q.event_id, q.timestamp, f"quarantined: {q.reason}")
          for q in quarantined),
    ]  # fmt: skip


def _who(source: str, client_id: str | None, e164: str | None) -> str:
    from services.common.masking import mask_phone

    parts = [f"client {client_id}" if client_id else None, f"phone {mask_phone(e164)}" if e164 else None]
    return f"{' or '.join(p for p in parts if p)} of source {source}"


_KEPT = {
    "events": "id, source, webhook, time received, client id, Kafka key, quarantine reason",
    "deliveries": "idempotency key, status, attempts, HTTP status, vendor code, target id",
    "delivery_attempts": "number, time, duration, outcome, HTTP status, vendor code",
    "delivery_steps": "every step's result (the target's ids)",
    "parked": "",
    "entity_map": "the target's ids (they stop a duplicate create)",
    "ingest_dedupe": "",
    "ingest_spool": "",
    "ingest_waiting": "",
}


def _erasure_table(report: ErasureReport, title: str) -> Table:
    masked, deleted = ("Would mask", "Would delete") if report.dry_run else ("Masked", "Deleted")
    table = Table("Table", "Rows of the client", masked, deleted, "Kept", title=Text(title, style="bold"))
    table.columns[-1].overflow = "fold"
    for t in report.tables:
        table.add_row(cell(t.table), cell(t.matched), cell(t.masked), cell(t.deleted),
                      cell(_KEPT.get(t.table, "") if t.matched else ""))  # fmt: skip
    return table


def _print_erasure(report: ErasureReport, who: str) -> None:
    from services.common.ledger.erasure import ERASED

    console.print(_erasure_table(report, f"The ledger's rows of {who}"))
    ids = ", ".join(safe_text(c) for c in report.client_ids) or "none"
    console.print(Text(f"{len(report.event_ids)} event(s) of client id(s) {ids}"))
    if report.settled:
        n = len(report.settled)
        verb = "would be" if report.dry_run else "was" if n == 1 else "were"
        console.print(
            Text(
                f"{n} parked deliver{'y' if n == 1 else 'ies'} {verb} settled as failed ({ERASED}): "
                f"{'it' if n == 1 else 'they'} will not happen"
            )
        )
        for key in report.settled:
            console.print(Text(f"  {safe_text(key)}"))
    if report.in_flight:
        console.print(
            Text(
                f"{len(report.in_flight)} pending deliver{'y' if len(report.in_flight) == 1 else 'ies'}: a "
                "delivery service may still send what they carry; run this again once they settle"
            )
        )


def _print_held(records: Sequence[HeldRecord], report: ErasureReport) -> None:
    from services.common.kafka import EVENTS, INBOX
    from services.common.ops import mask_text

    if records:
        table = Table("Topic", "Partition", "Offset", "Event id", "Record", "Written (UTC)",
                      "Retention ends (UTC)", title=Text("Kafka records that hold the client", style="bold"))  # fmt: skip
        for c in table.columns:
            c.overflow = "fold"
        for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
            table.add_row(cell(r.topic), cell(r.partition), cell(r.offset), cell(mask_text(r.event_id)),
                          cell(mask_text(r.what)), cell(utc(r.timestamp)), cell(utc(r.retention_ends)))  # fmt: skip
        console.print(table)
        console.print(
            Text(
                f"{len(records)} dead letter(s) and quarantined record(s) hold the client; Kafka cannot delete "
                "one record, their topic's retention removes them. Do not replay them: a replay brings the "
                "data back to the ledger and the targets."
            )
        )
    else:
        console.print("no dead letters or quarantined records hold the client")
    # Listing these would mean reading both topics whole: their retention is given instead.
    note = (
        f"{INBOX} (retention {_retention(INBOX).days} d) and {EVENTS} ({_retention(EVENTS).days} d) hold the "
        "client's webhooks and events until their retention ends"
    )
    if report.newest_received is not None:
        last = report.newest_received + max(_retention(INBOX), _retention(EVENTS))
        note += f": for the newest of them at {utc(last)} UTC"
    console.print(Text(f"{note} (Kafka deletes whole log segments: a record may stay somewhat longer)"))


async def _forget(
    settings: Settings, source: str, client_id: str | None, e164: str | None, region: str, dry_run: bool
) -> ErasureReport:
    ledger = _open_ledger(settings)
    try:
        return await ledger.forget_client(
            source=source, client_id=client_id, phone=e164, phone_region=region, dry_run=dry_run
        )
    finally:
        await ledger.close()


@events_app.command("forget")
def events_forget(
    source: Annotated[str, typer.Option(help="The client's source (the Klientiks account).", callback=utf8)],
    client_id: Annotated[
        str | None, typer.Option("--client-id", help="The Klientiks client id.", callback=utf8)
    ] = None,
    phone: Annotated[
        str | None, typer.Option(help="The client's phone in any spelling.", callback=utf8)
    ] = None,
    region: Annotated[
        str | None,
        typer.Option(
            help="Phone region for numbers without a country code (default: the source's phone_region).",
            callback=utf8,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be erased; change nothing.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    timeout: Annotated[float, timeout_option("the DLQ and quarantine topics")] = 30.0,
) -> None:
    """Erase one client's personal data from the ledger; list the Kafka records that still hold it.

    Ids and delivery states stay, so nothing is delivered twice (docs/personal-data.md). Exit 3: the ledger
    is done but the DLQ and quarantine topics could not be read.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from services.common.ledger import PhoneSearchUnavailable
    from services.common.masking import mask_phone
    from services.ingest.parsing import normalize_phone

    if not phone and not client_id:
        raise typer.BadParameter("give --client-id or --phone (or both)")
    settings = read_settings()
    configured = next((s for s in settings.sources if s.name == source), None)
    region = (region or (configured.phone_region if configured else "RU")).upper()
    e164 = None
    if phone:
        e164 = normalize_phone(phone, region)
        if e164 is None:
            raise typer.BadParameter(
                f"{safe_text(mask_phone(phone))} is not a valid phone number of region {safe_text(region)}",
                param_hint="--phone",
            )
        if settings.phone_hash_key is None:
            err.print(str(PhoneSearchUnavailable()), style="red", markup=False)
            raise typer.Exit(2)
    who = safe_text(_who(source, client_id, e164))

    def erase(dry: bool) -> ErasureReport:
        try:
            return asyncio.run(_forget(settings, source, client_id, e164, region, dry))
        except (SQLAlchemyError, OSError) as e:
            raise _ledger_failed(settings, e) from None

    report = erase(dry_run or not yes)
    if not report.found:
        console.print(Text(f"nothing found in the ledger for {who}"))
    elif report.changes == 0:
        _print_erasure(report, who)
        console.print("nothing left to erase: the ledger holds no personal data of this client any more")
    elif dry_run:
        _print_erasure(report, who)
        console.print("dry run: nothing was changed")
    else:
        if not yes:
            _print_erasure(report, who)
            typer.confirm(f"Erase the personal data of {who}?", abort=True)
            report = erase(False)
        _print_erasure(report, who)
        console.print(Text(f"erased: {report.changes} row(s) masked or deleted"))
    _list_kafka(settings, report, e164, region, timeout)


def _list_kafka(
    settings: Settings, report: ErasureReport, e164: str | None, region: str, timeout: float
) -> None:
    """The client's dead letters and quarantined records; an unreachable broker warns and exits 3."""
    from aiokafka.errors import KafkaError

    from services.common.ledger.erasure import ClientMatch

    match = ClientMatch(report.source, frozenset(report.client_ids), e164, region)
    bootstrap = settings.kafka.bootstrap_servers
    try:
        held = asyncio.run(client_records(bootstrap, match, report.event_ids, timeout=timeout))
    except (TimeoutError, KafkaError, OSError) as e:
        done = "nothing was changed" if report.dry_run or not report.changes else "the ledger is erased"
        err.print(
            Text(
                f"warning: cannot read the DLQ and quarantine topics from {safe_text(bootstrap)}: {why(e)}; "
                f"{done}; list them later: the same command with --dry-run",
                style="yellow",
            )
        )
        raise typer.Exit(BROKER_UNREACHABLE) from None
    _print_held(held, report)
