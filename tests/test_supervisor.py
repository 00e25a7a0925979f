"""The supervisor's decisions with a fake clock and fake processes: READY deadlines, heartbeat
silence, restarts with backoff, the crash-loop guard (and what it does not count), start failures,
stopping."""

from __future__ import annotations

import itertools
import signal
from typing import Any

import pytest

from shardpool.config import SupervisorConfig
from shardpool.supervisor import (
    GiveUp,
    Killed,
    Restart,
    Spawned,
    StartFailed,
    Stopped,
    Supervisor,
    WorkerState,
)

_fds = itertools.count(100)
_pids = itertools.count(5000)


class FakeProcess:
    def __init__(self, index: int, epoch: int) -> None:
        self.index, self.epoch = index, epoch
        self.pid: int | None = None
        self.sentinel = next(_fds)
        self.exitcode: int | None = None
        self.signals: list[str] = []

    def start(self) -> None:
        self.pid = next(_pids)

    def kill(self) -> None:
        self.signals.append("kill")
        self.exitcode = -signal.SIGKILL

    def terminate(self) -> None:
        self.signals.append("term")

    def join(self, timeout: float) -> int | None:
        return self.exitcode

    def reap(self, timeout: float = 2.0) -> int | None:
        return self.exitcode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    workers: int = 1, fail_spawn: bool = False, **cfg: Any
) -> tuple[Supervisor, Clock, list[FakeProcess]]:
    settings = dict(
        ready_timeout_s=5.0,
        heartbeat_timeout_s=2.0,
        restart_backoff_s=0.1,
        restart_backoff_max_s=0.4,
        max_restarts=3,
        restart_window_s=60.0,
    )
    settings.update(cfg)
    clock = Clock()
    procs: list[FakeProcess] = []

    def spawn(index: int, epoch: int) -> FakeProcess:
        if fail_spawn and epoch > 1:
            raise OSError("no more processes")
        procs.append(FakeProcess(index, epoch))
        return procs[-1]

    return Supervisor(workers, SupervisorConfig(**settings), spawn, clock), clock, procs


def caught_up() -> bool:
    return True


def die(sup: Supervisor, index: int, code: int, explained: bool = False) -> Any:
    proc = sup.workers[index].proc
    assert proc is not None
    proc.exitcode = code  # type: ignore[attr-defined]
    return sup.after_death(sup.reap(index), explained)


def test_a_worker_that_misses_its_ready_deadline_is_killed_and_fails_the_start() -> None:
    sup, clock, procs = make()
    sup.start(0)
    assert sup.workers[0].state is WorkerState.STARTING
    assert sup.sentinels() == {procs[0].sentinel: 0}
    clock.now += 4.9
    assert sup.tick(caught_up) == ([], None)
    clock.now += 0.2
    assert sup.tick(lambda: False) == ([], None)  # frames unread: not judged yet
    decisions, _ = sup.tick(caught_up)
    assert decisions == [Killed(0, "no READY within 5.0 s")] and procs[0].signals == ["kill"]
    decision = die(sup, 0, -9)
    assert isinstance(decision, StartFailed)
    assert str(decision.error) == "worker 0 killed by SIGKILL before READY (no READY within 5.0 s)"
    assert decision.error.exitcodes == {0: -9}


def test_heartbeat_silence_kills_a_ready_worker_once() -> None:
    sup, clock, procs = make()
    sup.start(0)
    assert sup.on_ready(0) and not sup.on_ready(0)
    clock.now += 1.5
    sup.heard(0)
    clock.now += 1.9
    assert sup.tick(caught_up)[0] == []
    clock.now += 0.2
    decisions, _ = sup.tick(caught_up)
    assert [type(d) for d in decisions] == [Killed] and "no heartbeat for 2.1 s" in decisions[
        0
    ].reason
    assert sup.tick(caught_up)[0] == []  # killed once; the sentinel takes it from here
    death = sup.reap(0)
    assert death.hung and death.cause.startswith("killed by SIGKILL (no heartbeat")


def test_a_death_restarts_after_a_growing_backoff_then_the_guard_gives_up() -> None:
    sup, clock, procs = make()
    sup.start(0)
    sup.on_ready(0)
    delays = []
    for _ in range(3):
        decision = die(sup, 0, -11)
        assert isinstance(decision, Restart) and decision.counted
        delays.append(decision.delay)
        assert sup.workers[0].state is WorkerState.DEAD and sup.sentinels() == {}
        clock.now += decision.delay - 0.01
        assert sup.tick(caught_up)[0] == []
        clock.now += 0.02
        decisions, _ = sup.tick(caught_up)
        assert decisions == [Spawned(0, procs[-1].pid)]
        sup.on_ready(0)
    assert delays == [0.1, 0.2, 0.4]
    assert [p.epoch for p in procs] == [1, 2, 3, 4] and sup.workers[0].restarts == 3
    decision = die(sup, 0, -11)
    assert isinstance(decision, GiveUp) and sup.workers[0].state is WorkerState.BROKEN
    assert "keeps dying (3 restarts within 60.0 s); last: killed by SIGSEGV" in str(decision.error)
    assert decision.error.exitcodes == {0: -11}


def test_deaths_a_message_explains_do_not_count_towards_the_guard() -> None:
    sup, clock, _ = make(max_restarts=1)
    sup.start(0)
    sup.on_ready(0)
    for _ in range(10):
        decision = die(sup, 0, -11, explained=True)
        assert decision == Restart(0, 0.1, counted=False)
        clock.now += 0.1
        sup.tick(caught_up)
        sup.on_ready(0)
    assert isinstance(die(sup, 0, -11), Restart)  # the first unexplained one is still allowed
    clock.now += 1
    sup.tick(caught_up)
    sup.on_ready(0)
    assert isinstance(die(sup, 0, -11), GiveUp)


def test_the_guard_forgets_deaths_older_than_its_window() -> None:
    sup, clock, _ = make(max_restarts=1, restart_window_s=10.0)
    sup.start(0)
    for _ in range(3):
        sup.on_ready(0)
        assert isinstance(die(sup, 0, 1), Restart)
        clock.now += 11
        sup.tick(caught_up)


def test_a_failed_respawn_gives_up() -> None:
    sup, clock, _ = make(fail_spawn=True)
    sup.start(0)
    sup.on_ready(0)
    die(sup, 0, 1)
    clock.now += 1
    decisions, _ = sup.tick(caught_up)
    [give_up] = decisions
    assert isinstance(give_up, GiveUp) and "could not be respawned" in str(give_up.error)
    assert sup.workers[0].state is WorkerState.BROKEN


def test_stop_all_asks_running_workers_and_settles_the_dead() -> None:
    sup, clock, procs = make(workers=3)
    for i in range(3):
        sup.start(i)
    sup.on_ready(0)
    sup.on_ready(1)
    die(sup, 1, -9)  # worker 1 waits for its restart
    sup.stop_all()
    assert [w.state for w in sup.workers] == [
        WorkerState.STOPPING,
        WorkerState.STOPPED,
        WorkerState.STOPPING,
    ]
    assert procs[0].signals == ["term"] and procs[2].signals == ["term"]
    assert sup.stopping() == [0, 2]
    assert die(sup, 0, 0) == Stopped(0)
    assert sup.kill_stopping() == [2] and procs[2].signals == ["term", "kill"]
    assert die(sup, 2, -9) == Stopped(2) and sup.stopping() == []
    clock.now += 10
    assert sup.tick(caught_up)[0] == []  # nothing restarts once stopping


def test_halt_stops_every_restart() -> None:
    sup, clock, _ = make()
    sup.start(0)
    sup.on_ready(0)
    die(sup, 0, 1)
    sup.halt()
    assert sup.workers[0].state is WorkerState.BROKEN
    clock.now += 10
    assert sup.tick(caught_up)[0] == []


@pytest.mark.parametrize(
    "code, words",
    [
        (0, "exited cleanly"),
        (3, "failed to start its handler"),
        (-15, "killed by SIGTERM"),
        (71, "exited with code 71"),
    ],
)
def test_exit_codes_are_named(code: int, words: str) -> None:
    from shardpool.supervisor import describe_exit

    assert describe_exit(code) == words
