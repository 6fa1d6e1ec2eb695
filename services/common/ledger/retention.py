"""Retention: how long each kind of row keeps personal data, and the batched purge that ends it."""

from __future__ import annotations

from services.common.ledger.core import LedgerCore


class Retention(LedgerCore):
    pass
