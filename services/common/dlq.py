"""Dead-letter records: the original event plus headers that say why, how often and when."""

from __future__ import annotations

from datetime import datetime

from services.common.outcome import Outcome

PREFIX = "relay-dlq-"


def dead_letter_headers(
    outcome: Outcome,
    *,
    target: str,
    connection: str,
    action: str,
    idempotency_key: str,
    attempts: int,
    first_attempt_at: datetime,
    last_attempt_at: datetime,
) -> dict[str, str]:
    headers = {
        f"{PREFIX}reason": outcome.reason[:1000],
        f"{PREFIX}class": outcome.kind.value,
        f"{PREFIX}target": target,
        f"{PREFIX}connection": connection,
        f"{PREFIX}action": action,
        f"{PREFIX}idempotency-key": idempotency_key,
        f"{PREFIX}attempts": str(attempts),
        f"{PREFIX}first-attempt-at": first_attempt_at.isoformat(),
        f"{PREFIX}last-attempt-at": last_attempt_at.isoformat(),
    }
    if outcome.http_status is not None:
        headers[f"{PREFIX}http-status"] = str(outcome.http_status)
    if outcome.vendor_code is not None:
        headers[f"{PREFIX}vendor-code"] = outcome.vendor_code
    if outcome.hint:
        headers[f"{PREFIX}vendor-hint"] = outcome.hint[:1000]
    if outcome.opens_circuit:
        # The connection's circuit opened on this answer: its later events wait (parked) for the fix.
        headers[f"{PREFIX}circuit"] = "opened"
    return headers
