"""Crash points for tests that kill a process at an exact moment (``RELAY_FAILPOINTS=a,b``)."""

from __future__ import annotations

import os
import sys

EXIT_CODE = 86


def hit(name: str, enabled: frozenset[str]) -> None:
    """Exit the process at once, without cleanup, if ``name`` is enabled: what SIGKILL would do."""
    if name in enabled:
        sys.stderr.write(f"failpoint {name}: exiting\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)
