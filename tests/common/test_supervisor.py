"""The supervisor of `relay run` on fake processes and a fake clock: restarts, backoff, reset, stop."""

from __future__ import annotations

import itertools
import signal
import subprocess
from pathlib import Path

import pytest

from services.common.supervisor import (
    Backoff,
    Exited,
    Restarted,
    RestartFailed,
    Supervisor,
    describe_status,
)

_pids = itertools.count(1000)


class FakeProc:
    def __init__(self, *, ignores_sigterm: bool = False) -> None:
        self.pid = next(_pids)
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.ignores_sigterm = ignores_sigterm

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if not self.ignores_sigterm:
            self.returncode = -sig

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            raise subprocess.TimeoutExpired("fake", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        self.signals.append(signal.SIGKILL)
        self.returncode = -signal.SIGKILL


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Spawner:
    def __init__(self, **kwargs: bool) -> None:
        self.started: list[FakeProc] = []
        self.fail = False
        self.kwargs = kwargs

    def __call__(self) -> FakeProc:
        if self.fail:
            raise OSError("Too many open files")
        self.started.append(FakeProc(**self.kwargs))
        return self.started[-1]


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_backoff_doubles_from_half_a_second_up_to_thirty() -> None:
    b = Backoff()
    assert [b.delay(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


def test_a_role_that_dies_is_restarted_after_its_delay_and_the_others_are_left_alone(
    clock: Clock, tmp_path: Path
) -> None:
    maxma, api = Spawner(), Spawner()
    sup = Supervisor(
        {"maxma": maxma, "ingest-api": api},
        clock=clock,
        logs={"maxma": tmp_path / "maxma.log"},
        pid_dir=tmp_path / "pids",
    )
    sup.start()
    first = maxma.started[0]
    assert (tmp_path / "pids" / "maxma").read_text() == f"{first.pid}\n"
    assert sup.poll() == []

    first.returncode = -signal.SIGKILL
    clock.now += 1
    assert sup.poll() == [Exited("maxma", -9, 1, 0.5, tmp_path / "maxma.log")]
    assert "maxma" not in sup.procs
    assert not (tmp_path / "pids" / "maxma").exists()
    clock.now += 0.4
    assert sup.poll() == []  # the delay is not over yet
    clock.now += 0.1
    events = sup.poll()
    second = maxma.started[1]
    assert events == [Restarted("maxma", second.pid, 1)]
    assert sup.procs["maxma"] is second
    assert (tmp_path / "pids" / "maxma").read_text() == f"{second.pid}\n"
    assert len(api.started) == 1  # nothing else was touched


def test_a_crash_loop_backs_off_and_a_stable_run_resets_the_backoff(clock: Clock) -> None:
    maxma = Spawner()
    sup = Supervisor({"maxma": maxma}, clock=clock, backoff=Backoff(stable_s=60))
    sup.start()
    delays = []
    for _ in range(8):
        maxma.started[-1].returncode = 1
        clock.now += 0.1  # dies right after each start
        (died,) = sup.poll()
        assert isinstance(died, Exited)
        delays.append(died.delay_s)
        clock.now += died.delay_s
        (back,) = sup.poll()
        assert back == Restarted("maxma", maxma.started[-1].pid, died.attempt)
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30]

    clock.now += 61  # up for longer than stable_s: healthy again
    maxma.started[-1].returncode = 1
    (died,) = sup.poll()
    assert isinstance(died, Exited)
    assert (died.attempt, died.delay_s) == (1, 0.5)


def test_a_restart_that_cannot_spawn_is_tried_again_later(clock: Clock) -> None:
    maxma = Spawner()
    sup = Supervisor({"maxma": maxma}, clock=clock)
    sup.start()
    maxma.started[0].returncode = 3
    maxma.fail = True
    clock.now += 1
    (died,) = sup.poll()
    assert died == Exited("maxma", 3, 1, 0.5, None)
    clock.now += 0.5
    assert sup.poll() == [RestartFailed("maxma", "Too many open files", 2, 1.0)]
    maxma.fail = False
    clock.now += 1
    assert sup.poll() == [Restarted("maxma", maxma.started[-1].pid, 2)]


def test_stop_terminates_every_role_kills_a_stubborn_one_and_restarts_nothing(
    clock: Clock, tmp_path: Path
) -> None:
    polite, stubborn = Spawner(), Spawner(ignores_sigterm=True)
    sup = Supervisor({"polite": polite, "stubborn": stubborn}, clock=clock, pid_dir=tmp_path)
    sup.start()
    sup.stop(grace_s=0)
    assert polite.started[0].signals == [signal.SIGTERM]
    assert stubborn.started[0].signals == [signal.SIGTERM, signal.SIGKILL]
    assert sup.procs == {}
    assert list(tmp_path.iterdir()) == []
    clock.now += 100
    assert sup.poll() == []
    assert len(polite.started) == len(stubborn.started) == 1


def test_a_role_waiting_for_its_restart_is_not_started_by_stop(clock: Clock) -> None:
    maxma = Spawner()
    sup = Supervisor({"maxma": maxma}, clock=clock)
    sup.start()
    maxma.started[0].returncode = 1
    assert len(sup.poll()) == 1
    sup.stop(grace_s=0)
    clock.now += 10
    assert sup.poll() == []
    assert len(maxma.started) == 1


def test_exit_statuses_read_like_the_shell_says_them() -> None:
    assert describe_status(-9) == "killed by SIGKILL"
    assert describe_status(-15) == "killed by SIGTERM"
    assert describe_status(1) == "status 1"
