"""The ledger's retention as the normalizer runs it: a purge every ``retention.interval_s``, one replica at a time.

The purge itself (what goes, in batches) is the ledger's (``services/common/ledger/retention.py``); this is
the policy the settings make and the background loop with its metrics. A failed run is logged and counted and
tried again an interval later: it never stops the normalizer.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from services.common.ledger.retention import PURGE_LOCK, TABLES, PurgeReport, RetentionPolicy
from services.common.logging import get_logger
from services.common.metrics import PURGE_LAST_SUCCESS, PURGE_RUNS, PURGED_ROWS

if TYPE_CHECKING:
    from services.common.config import Settings
    from services.common.ledger import Ledger

log = get_logger("relay.retention")

Outcome = Literal["ok", "failed", "skipped"]


def retention_policy(settings: Settings) -> RetentionPolicy:
    """The settings' retention; the dedupe window's memory is twice the window (no setting of its own)."""
    r = settings.retention
    return RetentionPolicy(
        events_days=r.events_days,
        attempts_days=r.attempts_days,
        deliveries_days=r.deliveries_days,
        entities_days=r.entities_days,
        dedupe_s=2 * settings.ingest.dedupe_window_s,
    )


def _count(table: str, rows: int) -> None:
    PURGED_ROWS.labels(table).inc(rows)


class Purger:
    """Purges the ledger every ``retention.interval_s`` while the normalizer runs."""

    def __init__(self, ledger: Ledger, settings: Settings) -> None:
        self.ledger = ledger
        self.policy = retention_policy(settings)
        self.interval_s = settings.retention.interval_s
        self.batch = settings.retention.batch
        self.last: PurgeReport | None = None  # what the last successful run removed
        # Every series from the start: the first failure is an increase, and a table with nothing to purge
        # shows 0 rather than no data.
        for outcome in ("ok", "failed"):
            PURGE_RUNS.labels(outcome)
        for table in TABLES:
            PURGED_ROWS.labels(table)

    async def run_once(self) -> Outcome:
        """One purge: ``skipped`` when another replica holds the lock (PostgreSQL); never raises but cancel."""
        try:
            async with self.ledger.exclusive(PURGE_LOCK) as mine:
                if not mine:
                    log.debug("another process purges the ledger")
                    return "skipped"
                now = datetime.now(UTC)
                report = await self.ledger.purge(self.policy, now=now, batch=self.batch, progress=_count)
        except Exception as e:
            PURGE_RUNS.labels("failed").inc()
            log.error(
                "ledger purge failed; trying again at the next interval",
                interval_s=self.interval_s,
                error=repr(e)[:300],
            )
            return "failed"
        PURGE_RUNS.labels("ok").inc()
        PURGE_LAST_SUCCESS.set_to_current_time()
        self.last = report
        if report.total:
            log.info("ledger purged", **{t: n for t, n in report.rows.items() if n})
        return "ok"

    async def run(self) -> None:
        """Purge now, then every interval, until cancelled."""
        while True:
            await self.run_once()
            await asyncio.sleep(self.interval_s)
