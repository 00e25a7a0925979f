"""Moving slots, or single channels, between workers while the pool runs, without reordering.

A move of slots ``S`` (or of channels ``C``, a pin) from worker ``src`` to ``dst``:

=========  =======  ======================================================================
step       who      action
=========  =======  ======================================================================
fence      front    every known channel of ``S`` holds its new messages at the front, in
                    order (a channel that appears during the move too); producers of ``S``
                    block once ``pool.move_buffer_max`` are held; others run on
mark       front    flush ``src``'s pending batch, then DRAIN(gen, S, C) on its pipe: FIFO,
                    so it arrives after every message of ``S`` sent before
drain      src      once every channel of ``S`` is idle (awaits and retries included; a
                    halted one counts as idle), acknowledge, take their state, send
                    SLOT_STATE(gen, states) and forget them
commit     front    the one point of no return: route ``S`` to ``dst``, move halted
                    channels' parked messages out of ``src``'s window, append INSTALL(gen,
                    states) to ``dst``'s window (a window entry: replayed first if ``dst``
                    dies), then the parked and the held messages, in order
install    dst      restore each channel — state, the order checker's expectation, a halt —
                    before any of its messages (FIFO), acknowledge INSTALL
=========  =======  ======================================================================

Before the commit a move can always be called off: CANCEL(gen) to ``src``, which keeps its
channels and answers CANCELLED; then the held messages go to ``src`` behind what it already has.
A drain that does not finish within ``pool.move_timeout_s`` is cancelled that way, naming the
channels that were still busy. If ``src`` dies during the move, the move is off: its window is
replayed to its successor first, then the held messages. If ``dst`` dies after the commit, INSTALL
is replayed to its successor ahead of the moved channels' messages, so their state comes out
exact. Every DRAIN/SLOT_STATE/CANCEL carries the move's generation: a frame of a move that is
over is ignored, as is one of a dead worker incarnation.

Not thread-safe: the front calls it with its lock held.
"""

from __future__ import annotations

import collections
import itertools
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import codec
from ..codec import ToWorker
from ..errors import MoveRefused
from ..supervisor import WorkerState
from .link import Link
from .state import PoolState

if TYPE_CHECKING:
    from .engine import Front

__all__ = ["Move", "Mover"]

log = logging.getLogger("shardpool.front")

_PAUSES_KEPT = 1000  # recent move pauses kept for the p50/p99 in stats


@dataclass(eq=False)
class Move:
    """One move in progress (or just ended): what, from where to where, and how it went.

    ``state``: ``"draining"`` (DRAIN sent), ``"cancelling"`` (CANCEL sent), ``"committed"`` or
    ``"aborted"`` (with ``error``). ``held`` counts the messages held at the front for it;
    ``pause_s`` is the time from the fence to the commit (seconds).
    """

    gen: int
    slots: tuple[int, ...]
    cids: tuple[bytes, ...]
    src: int
    dst: int
    reason: str
    started: float
    deadline: float
    state: str = "draining"
    held: int = 0
    error: str | None = None
    pause_s: float | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def describe(self) -> str:
        what = (
            f"{len(self.slots)} slot(s)" if self.slots else f"channel {self.cids[0].hex()}"
        )
        return f"move {self.gen} ({what}, worker {self.src} → {self.dst}, {self.reason})"

    def report(self, now: float) -> dict[str, Any]:
        """What placement and the control socket show of it: ``age_s`` is the time since the
        fence, ``pause_s`` from the fence to the commit (None before), both in seconds."""
        return {
            "gen": self.gen,
            "slots": list(self.slots),
            "channels": [cid.hex() for cid in self.cids],
            "src": self.src,
            "dst": self.dst,
            "reason": self.reason,
            "state": self.state,
            "age_s": now - self.started,
            "held": self.held,
            "pause_s": self.pause_s,
        }


class Mover:
    """The moves of one front (see the module docstring)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self._gens = itertools.count(1)
        self.moves: dict[int, Move] = {}  # gen → move in progress
        self.slot_gen: dict[int, int] = {}  # slot → generation of its last move
        # slot → when its last move committed or was called off (monotonic s): levelling leaves
        # it alone for pool.rebalance_grace_s either way, so it neither ping-pongs nor retries a
        # move that cannot succeed (a state that cannot move) every period.
        self.moved_at: dict[int, float] = {}
        self.pauses: collections.deque[float] = collections.deque(maxlen=_PAUSES_KEPT)
        self.counts: dict[str, int] = dict.fromkeys(("committed", "aborted"), 0)

    # -- starting ------------------------------------------------------------------------------

    def start(
        self, slots: tuple[int, ...], cids: tuple[bytes, ...], dst: int, reason: str
    ) -> Move:
        """Fence ``slots`` (or the channels ``cids``) and ask their owner to drain them.

        Raises:
            MoveRefused: the pool is not running, ``dst`` or the owner is not ready, a slot or
                channel is already moving, they have different owners, or too many slots move.
        """
        f = self.front
        ch = f.channels
        if f.state != PoolState.RUNNING:
            raise MoveRefused("the pool is not running")
        if not 0 <= dst < len(f.links) or f.sup.workers[dst].state is not WorkerState.READY:
            raise MoveRefused(f"worker {dst} is not ready")
        if dst in f.resizer.retiring | f.roller.evacuating():
            raise MoveRefused(f"worker {dst} is retiring (a resize down or a rolling restart)")
        src = self._owner(slots, cids)
        if src == dst:
            raise MoveRefused(f"already on worker {dst}")
        if f.links[src].sock is None:
            raise MoveRefused(f"worker {src} (the owner) is not ready")
        busy = [s for s in slots if s in ch.moving]
        busy_cids = [c for c in cids if (r := ch.routes.get(c)) is not None and r.move is not None]
        if busy or busy_cids:
            raise MoveRefused(f"already moving: slot {busy[0]}" if busy else "already moving")
        moving = sum(len(m.slots) + len(m.cids) for m in self.moves.values())
        limit = f.cfg.pool.max_concurrent_moves
        if moving + len(slots) + len(cids) > limit:
            raise MoveRefused(
                f"{moving} slots are moving; pool.max_concurrent_moves = {limit} allows "
                f"{max(0, limit - moving)} more"
            )
        now = time.monotonic()
        move = Move(
            next(self._gens), slots, cids, src, dst, reason, now,
            now + f.cfg.pool.move_timeout_s,
        )
        for s in slots:
            ch.moving[s] = move
        for cid in ch.of_slots(slots) + [c for c in cids if c in ch.routes]:
            route = ch.routes[cid]
            route.move = move
            if route.held is None:
                route.held = []
        # Channels of these slots pinned to src stay where they are.
        keep = [c for s in slots for c in ch.by_slot.get(s, ()) if ch.pins.get(c) == src]
        link = f.links[src]
        if link.window.parts:
            link.flush()
        link.send(ToWorker.DRAIN, move.gen, list(slots), list(cids), keep)
        self.moves[move.gen] = move
        log.info("%s: draining", move.describe())
        return move

    def _owner(self, slots: tuple[int, ...], cids: tuple[bytes, ...]) -> int:
        """The one worker that owns every slot (and channel) to move.

        Raises:
            MoveRefused: nothing to move, or they are spread over several workers.
        """
        f = self.front
        owners = {f.channels.router.table[s] for s in slots}
        for cid in cids:
            route = f.channels.routes.get(cid)
            if route is not None:
                owners.add(route.window.index)
            else:
                slot = f.channels.router.slot_of(cid)
                owners.add(f.channels.pins.get(cid, f.channels.router.table[slot]))
        if len(owners) != 1:
            raise MoveRefused(
                "nothing to move" if not owners else f"owned by several workers: {sorted(owners)}"
            )
        return owners.pop()

    # -- the worker's answers ------------------------------------------------------------------

    def on_slot_state(self, link: Link, msg: list[Any]) -> None:
        """SLOT_STATE from ``link``'s current incarnation: commit (or give up, if the state could
        not be taken)."""
        reply = codec.SlotState._make(msg[1:])
        move = self.moves.get(reply.gen)
        if move is None or move.src != link.index:
            return  # a move that is over
        if reply.error is not None:
            cid, why = reply.error
            self._abort(move, f"the state of channel {bytes(cid).hex()} cannot move: {why}")
            return
        f = self.front
        if f.state != PoolState.RUNNING:
            # Closing or broken: nothing commits any more; the held messages stay held and are
            # reported by the close (the drained channels' state goes with the pool).
            self._end(move, "aborted", "the pool stopped during the move")
            return
        dst_state = f.sup.workers[move.dst].state
        alive = (WorkerState.READY, WorkerState.STARTING, WorkerState.DEAD)
        self._commit(move, move.dst if dst_state in alive else move.src, reply.states)

    def on_cancelled(self, link: Link, msg: list[Any]) -> None:
        """CANCELLED: ``src`` kept the channels; the held messages go back to it."""
        reply = codec.Cancelled._make(msg[1:])
        move = self.moves.get(reply.gen)
        if move is None or move.src != link.index:
            return
        why = move.error or "cancelled"
        if reply.busy:
            shown = ", ".join(bytes(c).hex() for c in reply.busy[:3])
            more = f" and {len(reply.busy) - 3} more" if len(reply.busy) > 3 else ""
            why += f"; still busy: channel {shown}{more}"
        self._abort(move, why)

    # -- timers and deaths ---------------------------------------------------------------------

    def tick(self, now: float) -> float | None:
        """Cancel the drains past their deadline; seconds until the next deadline (None: none)."""
        due: float | None = None
        timeout = self.front.cfg.pool.move_timeout_s
        for move in list(self.moves.values()):
            if move.state != "draining":
                continue
            if now >= move.deadline:
                move.state = "cancelling"
                move.error = f"could not drain within pool.move_timeout_s = {timeout:g} s"
                if not self.front.links[move.src].send(ToWorker.CANCEL, move.gen):
                    self._abort(move, move.error)
            else:
                left = move.deadline - now
                due = left if due is None else min(due, left)
        return due

    def on_death(self, index: int) -> None:
        """Worker ``index`` died: a move it was draining is off (its window is replayed to the
        successor first, then the held messages). A move *to* it goes on: the commit puts
        INSTALL in its window, which the successor gets first."""
        for move in list(self.moves.values()):
            if move.src == index:
                self._abort(move, f"worker {index} died during the move")

    def halt(self) -> None:
        """Stop every move (the pool is closing or broken): held messages stay held, for the
        close report."""
        for move in list(self.moves.values()):
            self._end(move, "aborted", "the pool stopped during the move")

    # -- ending --------------------------------------------------------------------------------

    def _members(self, move: Move) -> list[bytes]:
        ch = self.front.channels
        cids = [c for c in ch.of_slots(move.slots) if ch.routes[c].move is move]
        return cids + [c for c in move.cids if c in ch.routes and ch.routes[c].move is move]

    def _commit(self, move: Move, target: int, states: list[list[Any]]) -> None:
        f = self.front
        ch = f.channels
        members = self._members(move)
        halted = {cid for cid in members if cid in ch.halts}
        src, dst = f.links[move.src], f.links[target]
        parked = src.window.extract(halted) if halted else []
        now = time.monotonic()
        for s in move.slots:
            ch.router.table[s] = target
            self.slot_gen[s] = move.gen
            self.moved_at[s] = now
        for cid in move.cids:
            if move.reason == "unpin":
                ch.pins.pop(cid, None)  # back with its slot
            else:
                ch.pins[cid] = target  # (a pin to its slot's worker too: it stays if the slot goes)
        dst.install(move.gen, states)
        win = dst.window
        for item, waiter in parked:  # a halted channel's parked messages, still parked there
            f.place(ch.routes[item[0]], item[1], item[2], waiter, win)
        for cid in members:
            route = ch.routes[cid]
            route.window = win
            route.move = None
            if cid not in halted:
                self._release(route)
        src.window.count_parked(ch.is_halted)
        win.count_parked(ch.is_halted)
        move.pause_s = now - move.started
        self.pauses.append(move.pause_s)
        if target != move.dst:
            move.error = f"worker {move.dst} went away: the channels stayed on worker {target}"
        self._end(move, "committed", move.error)

    def _abort(self, move: Move, why: str) -> None:
        """Call the move off before its commit: the held messages go to their old worker."""
        ch = self.front.channels
        for cid in self._members(move):
            route = ch.routes[cid]
            route.move = None
            if cid not in ch.halts:
                self._release(route)
        self._end(move, "aborted", why)

    def _release(self, route: Any) -> None:
        held, route.held = route.held or [], None
        for cseq, payload, on_done in held:
            self.front.place(route, cseq, payload, on_done, route.window)

    def _end(self, move: Move, state: str, error: str | None) -> None:
        ch = self.front.channels
        for s in move.slots:
            if ch.moving.get(s) is move:
                del ch.moving[s]
        for cid in self._members(move):
            ch.routes[cid].move = None
        move.state = state
        move.error = error
        self.moves.pop(move.gen, None)
        self.counts[state] += 1
        if state == "aborted":
            now = time.monotonic()
            for s in move.slots:
                self.moved_at[s] = now
            if move.reason == "resize":
                self.front.resizer.on_aborted(move.slots, move.cids, error or state)
            elif move.reason == "roll":
                self.front.roller.on_aborted(move.slots, move.cids, error or state)
        if state == "committed":
            log.info("%s: committed after %.1f ms%s", move.describe(), 1000 * (move.pause_s or 0),
                     f" ({error})" if error else "")
        else:
            log.warning("%s: aborted: %s", move.describe(), error)
        move.done.set()
        self.front.cv.notify_all()

    # -- reporting -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        pauses = sorted(self.pauses)

        def pct(q: float) -> float | None:
            return pauses[min(len(pauses) - 1, int(q * len(pauses)))] if pauses else None

        return {
            "in_progress": [m.report(now) for m in self.moves.values()],
            "committed": self.counts["committed"],
            "aborted": self.counts["aborted"],
            "pause_p50_s": statistics.median(pauses) if pauses else None,
            "pause_p99_s": pct(0.99),
        }
