"""Rolling restart: every worker process replaced by a fresh one, one at a time, through slot
moves — a new handler version without downtime, with nothing lost or reordered.

===========  ====================================================================================
phase        what happens to worker ``i`` (workers are rolled in index order)
===========  ====================================================================================
evacuating   every slot and pin of ``i`` moves to the least loaded other worker (the plan of a
             resize down, :meth:`.Resizer.plan`); halted channels go with their slot, handler
             state too (``pool.move_state``)
restarting   once ``i`` owns nothing and holds nothing it is asked to stop (SIGTERM, as at close);
             its window is empty, so its end is a planned one: not counted as a crash, nothing to
             replay, nothing flagged ``redelivered``
starting     the next incarnation of ``i`` is spawned: a fresh process that imports the handler
             anew; the roll waits for its READY
refilling    ``i`` takes its share back (the plan of a resize up with ``i`` as the new worker)
===========  ====================================================================================

With a single worker, the roll first adds a temporary worker (a resize to 2), rolls worker 0 and
then removes the temporary one (a resize back to 1: the temporary worker is itself fresh).

A move called off is planned again after :data:`.resize.RETRY_S`; :data:`.resize.MAX_ABORTS`
of one slot call the roll off (the workers keep what they own then). A new incarnation that
cannot start calls the roll off too: the worker stays stopped, owning nothing (a later roll
starts it again). Driven by the front's I/O thread (:meth:`Roller.tick`), which is also the
thread that spawns workers.

Not thread-safe: the front calls it with its lock held.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..errors import MoveRefused
from ..supervisor import WorkerState
from .resize import MAX_ABORTS, RETRY_S, move_room, owns_nothing, start_wave
from .state import PoolState

if TYPE_CHECKING:
    from collections.abc import Callable

    from .engine import Front

__all__ = ["Roller"]

log = logging.getLogger("shardpool.front")

_POLL_S = 0.05


class Roller:
    """The front's rolling restart in progress, if any (see the module docstring)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.generation = 0  # one per roll request; a waiter watches its own
        self.done_generation = 0
        self.error: str | None = None
        self.started = 0.0
        self.phase = "idle"
        self.current: int | None = None  # the worker being replaced
        self.todo: list[int] = []  # workers still to replace, next first
        self.rolled = 0
        self.total = 0
        self._base = 0  # workers before the roll
        self._resize_gen = 0  # of the temporary worker's resize (one worker)
        self._next_wave = 0.0
        self._deadline = 0.0  # of the stop in progress
        self._aborts: dict[int | bytes, int] = {}
        self._steps: dict[str, Callable[[float], float | None]] = {
            "growing": self._growing,
            "next": self._next,
            "evacuating": self._evacuating,
            "restarting": self._restarting,
            "starting": self._starting,
            "refilling": self._refilling,
            "shrinking": self._shrinking,
        }

    # -- asking --------------------------------------------------------------------------------

    def request(self) -> int:
        """Start a roll; returns its generation (see :meth:`finished`).

        Raises:
            MoveRefused: not running, or a roll or resize is under way.
        """
        f = self.front
        if f.state != PoolState.RUNNING:
            raise MoveRefused("the pool is not running")
        if f.remote is not None:
            raise MoveRefused(
                "a rolling restart replaces local worker processes; with remote workers "
                "configured, restart those through their hosts' service manager"
            )
        if self.busy():
            raise MoveRefused("a rolling restart is already under way")
        if f.resizer.busy() or f.resizer.retiring:
            raise MoveRefused("a resize is under way")
        self.generation += 1
        self.error = None
        self.started = time.monotonic()
        self._base = len(f.links)
        self.todo = list(range(self._base))
        self.total = self._base
        self.rolled = 0
        self.current = None
        self._aborts.clear()
        self._next_wave = 0.0
        if self._base == 1:
            self.phase = "growing"
            self._resize_gen = f.resizer.request(2)
        else:
            self.phase = "next"
        log.info("roll: replacing %d worker(s) one at a time", self._base)
        f.wakeup.wake()
        return self.generation

    def busy(self) -> bool:
        return self.done_generation != self.generation

    def finished(self, generation: int) -> bool:
        return self.done_generation >= generation

    def evacuating(self) -> set[int]:
        """The worker being emptied (moves to it are refused), if any."""
        if self.current is not None and self.phase in ("evacuating", "restarting", "starting"):
            return {self.current}
        return set()

    # -- the I/O thread ------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Move the roll on; seconds until it wants to be called again (None: idle)."""
        if self.front.state != PoolState.RUNNING or not self.busy():
            return None
        return self._steps[self.phase](now)

    def _growing(self, now: float) -> float | None:
        r = self.front.resizer
        if not r.finished(self._resize_gen):
            return _POLL_S
        if r.error is not None:
            self._finish(f"a temporary worker could not be added: {r.error}")
            return None
        self.phase = "next"
        return 0.0

    def _next(self, now: float) -> float | None:
        f = self.front
        if not self.todo:
            if len(f.links) > self._base:  # the temporary worker goes
                self.phase = "shrinking"
                self._resize_gen = f.resizer.request(self._base)
                return _POLL_S
            self._finish(None)
            return None
        self.current = self.todo.pop(0)
        self.phase = "evacuating"
        self._aborts.clear()
        log.info(
            "roll: worker %d (%d of %d): moving its slots away",
            self.current, self.rolled + 1, self.total,
        )
        return 0.0

    def _evacuating(self, now: float) -> float | None:
        f = self.front
        i = self._index()
        rec = f.sup.workers[i]
        if rec.state is WorkerState.STOPPED and owns_nothing(f, i):
            self.phase = "restarting"  # left stopped by a roll called off: start it now
            return 0.0
        if now < self._next_wave:
            return self._next_wave - now
        if move_room(f) > 0 and (plan := f.resizer.plan(retiring={i})):
            started, refused = start_wave(f, plan, "roll")
            if refused or (not started and not f.mover.moves):
                self._next_wave = now + RETRY_S
            return _POLL_S
        if f.mover.moves or rec.state is not WorkerState.READY or not owns_nothing(f, i):
            return _POLL_S
        log.info("roll: worker %d (pid %s) owns nothing any more: stopping it", i, rec.proc.pid
                 if rec.proc is not None else None)
        f.sup.retire(i)
        self._deadline = now + f.cfg.supervisor.stop_timeout_s
        self.phase = "restarting"
        return _POLL_S

    def _restarting(self, now: float) -> float | None:
        f = self.front
        i = self._index()
        rec = f.sup.workers[i]
        if rec.state is WorkerState.STOPPING:
            if now > self._deadline and rec.proc is not None:
                log.warning("roll: worker %d did not stop in time: killing it", i)
                rec.proc.kill()
                self._deadline = now + f.cfg.supervisor.stop_timeout_s
            return _POLL_S
        if rec.state is not WorkerState.STOPPED:
            self._finish(f"worker {i} is {rec.state}, not stopped")
            return None
        try:
            f.sup.start(i)
        except Exception as exc:  # noqa: BLE001 - reported; the pool goes on without it
            rec.state = WorkerState.STOPPED
            self._finish(f"worker {i} could not be started again: {exc!r}")
            return None
        assert rec.proc is not None
        f.links[i].watch(rec.proc.pid)
        log.info("roll: worker %d restarted (pid %s, epoch %d)", i, rec.proc.pid, rec.epoch)
        self.phase = "starting"
        return _POLL_S

    def _starting(self, now: float) -> float | None:
        i = self._index()
        if self.front.sup.workers[i].state is not WorkerState.READY:
            return _POLL_S  # (the supervisor enforces the READY deadline)
        self.rolled += 1
        self.phase = "refilling"
        self._next_wave = 0.0
        log.info("roll: worker %d ready: moving its share back", i)
        return 0.0

    def _refilling(self, now: float) -> float | None:
        f = self.front
        if now < self._next_wave:
            return self._next_wave - now
        if move_room(f) > 0 and (plan := f.resizer.plan(retiring=set(), new=[self._index()])):
            started, refused = start_wave(f, plan, "roll")
            if refused or (not started and not f.mover.moves):
                self._next_wave = now + RETRY_S
            return _POLL_S
        if f.mover.moves:
            return _POLL_S
        self.phase = "next"
        return 0.0

    def _shrinking(self, now: float) -> float | None:
        r = self.front.resizer
        if not r.finished(self._resize_gen):
            return _POLL_S
        self._finish(
            None if r.error is None else f"the temporary worker could not be removed: {r.error}"
        )
        return None

    def _index(self) -> int:
        assert self.current is not None
        return self.current

    # -- events --------------------------------------------------------------------------------

    def on_start_failed(self, index: int, error: BaseException) -> bool:
        """The new incarnation of the worker being replaced failed before READY: the roll is
        called off and that worker stays stopped, owning nothing. False if ``index`` is not
        that worker (the caller breaks the pool as usual)."""
        f = self.front
        rec = f.sup.workers[index]
        if not self.busy() or self.phase != "starting" or index != self.current or rec.restarts:
            return False
        if rec.state is not WorkerState.STOPPED:
            f.sup.retire(index)  # (a FATAL frame came first: its exit follows)
        self._finish(f"worker {index} could not start again: {error}")
        return True

    def on_aborted(self, slots: tuple[int, ...], cids: tuple[bytes, ...], error: str) -> None:
        """One of the roll's moves was called off: wait before the next wave; call the roll
        off once a slot or channel has failed to move :data:`.resize.MAX_ABORTS` times."""
        self._next_wave = time.monotonic() + RETRY_S
        if not self.busy():
            return
        worst = 0
        keys: tuple[int | bytes, ...] = (*slots, *cids)
        for key in keys:
            count = self._aborts[key] = self._aborts.get(key, 0) + 1
            worst = max(worst, count)
        if worst >= MAX_ABORTS:
            self._finish(f"a move was called off {worst} times: {error}")

    def _finish(self, error: str | None) -> None:
        f = self.front
        self.error = error
        self.done_generation = self.generation
        self.phase = "idle"
        self.current = None
        self.todo = []
        if error is None:
            took = time.monotonic() - self.started
            log.info("roll: %d worker(s) replaced in %.1f s", self.rolled, took)
        else:
            log.warning("roll called off after %d worker(s): %s", self.rolled, error)
        f.cv.notify_all()

    def halt(self) -> None:
        """The pool is closing or broken: a roll in progress ends here (waiters wake)."""
        if self.busy():
            self._finish("the pool stopped during the roll")

    def report(self) -> dict[str, Any]:
        return {
            "in_progress": self.busy(),
            "phase": self.phase,
            "worker": self.current,
            "rolled": self.rolled,
            "total": self.total,
            "error": self.error,
        }
