"""Supervision of `relay run`'s roles: a role that exits is started again after a growing delay.

Pure bookkeeping over injected spawn functions and a clock, so it is tested without processes or
sleeping; `relay run` calls :meth:`Supervisor.poll` from its live view and prints what it returns.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = ["Backoff", "Exited", "Process", "RestartFailed", "Restarted", "Supervisor", "describe_status"]


class Process(Protocol):
    """What the supervisor needs of a child (``subprocess.Popen`` has it)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class Backoff:
    """Delay before restart number ``n``: ``first_s`` doubling up to ``max_s``."""

    first_s: float = 0.5
    max_s: float = 30.0
    factor: float = 2.0
    # A role that stayed up this long was healthy: its next death starts again from first_s.
    stable_s: float = 60.0

    def delay(self, attempt: int) -> float:
        return float(min(self.max_s, self.first_s * self.factor ** max(0, attempt - 1)))


@dataclass(frozen=True)
class Exited:
    """A role exited on its own; it will be started again in ``delay_s`` (restart number ``attempt``)."""

    role: str
    status: int
    attempt: int
    delay_s: float
    log: Path | None


@dataclass(frozen=True)
class Restarted:
    role: str
    pid: int
    attempt: int


@dataclass(frozen=True)
class RestartFailed:
    """Starting the role again failed before it ran (the executable, a file descriptor limit, ...)."""

    role: str
    error: str
    attempt: int
    delay_s: float


Event = Exited | Restarted | RestartFailed


def describe_status(status: int) -> str:
    """``-9`` -> ``killed by SIGKILL``; ``1`` -> ``status 1``."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"status {status}"


@dataclass
class _Role:
    spawn: Callable[[], Process]
    proc: Process | None = None
    started_at: float = 0.0
    failures: int = 0  # deaths since the role was last stable
    restart_at: float | None = None


class Supervisor:
    """Starts roles, notices when one exits and starts it again with :class:`Backoff`; stops them all."""

    def __init__(
        self,
        spawners: Mapping[str, Callable[[], Process]],
        *,
        backoff: Backoff | None = None,
        logs: Mapping[str, Path] | None = None,
        pid_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff = backoff or Backoff()
        self._roles = {name: _Role(spawn) for name, spawn in spawners.items()}
        self._logs = dict(logs or {})
        self._pid_dir = pid_dir
        self._clock = clock
        self._stopping = False

    @property
    def procs(self) -> dict[str, Process]:
        """The running child of each role (a role waiting for its restart is absent)."""
        return {name: r.proc for name, r in self._roles.items() if r.proc is not None}

    def start(self) -> None:
        """Start every role once; an error here is the caller's (a role that cannot start at all)."""
        for name, role in self._roles.items():
            self._launch(name, role)

    def _launch(self, name: str, role: _Role) -> Process:
        proc = role.spawn()
        role.proc, role.started_at, role.restart_at = proc, self._clock(), None
        if self._pid_dir is not None:
            # Operators and tests find a role's process here (`kill -9 $(cat .relay/pids/maxma)`).
            self._pid_dir.mkdir(parents=True, exist_ok=True)
            (self._pid_dir / name).write_text(f"{proc.pid}\n")
        return proc

    def _forget_pid(self, name: str) -> None:
        if self._pid_dir is not None:
            (self._pid_dir / name).unlink(missing_ok=True)

    def poll(self) -> list[Event]:
        """Notice exits and start again the roles whose delay is over; what happened, in order."""
        if self._stopping:
            return []
        events: list[Event] = []
        now = self._clock()
        for name, role in self._roles.items():
            if role.proc is not None:
                status = role.proc.poll()
                if status is None:
                    continue
                if now - role.started_at >= self.backoff.stable_s:
                    role.failures = 0
                role.failures += 1
                delay = self.backoff.delay(role.failures)
                role.proc, role.restart_at = None, now + delay
                self._forget_pid(name)
                events.append(Exited(name, status, role.failures, delay, self._logs.get(name)))
            if role.restart_at is not None and now >= role.restart_at:
                try:
                    proc = self._launch(name, role)
                except OSError as e:
                    role.failures += 1
                    delay = self.backoff.delay(role.failures)
                    role.restart_at = now + delay
                    events.append(RestartFailed(name, str(e), role.failures, delay))
                else:
                    events.append(Restarted(name, proc.pid, role.failures))
        return events

    def stop(self, grace_s: float = 25.0) -> None:
        """SIGTERM every role, wait up to ``grace_s`` in all, SIGKILL what is left. No restarts after."""
        self._stopping = True
        running = {name: r.proc for name, r in self._roles.items() if r.proc is not None}
        for proc in running.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = self._clock() + grace_s
        for name, proc in running.items():
            try:
                proc.wait(timeout=max(0.1, deadline - self._clock()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._forget_pid(name)
        for role in self._roles.values():
            role.proc = role.restart_at = None
