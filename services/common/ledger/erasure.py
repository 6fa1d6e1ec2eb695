"""Erasure: one client's personal data masked across the ledger, its ids and delivery states kept."""

from __future__ import annotations

from services.common.ledger.core import LedgerCore


class Erasure(LedgerCore):
    pass
