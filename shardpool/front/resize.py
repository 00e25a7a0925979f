"""Changing the worker count while the pool runs, through slot moves.

=========  =====================================================================================
growing    start the new workers (indexes after the last); once each is READY, move measured slots
           to it, hottest first, until it carries about the mean load, then slots nothing was
           measured in until it owns its share of the slots
shrinking  the last workers retire: every slot they own moves to the least loaded remaining
           worker (halted channels go with their slot, still halted), their pinned channels are
           pinned elsewhere; once a retiring worker owns nothing and has nothing in flight it is
           asked to stop (SIGTERM, as at close), and once it has gone it is removed
=========  =====================================================================================

Moves go out in waves of at most ``pool.max_concurrent_moves`` slots; a move that is called off
(a drain that timed out) is planned again after :data:`RETRY_S`. A slot whose move is called off
:data:`MAX_ABORTS` times in one resize (a channel state that cannot move, a drain that never
ends) calls the resize off: the workers stay as they are then (retiring workers that still own
slots keep them), and the resize ends with the last move's error. A new worker that cannot start
calls the resize off too (the pool itself goes on with the workers it had). Driven by the front's
I/O thread (:meth:`Resizer.tick`), which is also the thread that spawns workers: a worker's
parent-death signal follows the thread that started it.

Not thread-safe: the front calls it with its lock held.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from ..errors import MoveRefused
from ..supervisor import WorkerState
from .link import Link
from .state import PoolState

if TYPE_CHECKING:
    from .engine import Front

__all__ = ["Resizer"]

log = logging.getLogger("shardpool.front")

MAX_WORKERS = 1024  # as pool.workers
RETRY_S = 0.5
"""Seconds before the next wave after a move was refused or called off."""
MAX_ABORTS = 3
"""Moves of one slot (or pinned channel) called off in one resize before the resize is."""


def move_room(front: Front) -> int:
    """How many more slots (or pinned channels) may start moving now."""
    return front.cfg.pool.max_concurrent_moves - sum(
        len(m.slots) + len(m.cids) for m in front.mover.moves.values()
    )


def start_wave(
    front: Front, plan: dict[tuple[int, int], list[int | bytes]], reason: str
) -> tuple[bool, bool]:
    """Start the moves of ``plan`` that fit in :func:`move_room`, as moves of ``reason``;
    returns (whether any started, whether any was refused)."""
    room = move_room(front)
    started = refused = False
    for (_src, dst), todo in plan.items():
        slots = tuple(x for x in todo if isinstance(x, int))
        pieces: list[tuple[tuple[int, ...], tuple[bytes, ...]]] = [(slots, ())] if slots else []
        pieces += [((), (x,)) for x in todo if isinstance(x, bytes)]
        for whole, cid_part in pieces:
            if room <= 0:
                return started, refused
            slot_part = whole[:room]
            try:
                front.mover.start(slot_part, cid_part, dst, reason)
            except MoveRefused as exc:
                log.info("%s: a move waits: %s", reason, exc)
                refused = True
                continue
            room -= len(slot_part) + len(cid_part)
            started = True
    return started, refused


def owns_nothing(front: Front, index: int) -> bool:
    """Worker ``index`` owns no slot and no pin, and holds no message."""
    ch = front.channels
    link = front.links[index]
    return not (
        index in ch.router.table
        or index in ch.pins.values()
        or link.window.inflight
        or any(r.window is link.window for r in ch.routes.values())
    )


class Resizer:
    """The front's resize in progress, if any (see the module docstring)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.target = len(front.links)
        self.retiring: set[int] = set()
        self.error: str | None = None
        self.started = 0.0
        self.generation = 0  # one per resize request; a waiter watches its own
        self.done_generation = 0
        self._next_wave = 0.0
        self._base = self.target  # workers before the request: the ones after it are new
        self._aborts: dict[int | bytes, int] = {}  # slot or pinned channel -> moves called off

    # -- asking --------------------------------------------------------------------------------

    def request(self, workers: int) -> int:
        """Aim for ``workers`` workers; returns the request's generation (see :meth:`finished`).

        Raises:
            MoveRefused: not running, or ``workers`` is not an integer from 1 to 1024.
        """
        f = self.front
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise MoveRefused(f"resize: workers must be an integer, got {type(workers).__name__}")
        if not 1 <= workers <= MAX_WORKERS:
            raise MoveRefused(f"resize: workers must be from 1 to {MAX_WORKERS}, got {workers}")
        if f.state != PoolState.RUNNING:
            raise MoveRefused("the pool is not running")
        if f.remote is not None:
            raise MoveRefused(
                "resize changes the local worker count; with remote workers configured it is not "
                "available (add or remove remote workers in remote.workers instead)"
            )
        # Workers from _base on are new: a request during a resize keeps the earlier base.
        self._base = min(self._base if self.busy() else self.active(), workers)
        self.generation += 1
        self.target = workers
        self.error = None
        self.started = time.monotonic()
        self._next_wave = 0.0
        self._aborts.clear()
        log.info("resize to %d workers (from %d)", workers, self.active())
        f.wakeup.wake()
        return self.generation

    def active(self) -> int:
        """Workers that stay: all but the retiring ones."""
        return len(self.front.links) - len(self.retiring)

    def busy(self) -> bool:
        """A resize is under way (the levelling waits for it)."""
        return self.done_generation != self.generation

    def finished(self, generation: int) -> bool:
        return self.done_generation >= generation

    # -- the I/O thread ------------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Move the resize on; seconds until it wants to be called again (None: idle)."""
        f = self.front
        if f.state != PoolState.RUNNING or not (self.busy() or self.retiring):
            return None
        n = len(f.links)
        if self.busy() and self.target > self.active():
            self._unretire()
            if not self.retiring:  # (else those stopping already go first: indexes stay dense)
                self._grow(self.target - self.active())
                if not self.busy():
                    return None
        elif self.busy() and self.target < self.active():
            self.retiring.update(range(self.target, n))
        self._remove_stopped()
        if now < self._next_wave:
            return self._next_wave - now
        ready = all(
            f.sup.workers[i].state is WorkerState.READY for i in range(len(f.links))
            if i not in self.retiring
        )
        if not ready:
            return 0.05  # a new worker is starting (its READY wakes us anyway)
        if self._wave(now) or f.mover.moves:
            return 0.05
        if self.retiring:
            self._retire_idle()
            return 0.05
        if not self.busy():
            return None  # the leftovers of a resize called off are gone
        if self.target > self.active():
            return 0.0  # the retired ones are gone: now grow
        self._finish(self.error)
        return None

    def on_start_failed(self, index: int, error: BaseException) -> bool:
        """A worker added by this resize failed before READY: the resize is called off — back
        to the workers there were before it (the others it added retire as in a shrink) — and
        it ends with this error. False if ``index`` is not such a worker (the caller breaks the
        pool as usual)."""
        f = self.front
        if not self.busy() or index < self._base or f.sup.workers[index].restarts:
            return False
        if self.error is None:
            self.error = f"worker {index} could not start: {error}"
        self.target = self._base
        self.retiring.update(range(self._base, len(f.links)))
        for i in range(self._base, len(f.links)):
            if f.sup.workers[i].state is not WorkerState.READY:
                f.sup.retire(i)  # (a ready one retires once its slots are back)
        f.wakeup.wake()
        return True

    def on_aborted(self, slots: tuple[int, ...], cids: tuple[bytes, ...], error: str) -> None:
        """One of this resize's moves was called off: wait :data:`RETRY_S` before the next wave;
        call the resize off once a slot or channel has failed to move :data:`MAX_ABORTS` times
        (what stops it is not passing)."""
        self._next_wave = time.monotonic() + RETRY_S
        if not self.busy():
            return
        worst = 0
        keys: tuple[int | bytes, ...] = (*slots, *cids)
        for key in keys:
            count = self._aborts[key] = self._aborts.get(key, 0) + 1
            worst = max(worst, count)
        if worst < MAX_ABORTS:
            return
        self._unretire()  # a retiring worker that still owns slots keeps them
        self.target = self.active()
        self._finish(f"a move was called off {worst} times: {error}")

    # -- steps ---------------------------------------------------------------------------------

    def _grow(self, count: int) -> None:
        f = self.front
        for _ in range(count):
            index = f.sup.add()
            link = Link(index, os.path.join(f.rundir, f"w{index}.run"))
            f.links.append(link)
            f.channels.windows.append(link.window)
            try:
                f.sup.start(index)
            except Exception as exc:  # noqa: BLE001 - reported; the pool goes on without it
                f.sup.workers[index].state = WorkerState.STOPPED
                self.on_start_failed(index, exc)
                return
            link.watch(f.sup.workers[index].proc.pid)  # type: ignore[union-attr]

    def _unretire(self) -> None:
        """A grow asked while a shrink is under way (or a shrink called off): the retiring workers
        not asked to stop yet stay — those below every worker that is stopping, since workers
        are removed from the end."""
        f = self.front
        gone = (WorkerState.STOPPING, WorkerState.STOPPED)
        first_gone = min(
            (i for i in self.retiring if f.sup.workers[i].state in gone), default=len(f.links)
        )
        self.retiring = {i for i in self.retiring if i >= first_gone}

    def _wave(self, now: float) -> bool:
        """Start the next wave of moves; False when nothing is left to move."""
        f = self.front
        if move_room(f) <= 0:
            return True  # a wave is under way
        plan = self.plan()
        if not plan:
            return False
        started, refused = start_wave(f, plan, "resize")
        if refused or (not started and not f.mover.moves):
            self._next_wave = now + RETRY_S
        return True

    def plan(
        self, retiring: set[int] | None = None, new: list[int] | None = None
    ) -> dict[tuple[int, int], list[int | bytes]]:
        """What still has to move, as (src, dst) → slots (or pinned channel ids), hottest first.

        Shrinking: every slot and pin of a retiring worker to the least loaded staying worker.
        Growing: from the most to the least loaded worker while that brings both nearer the mean.
        Slots already moving are left out. ``retiring`` and ``new`` (default: this resize's)
        name the workers to empty, or to fill (the rolling restart plans with its own).
        """
        f = self.front
        ch = f.channels
        weigh = f.balancer.slot_weight
        retiring = self.retiring if retiring is None else retiring
        staying = [i for i in range(len(f.links)) if i not in retiring]
        load = dict.fromkeys(staying, 0.0)
        owned: dict[int, list[int]] = defaultdict(list)  # slots not moving, by owner
        for s, w in enumerate(ch.router.table):
            move = ch.moving.get(s)
            if move is not None:
                w = move.dst  # counted where it is going
            else:
                owned[w].append(s)
            if w in load:
                load[w] += weigh(s)
        out: dict[tuple[int, int], list[int | bytes]] = defaultdict(list)
        if retiring:
            self._plan_shrink(retiring, load, owned, out)
        else:
            if new is None:
                new = [i for i in load if i >= self._base]
            self._plan_grow(new, load, owned, out)
        return dict(out)

    def _plan_shrink(
        self,
        retiring: set[int],
        load: dict[int, float],
        owned: dict[int, list[int]],
        out: dict[tuple[int, int], list[int | bytes]],
    ) -> None:
        ch = self.front.channels
        weigh = self.front.balancer.slot_weight
        for w in sorted(retiring):
            for s in sorted(owned[w], key=weigh, reverse=True):
                dst = min(load, key=load.__getitem__)
                load[dst] += weigh(s)
                out[(w, dst)].append(s)
            for cid, pin in ch.pins.items():
                route = ch.routes.get(cid)
                if pin == w and (route is None or route.move is None):
                    out[(w, min(load, key=load.__getitem__))].append(cid)

    def _plan_grow(
        self,
        new: list[int],
        load: dict[int, float],
        owned: dict[int, list[int]],
        out: dict[tuple[int, int], list[int | bytes]],
    ) -> None:
        """Growing: by measured load first, then by count for the slots nothing was measured in
        (so one hot slot that cannot be split does not leave a new worker empty)."""
        if not new:
            return
        weigh = self.front.balancer.slot_weight
        by_weight = {w: sorted(owned[w], key=weigh, reverse=True) for w in load}
        self._grow_by_load(new, load, by_weight, out)
        self._grow_by_count(new, load, by_weight, out)

    def _grow_by_load(
        self,
        new: list[int],
        load: dict[int, float],
        by_weight: dict[int, list[int]],
        out: dict[tuple[int, int], list[int | bytes]],
    ) -> None:
        """The hottest measured slots that fit under the mean, from the busiest workers first
        (each donor's slots sorted by weight: the measured ones come first)."""
        weigh = self.front.balancer.slot_weight
        measured = self.front.balancer.slot_load
        mean = sum(load.values()) / len(load)
        for dst in new:
            for src in sorted((w for w in load if w != dst), key=load.__getitem__, reverse=True):
                donor = by_weight[src]
                i = 0
                while i < len(donor) and donor[i] in measured and load[src] > mean > load[dst]:
                    x = weigh(donor[i])
                    if x > mean - load[dst]:
                        i += 1  # too heavy for what dst may still take
                        continue
                    s = donor.pop(i)
                    load[src] -= x
                    load[dst] += x
                    out[(src, dst)].append(s)
                if load[dst] >= mean or load[src] <= mean:
                    break  # dst is full, or no donor after this one is above the mean

    def _grow_by_count(
        self,
        new: list[int],
        load: dict[int, float],
        by_weight: dict[int, list[int]],
        out: dict[tuple[int, int], list[int | bytes]],
    ) -> None:
        """Slots with no measured load, from the workers that own the most, until each new
        worker owns its share of the slots."""
        ch = self.front.channels
        measured = self.front.balancer.slot_load
        counts = dict.fromkeys(load, 0)
        for s, w in enumerate(ch.router.table):
            move = ch.moving.get(s)
            w = w if move is None else move.dst  # counted where it is going
            if w in counts:
                counts[w] += 1
        for (src, dst), moved in out.items():
            counts[src] -= len(moved)
            counts[dst] += len(moved)
        share = len(ch.router.table) // len(load)
        donors = [(-counts[w], w) for w in load if w not in new]
        heapq.heapify(donors)
        for dst in new:
            while counts[dst] < share and donors:
                _, src = heapq.heappop(donors)
                donor = by_weight[src]
                if counts[src] <= share or not donor or donor[-1] in measured:
                    continue  # nothing (light) to spare: this donor is done
                s = donor.pop()
                counts[src] -= 1
                counts[dst] += 1
                out[(src, dst)].append(s)
                heapq.heappush(donors, (-counts[src], src))

    def _retire_idle(self) -> None:
        """Stop each retiring worker that owns nothing and holds nothing any more, the last first:
        the workers asked to stop are always the last ones (see :meth:`_unretire`)."""
        f = self.front
        for i in sorted(self.retiring, reverse=True):
            rec = f.sup.workers[i]
            if rec.state in (WorkerState.STOPPING, WorkerState.STOPPED):
                continue
            if rec.state is not WorkerState.READY or not owns_nothing(f, i):
                break
            log.info("resize: worker %d owns nothing any more: stopping it", i)
            f.sup.retire(i)

    def _remove_stopped(self) -> None:
        """Drop the last workers once they have stopped (indexes stay dense)."""
        f = self.front
        while self.retiring and len(f.links) - 1 in self.retiring:
            i = len(f.links) - 1
            if f.sup.workers[i].state is not WorkerState.STOPPED:
                break
            link = f.links.pop()
            f.channels.windows.pop()
            f.sup.remove_last()
            link.disconnect()
            link.run_slot.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link.run_slot.path)
            self.retiring.discard(i)
            log.info("resize: worker %d removed", i)

    def _finish(self, error: str | None) -> None:
        f = self.front
        self.error = error
        self.done_generation = self.generation
        if error is None:
            log.info(
                "resize to %d workers done in %.1f s", len(f.links), time.monotonic() - self.started
            )
        else:
            log.warning("resize called off: %s", error)
        f.cv.notify_all()

    def halt(self) -> None:
        """The pool is closing or broken: a resize in progress ends here (waiters wake)."""
        if self.busy():
            self._finish("the pool stopped during the resize")

    def report(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "in_progress": self.busy(),
            "retiring": sorted(self.retiring),
            "error": self.error,
        }
