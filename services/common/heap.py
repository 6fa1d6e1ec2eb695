"""What a long-running role does with its start-up heap (``Settings.gc_freeze``)."""

from __future__ import annotations

import gc


def freeze(enabled: bool) -> None:
    """Move what start-up loaded (modules, schemas, clients: 100k+ objects) out of the collector's sight.

    It lives as long as the process; left in view, every full collection that objects of work in flight
    trigger walks all of it, stalling the process for tens to hundreds of milliseconds.
    """
    if enabled:
        gc.collect()
        gc.freeze()


def unfreeze(enabled: bool) -> None:
    if enabled:
        gc.unfreeze()
