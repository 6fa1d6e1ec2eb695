"""What makes two webhooks the same one: pure functions for the normalizer's dedupe window."""

from __future__ import annotations

import hashlib
import json

from services.common.events import EventName
from services.ingest.parsing import canonical_key


def fingerprint(source: str, event: str, pairs: list[tuple[str, str]]) -> str:
    """Same source, event and parameters (in any order, by any method) give the same fingerprint."""
    canon = sorted((canonical_key(k), v.strip()) for k, v in pairs)
    blob = json.dumps([source, event, canon], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


def scope(source: str, event: str, appointment_id: str | None) -> tuple[str, bool]:
    """The scope a webhook's state belongs to, and whether it replaces the scope's earlier states.

    An appointment's changes carry its whole new state: after A then B, a later A is a change back,
    not a repeat, so each change supersedes the ones before it. Other events are repeats whenever
    they are identical inside the window.
    """
    if event == EventName.APPOINTMENT_CHANGED.value and appointment_id:
        return f"{source}:appointment:{appointment_id}", True
    return f"{source}:{event}", False
