"""What one call to a target came to: success, retryable or permanent, classified where it arises."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class OutcomeKind(StrEnum):
    SUCCESS = "success"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: OutcomeKind
    reason: str = ""
    http_status: int | None = None
    vendor_code: str | None = None
    # Seconds the target asked us to wait (Retry-After), if it did.
    retry_after: float | None = None
    # The target's id for what we created (e.g. a Maxma card number), kept in the ledger.
    target_ref: str | None = None
    # True for HTTP 429 and timeouts: the target is overloaded, so back off harder.
    throttle: bool = False
    # The vendor's advice on an error (Maxma's ``hint``), kept in the dead letter's headers.
    hint: str | None = None
    # A success that did nothing on purpose, with why (a stable code for the skip counter).
    skipped: str | None = None
    # Every call of this connection would fail the same way (bad credentials, unknown shop): open its circuit.
    opens_circuit: bool = False
    # No answer came, but the request may have reached the target and taken effect (a read timeout, a
    # dropped connection): a create without a natural key must not be sent again blindly.
    maybe_sent: bool = False

    @classmethod
    def success(
        cls,
        reason: str = "",
        *,
        http_status: int | None = None,
        vendor_code: str | None = None,
        target_ref: str | None = None,
    ) -> Outcome:
        return cls(OutcomeKind.SUCCESS, reason, http_status, vendor_code, None, target_ref)

    @classmethod
    def skip(cls, code: str, reason: str) -> Outcome:
        """Nothing to send for this event (counted by ``code``, e.g. ``no_confirmed_order``)."""
        return cls(OutcomeKind.SUCCESS, reason, skipped=code)

    @classmethod
    def retryable(
        cls,
        reason: str,
        *,
        http_status: int | None = None,
        vendor_code: str | None = None,
        retry_after: float | None = None,
        throttle: bool = False,
        hint: str | None = None,
        maybe_sent: bool = False,
    ) -> Outcome:
        return cls(
            OutcomeKind.RETRYABLE, reason, http_status, vendor_code, retry_after, None, throttle=throttle,
            hint=hint, maybe_sent=maybe_sent,
        )  # fmt: skip

    @classmethod
    def permanent(
        cls,
        reason: str,
        *,
        http_status: int | None = None,
        vendor_code: str | None = None,
        hint: str | None = None,
        opens_circuit: bool = False,
    ) -> Outcome:
        return cls(
            OutcomeKind.PERMANENT, reason, http_status, vendor_code, hint=hint, opens_circuit=opens_circuit
        )

    @classmethod
    def in_doubt(cls, what: str, hint: str) -> Outcome:
        """A create the target cannot dedupe was sent and no answer came back: permanent, never sent twice."""
        return cls(
            OutcomeKind.PERMANENT,
            f"in doubt: {what} was sent and no answer came back (a lost connection, a timeout or a stop); "
            "the target may have it",
            hint=hint,
        )

    @property
    def ok(self) -> bool:
        return self.kind is OutcomeKind.SUCCESS
