"""Worker supervision: processes and time, and the decisions the front acts on.

::

    start ── spawn(i, epoch) ──▶ STARTING ── on_ready ──▶ READY ───────────┐
      ▲                             │ no READY in time: kill                 │ silent past the
      │ tick: restart due → spawn   ▼                                        │ heartbeat timeout:
    DEAD ◀── after_death: Restart(delay) ── reap(i) ◀── sentinel ◀───────────┘ kill (hung)
      │      (counted by the crash-loop guard unless a message explains it)
      ├─ after_death: GiveUp (crash loop) / StartFailed (died before its first READY) → BROKEN
      └─ stop_all, or retire(i) on a resize down: STOPPING (SIGTERM: finish the current call,
         leave) → STOPPED

The supervisor knows processes and time, not messages: it starts incarnation ``epoch`` of worker
``i`` through a factory the front gives it, watches READY deadlines, heartbeat silence and
restart delays (:meth:`Supervisor.tick`), and, after a death, decides restart / give up / start
failure (:meth:`Supervisor.after_death`). The front acts on the decisions (replay, break the pool,
report) and tells it what only the front can know: whether a message explains a death. Clock and
processes are injected, so the decisions are tested without a real process. Not thread-safe: the
front calls it with its lock held.

Signals are blocked in the thread that spawns, so a child never runs Python-level signal handling
before it has installed its own (it unblocks them itself).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import enum
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import psutil

from . import launch
from .config import SupervisorConfig
from .errors import PoolBroken, WorkerStartError
from .exitcodes import EXIT_OK, EXIT_PARENT_GONE, EXIT_START_FAILED
from .worker import WorkerSpec, worker_main

log = logging.getLogger("shardpool.supervisor")

_EXIT_NAMES = {
    EXIT_OK: "exited cleanly",
    EXIT_START_FAILED: "failed to start its handler",
    EXIT_PARENT_GONE: "left because its parent (the front, or its fork server) disappeared",
    1: "died of an unhandled exception",
}


_NO_STATUS = 255
"""The exit code ``multiprocess`` reports for a fork-server child whose fork server died first."""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet waited for, does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def describe_exit(code: int | None) -> str:
    """Human words for a worker exit code (negative: the signal that killed it)."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return _EXIT_NAMES.get(code, f"exited with code {code}")


@dataclass
class RestartGuard:
    """Decides whether a dead worker is restarted, and after what backoff.

    At most ``max_restarts`` restarts within any ``window_s`` seconds; the backoff doubles from
    ``backoff_s`` up to ``backoff_max_s`` with each restart still inside the window.
    """

    max_restarts: int
    window_s: float
    backoff_s: float
    backoff_max_s: float
    _times: collections.deque[float] = field(default_factory=collections.deque)

    def next_delay(self, now: float | None = None) -> float | None:
        """Record a death; return the delay in seconds before restarting, or None: give up."""
        now = time.monotonic() if now is None else now
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return None
        delay: float = min(self.backoff_max_s, self.backoff_s * 2.0 ** len(self._times))
        self._times.append(now)
        return delay

    @property
    def restarts(self) -> int:
        """Restarts recorded within the current window."""
        return len(self._times)


class WorkerProcess:
    """One incarnation of one worker: a process (forked from the fork server, or spawned: see
    :mod:`shardpool.launch`) and its sentinel."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.process: Any = None  # made by start(): the start method is chosen then
        self.server = 0  # pid of the fork server it came from (0: spawned)
        # A fork-server child's own sentinel is a pipe from the fork server, which also reads as
        # "ended" when the fork server dies, a moment before its children do: a pidfd (Linux)
        # says when the worker itself has ended, so that no successor ever runs beside it.
        self._pidfd: int | None = None

    def start(self) -> None:
        """Start the process with SIGINT/SIGTERM (and SIGHUP/SIGUSR1) blocked in the child until
        it is ready for them.

        Raises whatever :meth:`multiprocess.Process.start` raises (e.g. the handler object cannot
        be pickled).
        """
        old = signal.pthread_sigmask(signal.SIG_BLOCK, launch.MASK)
        try:
            try:
                self._start()
            except launch.ForkServerError:
                self._start()  # through a new fork server, or spawned
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _start(self) -> None:
        ctx, parent, forked = launch.context()
        spec = dataclasses.replace(self.spec, parent_pid=parent)
        self.process = ctx.Process(
            target=worker_main,
            args=(spec, launch.environment() if forked else None),
            name=f"shardpool-worker-{spec.index}",
            daemon=True,  # a safety net: the interpreter's exit reaps stragglers too
        )
        if not forked:
            self.process.start()
            return
        launch.start(self.process, parent)
        self.server = parent
        with contextlib.suppress(AttributeError, OSError):  # no pidfds: the pipe it is
            self._pidfd = os.pidfd_open(self.process.pid)

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the process ends."""
        if self._pidfd is not None:
            return self._pidfd
        return self.process.sentinel  # type: ignore[no-any-return]

    @property
    def exitcode(self) -> int | None:
        if self.process is None:
            return None
        code: int | None = self.process.exitcode
        if code == _NO_STATUS and self.server and not _alive(self.server):
            # Its fork server died first and could not pass the status on: the worker went down
            # with its parent (PR_SET_PDEATHSIG, or its watchdog thread).
            return EXIT_PARENT_GONE
        return code

    def is_alive(self) -> bool:
        return self.process is not None and bool(self.process.is_alive())

    def kill(self) -> None:
        """SIGKILL, for a worker that is hung or must go now."""
        if self.pid is not None and self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGKILL)

    def terminate(self) -> None:
        """SIGTERM: the worker dies at once (it keeps the default action)."""
        if self.pid is not None and self.process.exitcode is None:
            self.process.terminate()

    def join(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds; returns the exit code, or None if still running (or
        never started)."""
        if self.process is not None:
            self.process.join(timeout)
        code = self.exitcode
        if code is not None and self._pidfd is not None:
            os.close(self._pidfd)  # ended and joined: nothing polls it any more
            self._pidfd = None
        return code

    def reap(self, timeout: float = 2.0) -> int | None:
        """Make sure the process is gone: wait, then SIGTERM, then SIGKILL; the exit code."""
        if self.pid is None:
            return None
        if self.join(timeout) is None:
            self.terminate()
            if self.join(1.0) is None:
                self.kill()
                self.join(5.0)
        code = self.exitcode
        with contextlib.suppress(ValueError):
            self.process.close()
        return code


class Process(Protocol):
    """What the supervisor needs of a worker process (:class:`WorkerProcess`, or a fake)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def sentinel(self) -> int: ...

    def start(self) -> None: ...

    def kill(self) -> None: ...

    def terminate(self) -> None: ...

    def join(self, timeout: float) -> int | None: ...

    def reap(self, timeout: float = 2.0) -> int | None: ...


Spawn = Callable[[int, int], Process]
"""``spawn(index, epoch)``: a new, not yet started process for that incarnation."""


class WorkerState(enum.Enum):
    STARTING = "starting"  # spawned, READY not yet seen
    READY = "ready"
    DEAD = "dead"  # waiting for its restart
    STOPPING = "stopping"  # asked to stop (or killed), its exit not yet seen
    STOPPED = "stopped"
    BROKEN = "broken"  # will not be restarted: the pool is broken
    AWAY = "away"  # a remote worker not connected: not joined yet, or lost (failed over)

    def __str__(self) -> str:
        return self.value


@dataclass
class WorkerRecord:
    """One worker slot across its incarnations, as the supervisor sees it (times monotonic s)."""

    index: int
    guard: RestartGuard
    epoch: int = 0
    state: WorkerState = WorkerState.STARTING
    proc: Process | None = None
    deadline: float = 0.0  # READY deadline while STARTING, restart time while DEAD
    last_seen: float = 0.0  # last frame of the current epoch
    restarts: int = 0
    last_exit: int | None = None
    last_error: str = ""  # what was seen before a death (hang, missed READY, its CRASH)
    last_cause: str = ""  # how the last incarnation ended, in words
    hung: bool = False  # the last death was a kill for heartbeat silence
    remote: bool = False  # on another host: no process here, a lease instead of a sentinel


@dataclass(frozen=True)
class Death:
    """A reaped incarnation: its exit ``code``, how it ended in words (``what``: "killed by
    SIGKILL") and what was seen before it (``seen``: "no heartbeat for 10.2 s ...", or "")."""

    index: int
    epoch: int
    pid: int | None
    code: int | None
    what: str
    seen: str
    hung: bool

    @property
    def cause(self) -> str:
        return f"{self.what} ({self.seen})" if self.seen else self.what


@dataclass(frozen=True)
class Restart:
    """Restart after ``delay`` seconds (the supervisor spawns it then, from :meth:`tick`)."""

    index: int
    delay: float
    counted: bool  # towards the crash-loop guard (False: a message explained the death)


@dataclass(frozen=True)
class GiveUp:
    """Stop restarting: the pool is broken by ``error`` (a crash loop, or a failed respawn)."""

    index: int
    error: PoolBroken


@dataclass(frozen=True)
class StartFailed:
    """The worker died before its first READY: a start failure, not something to retry."""

    index: int
    error: WorkerStartError


@dataclass(frozen=True)
class Stopped:
    """It was stopping (or the pool no longer restarts anything): nothing more to do."""

    index: int


@dataclass(frozen=True)
class Spawned:
    """:meth:`Supervisor.tick` started the next incarnation of a dead worker."""

    index: int
    pid: int | None


@dataclass(frozen=True)
class Killed:
    """:meth:`Supervisor.tick` killed it: hung (no heartbeat) or no READY in time; its death
    comes through the sentinel next."""

    index: int
    reason: str


Decision = Restart | GiveUp | StartFailed | Stopped | Spawned | Killed


class Supervisor:
    """Starts, watches and restarts the workers (see the module diagram).

    Args:
        workers: how many worker slots.
        cfg: deadlines, heartbeat timeout, restart backoff and crash-loop limits.
        spawn: makes the process of incarnation ``epoch`` of worker ``index`` (not started).
        clock: monotonic seconds (injected for tests).
        stop_remote: asks remote worker ``index`` to stop (in band; it cannot be signalled).
    """

    def __init__(
        self,
        workers: int,
        cfg: SupervisorConfig,
        spawn: Spawn,
        clock: Callable[[], float] = time.monotonic,
        stop_remote: Callable[[int], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self._spawn = spawn
        self._clock = clock
        self._stop_remote = stop_remote
        self.halted = False  # no more restarts: the pool is broken or closed
        self.workers: list[WorkerRecord] = []
        for _ in range(workers):
            self.add()

    def add(self, *, remote: bool = False) -> int:
        """A new worker slot (not started: :meth:`start` it; a remote one is AWAY until it
        joins, see :meth:`remote_joined`); returns its index."""
        cfg = self.cfg
        index = len(self.workers)
        guard = RestartGuard(
            cfg.max_restarts, cfg.restart_window_s, cfg.restart_backoff_s, cfg.restart_backoff_max_s
        )
        rec = WorkerRecord(index, guard, remote=remote)
        if remote:
            rec.state = WorkerState.AWAY
        self.workers.append(rec)
        return index

    # -- remote workers: no process here; the front's remote side reports what happens -------

    def remote_joined(self, index: int) -> int:
        """Remote worker ``index`` connected as a new incarnation: STARTING until its READY (by
        the READY deadline). Returns its epoch."""
        rec = self.workers[index]
        assert rec.remote and rec.state is WorkerState.AWAY, rec.state
        rec.epoch += 1
        rec.state = WorkerState.STARTING
        rec.deadline = self._clock() + self.cfg.ready_timeout_s
        rec.last_seen = self._clock()
        rec.last_error = ""
        return rec.epoch

    def remote_lost(self, index: int, cause: str) -> None:
        """Remote worker ``index`` is gone (its lease ran out on both sides, or it could not
        start): AWAY until it joins again; its restart is its own host's business."""
        rec = self.workers[index]
        rec.state = WorkerState.AWAY
        rec.last_cause = cause
        rec.restarts += 1

    def remote_ended(self, index: int) -> None:
        """A stopping remote worker said BYE."""
        self.workers[index].state = WorkerState.STOPPED

    def retire(self, index: int) -> None:
        """Ask worker ``index`` to stop for good (a resize down): as :meth:`stop_all` for one
        worker; it is not restarted."""
        self._stop(self.workers[index])

    def _stop(self, rec: WorkerRecord) -> None:
        """SIGTERM (in band for a remote worker) to a running worker; a dead one stays dead."""
        if rec.state in (WorkerState.READY, WorkerState.STARTING):
            if rec.remote:
                if self._stop_remote is not None:
                    self._stop_remote(rec.index)
            else:
                assert rec.proc is not None
                rec.proc.terminate()
            rec.state = WorkerState.STOPPING
        elif rec.state in (WorkerState.DEAD, WorkerState.BROKEN, WorkerState.AWAY):
            rec.state = WorkerState.STOPPED

    def remove_last(self) -> None:
        """Forget the last worker slot, once it has stopped (a resize down)."""
        rec = self.workers[-1]
        assert rec.state is WorkerState.STOPPED, rec.state
        self.workers.pop()

    # -- starting ------------------------------------------------------------------------------

    def start(self, index: int) -> None:
        """Spawn the next incarnation of worker ``index``.

        Raises: whatever the spawn factory or the process start raises.
        """
        rec = self.workers[index]
        rec.epoch += 1
        proc = self._spawn(index, rec.epoch)
        proc.start()
        rec.proc = proc
        rec.state = WorkerState.STARTING
        rec.hung = False
        rec.deadline = self._clock() + self.cfg.ready_timeout_s

    def on_ready(self, index: int) -> bool:
        """A READY of the current epoch arrived; True if the worker just became ready (the front
        then connects and replays), False if it was not starting (e.g. asked to stop first)."""
        rec = self.workers[index]
        if rec.state is not WorkerState.STARTING:
            return False
        rec.state = WorkerState.READY
        rec.last_seen = self._clock()
        return True

    def heard(self, index: int) -> None:
        """Any frame of the current epoch arrived: the worker is alive."""
        self.workers[index].last_seen = self._clock()

    def all_ready(self) -> bool:
        """Every local worker is ready (remote ones join when they can)."""
        return all(rec.state is WorkerState.READY for rec in self.workers if not rec.remote)

    # -- watching ------------------------------------------------------------------------------

    def sentinels(self) -> dict[int, int]:
        """File descriptor → worker index of every process that may still end."""
        live = (WorkerState.STARTING, WorkerState.READY, WorkerState.STOPPING)
        return {
            rec.proc.sentinel: rec.index
            for rec in self.workers
            if rec.proc is not None and rec.state in live
        }

    def tick(self, caught_up: Callable[[], bool]) -> tuple[list[Decision], float | None]:
        """Act on the timers: kill a worker that missed its READY deadline or fell silent past
        the heartbeat timeout, spawn one whose restart is due (:class:`Spawned`).
        ``caught_up()`` must say whether every frame that arrived has been read: silence is only
        judged then (a front that fell behind must not take its own delay for a hung worker).
        Returns the decisions taken and the seconds until the next restart is due (None:
        none)."""
        now = self._clock()
        decisions: list[Decision] = []
        due: float | None = None
        hb_timeout = self.cfg.heartbeat_timeout_s
        for rec in self.workers:
            if rec.remote:
                continue  # a lease, not a process: see shardpool.front.remote
            if rec.state is WorkerState.STARTING and now > rec.deadline and caught_up():
                rec.last_error = f"no READY within {self.cfg.ready_timeout_s} s"
                decisions.append(self._kill(rec, rec.last_error))
            elif rec.state is WorkerState.DEAD and now >= rec.deadline:
                try:
                    self.start(rec.index)
                    assert rec.proc is not None
                    decisions.append(Spawned(rec.index, rec.proc.pid))
                except Exception as exc:  # noqa: BLE001 - any spawn failure breaks the pool
                    rec.state = WorkerState.BROKEN
                    decisions.append(
                        GiveUp(rec.index, PoolBroken(
                            f"worker {rec.index} could not be respawned: {exc!r}"
                        ))
                    )
            elif (
                rec.state is WorkerState.READY
                and now - rec.last_seen > hb_timeout
                and caught_up()
            ):
                rec.last_error = (
                    f"no heartbeat for {now - rec.last_seen:.1f} s "
                    f"(supervisor.heartbeat_timeout_s = {hb_timeout})"
                )
                rec.hung = True
                rec.last_seen = now  # one kill is enough; the sentinel takes it from here
                decisions.append(self._kill(rec, rec.last_error))
            if rec.state is WorkerState.DEAD:
                left = rec.deadline - now
                due = left if due is None else min(due, left)
        return decisions, due

    @staticmethod
    def _kill(rec: WorkerRecord, reason: str) -> Killed:
        assert rec.proc is not None
        rec.proc.kill()  # its sentinel then reports the death
        return Killed(rec.index, reason)

    # -- deaths --------------------------------------------------------------------------------

    def reap(self, index: int) -> Death:
        """Its sentinel fired: join the process and say how it ended (state unchanged; the
        front settles what the worker held, then asks :meth:`after_death`)."""
        rec = self.workers[index]
        assert rec.proc is not None
        code = rec.proc.join(1.0)
        rec.last_exit = code
        return Death(
            index, rec.epoch, rec.proc.pid, code, describe_exit(code), rec.last_error, rec.hung
        )

    def after_death(self, death: Death, explained: bool) -> Decision:
        """Decide what follows a death reaped with :meth:`reap`. ``explained``: a message was in
        its handler (the front counts that against the message, so the crash-loop guard does
        not count it: a poison message must not break the pool)."""
        rec = self.workers[death.index]
        if rec.state is WorkerState.STOPPING or self.halted:
            rec.state = WorkerState.STOPPED
            return Stopped(rec.index)
        if rec.state is WorkerState.STARTING and rec.restarts == 0:
            rec.state = WorkerState.STOPPED
            seen = f" ({death.seen})" if death.seen else ""
            return StartFailed(
                rec.index,
                WorkerStartError(
                    f"worker {rec.index} {death.what} before READY{seen}",
                    exitcodes={rec.index: death.code},
                ),
            )
        delay = rec.guard.backoff_s if explained else rec.guard.next_delay(self._clock())
        if delay is None:
            rec.state = WorkerState.BROKEN
            return GiveUp(
                rec.index,
                PoolBroken(
                    f"worker {rec.index} keeps dying ({rec.guard.max_restarts} restarts within "
                    f"{rec.guard.window_s} s); last: {death.cause}",
                    exitcodes={rec.index: death.code},
                ),
            )
        rec.proc = None  # joined; dropping it closes its sentinel
        rec.last_cause = death.cause
        rec.last_error = ""
        rec.state = WorkerState.DEAD
        rec.restarts += 1
        rec.deadline = self._clock() + delay
        return Restart(rec.index, delay, counted=not explained)

    def note_crash(self, index: int, what: str) -> None:
        """The worker said why it is dying (a CRASH frame): part of the cause of its death."""
        self.workers[index].last_error = what

    # -- stopping ------------------------------------------------------------------------------

    def halt(self) -> None:
        """Restart nothing any more (the pool broke or is closing); a dead worker stays dead."""
        self.halted = True
        for rec in self.workers:
            if rec.state is WorkerState.DEAD:
                rec.state = WorkerState.BROKEN

    def stop_all(self) -> None:
        """Ask every running worker to stop (SIGTERM: it finishes the call it is in, starts
        nothing more, acknowledges and leaves); a dead one is simply not restarted."""
        self.halted = True
        for rec in self.workers:
            if rec.state is not WorkerState.BROKEN:  # (it stays BROKEN in the reports)
                self._stop(rec)

    def stopping(self) -> list[int]:
        """Workers asked to stop whose exit has not been seen yet."""
        return [rec.index for rec in self.workers if rec.state is WorkerState.STOPPING]

    def kill_stopping(self) -> list[int]:
        """Kill every worker still stopping (the deadline passed); returns their indexes."""
        out = []
        for rec in self.workers:
            if rec.state is WorkerState.STOPPING and rec.remote:
                rec.state = WorkerState.STOPPED  # out of reach: its calls are reported in doubt
                out.append(rec.index)
            elif rec.state is WorkerState.STOPPING and rec.proc is not None:
                rec.proc.kill()
                out.append(rec.index)
        return out

    def reap_all(self, timeout: float) -> dict[int, int | None]:
        """Make sure every process is gone (wait up to ``timeout`` seconds for the first, then
        SIGTERM, then SIGKILL); returns the exit codes by worker index."""
        codes: dict[int, int | None] = {}
        for rec in self.workers:
            if rec.proc is not None:
                codes[rec.index] = rec.proc.reap(timeout)
                timeout = 0.5
        return codes

    # -- introspection -------------------------------------------------------------------------

    def pids(self) -> list[int | None]:
        """The current pid of each worker (None while none runs)."""
        return [
            rec.proc.pid
            if rec.proc is not None and rec.state is not WorkerState.STOPPED
            else None
            for rec in self.workers
        ]

    def exitcodes(self) -> dict[int, int | None]:
        """The last exit code of each worker that has exited."""
        return {rec.index: rec.last_exit for rec in self.workers if rec.last_exit is not None}

    def report(self, index: int) -> dict[str, Any]:
        rec = self.workers[index]
        return {
            "index": rec.index,
            "state": rec.state.value,
            "epoch": rec.epoch,
            "restarts": rec.restarts,
            "last_exit": rec.last_cause or None,
        }
