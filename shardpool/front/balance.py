"""Load levelling: measured load per slot and worker, and the moves that even it out.

Every ``pool.rebalance_interval_s`` each worker reports (LOAD) the CPU time it used and the
messages it finished per slot and for its busiest channels. The CPU time is divided among the slots
by their messages: a slot's load is the share of a core it kept busy. The front smooths it (EWMA,
``ALPHA``) per slot and per hot channel; a worker's load is the sum over the slots it owns now.

Each period the front plans (:meth:`Balancer.tick`):

* **levelling**: when the busiest worker is more than ``pool.rebalance_threshold`` above the mean
  for ``STREAK`` periods running (or more than ``SURGE`` once) and busy at least ``MIN_BUSY`` of a
  core, move its hottest slots to the least loaded worker, each only if it leaves that worker
  under the cap ``(1 + CAP) × mean`` and brings the pair closer, never a slot moved within
  ``pool.rebalance_grace_s``; at most ``MAX_MOVES`` slots per period;
* **hot channels**: a channel above ``pool.hot_channel_share`` of the mean worker load for
  ``STREAK`` periods is pinned to the least loaded worker, which becomes *dedicated*: its other
  slots are moved away (the busy ones ``MAX_MOVES`` a period, the idle ones at once). It is
  unpinned once it stays under half that share for ``COOL`` periods. A channel that keeps a whole
  core busy is *saturated*: reported, never split (order forbids it).

``pool.rebalance = "advise"`` logs the plan (when it changes) and shows it in stats and status;
``"auto"`` carries it out through the move barrier; ``"off"`` only measures.

Not thread-safe: the front calls it with its lock held.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import codec
from ..errors import MoveRefused
from ..supervisor import WorkerState
from .link import Link
from .state import PoolState

if TYPE_CHECKING:
    from .engine import Front

__all__ = ["Balancer"]

log = logging.getLogger("shardpool.front")

ALPHA = 0.3  # EWMA weight of the newest period
STREAK = 3  # periods over the threshold before levelling (or pinning) acts
SURGE = 0.3  # ... or once, this far over the mean
MIN_BUSY = 0.2  # the busiest worker's share of a core below which nothing moves
CAP = 0.05  # a destination may end at most this far over the mean
MAX_MOVES = 8  # slots moved per period
COOL = 10  # periods under half the hot share before a pinned channel goes back
SATURATED = 0.9  # a channel keeping this much of a core busy cannot be helped
_FORGET = 1e-4  # a smoothed load below this (share of a core) is dropped
_UNMEASURED = 1e-6  # weight of a slot with no measured load: counts still level


class Balancer:
    """Measured load and the levelling plan of one front (see the module docstring)."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.slot_load: dict[int, float] = {}
        self.chan_load: dict[bytes, float] = {}
        self.streak = 0
        self.hot_streak: dict[bytes, int] = {}
        self.cool_streak: dict[bytes, int] = {}
        self.auto_pins: set[bytes] = set()  # pinned by levelling (unpinned by it too)
        self.saturated: list[str] = []
        self.plan: list[dict[str, Any]] = []
        self._shown: list[dict[str, Any]] = []
        self.next_tick = time.monotonic() + front.cfg.pool.rebalance_interval_s

    # -- measuring -----------------------------------------------------------------------------

    def on_load(self, link: Link, msg: list[Any]) -> None:
        """A LOAD report of ``link``'s current incarnation."""
        load = codec.Load._make(msg[1:])
        if load.wall_s <= 0:
            return
        busy = min(1.0, max(0.0, load.cpu_s / load.wall_s))
        total = sum(load.slots.values())
        table = self.front.channels.router.table
        fresh = {s: busy * n / total for s, n in load.slots.items()} if total else {}
        # A slot counts where it is owned now: what a worker reports of a slot it no longer
        # owns (moved during the period) or of a channel pinned to it is left to the owner's
        # report and to the channel's own load.
        for s in [s for s, w in enumerate(table) if w == link.index]:
            self._smooth(self.slot_load, s, fresh.get(s, 0.0))
        hot = {bytes(cid): busy * n / total for cid, n in load.hot} if total else {}
        for cid in list(self.chan_load):
            if self.front.channels.worker_of(cid) == link.index and cid not in hot:
                self._smooth(self.chan_load, cid, 0.0)
        for cid, x in hot.items():
            self._smooth(self.chan_load, cid, x)

    @staticmethod
    def _smooth(table: dict[Any, float], key: Any, x: float) -> None:
        old = table.get(key)
        new = x if old is None else ALPHA * x + (1 - ALPHA) * old
        if new < _FORGET:
            table.pop(key, None)
        else:
            table[key] = new

    def slot_weight(self, slot: int) -> float:
        """A slot's smoothed load (share of a core), or a token weight if none was measured."""
        return self.slot_load.get(slot, 0.0) + _UNMEASURED

    def worker_loads(self) -> list[float]:
        """Each worker's load: the sum of its slots' (and pinned channels') smoothed loads."""
        ch = self.front.channels
        loads = [0.0] * len(self.front.links)
        for s, x in self.slot_load.items():
            loads[ch.router.table[s]] += x
        for cid, w in ch.pins.items():
            if w != ch.router.table[ch.router.slot_of(cid)] and w < len(loads):
                loads[w] += self.chan_load.get(cid, 0.0)
        return loads

    # -- planning ------------------------------------------------------------------------------

    def tick(self, now: float) -> float:
        """Plan (and in ``auto`` mode act) once per period; seconds until the next period."""
        f = self.front
        period = f.cfg.pool.rebalance_interval_s
        if now < self.next_tick:
            return self.next_tick - now
        self.next_tick = now + period
        mode = f.cfg.pool.rebalance
        if mode == "off" or f.state != PoolState.RUNNING or f.resizer.busy() or f.roller.busy():
            self.plan = []
            return period
        self.plan = self._plan(now)
        if mode == "auto":
            self._act(now)
        elif self.plan and self.plan != self._shown:
            log.info("levelling plan (pool.rebalance = advise): %s", _describe(self.plan))
        self._shown = self.plan
        return period

    def _candidates(self) -> list[int]:
        """Workers that may take load: ready and not retiring."""
        f = self.front
        return [
            i for i in range(len(f.links))
            if i not in f.resizer.retiring and f.sup.workers[i].state is WorkerState.READY
        ]

    def _plan(self, now: float) -> list[dict[str, Any]]:
        loads = self.worker_loads()
        workers = self._candidates()
        if len(workers) < 2:
            return []
        mean = sum(loads[i] for i in workers) / len(workers)
        plan = self._plan_pins(loads, workers, mean)
        dedicated = self._dedicated()
        # A worker this period pins a hot channel to is dedicated from now on: no slot goes there.
        dedicated.update({step["dst"]: bytes.fromhex(step["channel"]) for step in plan
                          if step["kind"] == "pin"})
        plan += self._plan_slots(now, loads, workers, mean, dedicated)
        return plan

    def _dedicated(self) -> dict[int, bytes]:
        """Workers given to one pinned hot channel → that channel."""
        return {self.front.channels.pins[c]: c for c in self.auto_pins
                if c in self.front.channels.pins}

    def _plan_pins(
        self, loads: list[float], workers: list[int], mean: float
    ) -> list[dict[str, Any]]:
        f = self.front
        ch = f.channels
        share = f.cfg.pool.hot_channel_share
        plan: list[dict[str, Any]] = []
        self.saturated = [c.hex() for c, x in self.chan_load.items() if x >= SATURATED]
        if share <= 0:
            return plan
        dedicated = self._dedicated()
        for cid, x in sorted(self.chan_load.items(), key=lambda kv: -kv[1]):
            if cid in self.auto_pins:
                continue
            if x > share * mean and mean > 0:
                self.hot_streak[cid] = self.hot_streak.get(cid, 0) + 1
            else:
                self.hot_streak.pop(cid, None)
                continue
            if self.hot_streak[cid] < STREAK or cid in ch.pins:
                continue
            if len(dedicated) >= max(1, len(workers) // 4):
                break
            here = ch.worker_of(cid)
            free = [w for w in workers if w not in dedicated and w != here]
            if not free:
                break
            dst = min(free, key=loads.__getitem__)
            plan.append({"kind": "pin", "channel": cid.hex(), "src": here, "dst": dst,
                         "load": round(x, 4)})
            dedicated[dst] = cid
        for cid in sorted(self.auto_pins):
            x = self.chan_load.get(cid, 0.0)
            if x < 0.5 * share * mean:
                self.cool_streak[cid] = self.cool_streak.get(cid, 0) + 1
            else:
                self.cool_streak.pop(cid, None)
            if self.cool_streak.get(cid, 0) >= COOL and cid in ch.pins:
                plan.append({"kind": "unpin", "channel": cid.hex(), "src": ch.pins[cid],
                             "dst": ch.router.worker_of(cid), "load": round(x, 4)})
        return plan

    def _plan_slots(
        self,
        now: float,
        loads: list[float],
        workers: list[int],
        mean: float,
        dedicated: dict[int, bytes],
    ) -> list[dict[str, Any]]:
        f = self.front
        ch = f.channels
        grace = f.cfg.pool.rebalance_grace_s
        threshold = f.cfg.pool.rebalance_threshold
        movable = [w for w in workers if w not in dedicated]
        if not movable:
            return []

        def free(s: int) -> bool:
            return s not in ch.moving and now - f.mover.moved_at.get(s, -1e18) >= grace

        moves = self._clear_dedicated(loads, movable, dedicated, free)
        count = sum(len(v) for v in moves.values())
        busiest = max(movable, key=loads.__getitem__)
        over = loads[busiest] - mean
        if loads[busiest] >= MIN_BUSY and over > threshold * mean:
            self.streak += 1
        else:
            self.streak = 0
        if self.streak >= STREAK or (loads[busiest] >= MIN_BUSY and over > SURGE * mean):
            for s in sorted(ch.router.slots_of(busiest), key=self.slot_weight, reverse=True):
                if count >= MAX_MOVES:
                    break
                dst = min(movable, key=loads.__getitem__)
                x = self.slot_load.get(s, 0.0)
                if not free(s) or x <= 0 or dst == busiest:
                    continue
                if loads[dst] + x > (1 + CAP) * mean or loads[dst] + x >= loads[busiest]:
                    continue
                moves.setdefault((busiest, dst), []).append(s)
                loads[busiest] -= x
                loads[dst] += x
                count += 1
        return [
            {"kind": "move", "slots": slots, "src": src, "dst": dst,
             "load": round(sum(self.slot_load.get(s, 0.0) for s in slots), 4)}
            for (src, dst), slots in moves.items()
        ]

    def _clear_dedicated(
        self,
        loads: list[float],
        movable: list[int],
        dedicated: dict[int, bytes],
        free: Any,
    ) -> dict[tuple[int, int], list[int]]:
        """A dedicated worker keeps its hot channel alone: its slots go to the others — at most
        ``MAX_MOVES`` with a measured load per period (each to the least loaded worker), and up
        to ``pool.max_concurrent_moves`` idle ones (spread over the others in turn: they cost a
        drain round trip, not a pause anyone waits on), so the worker is alone within periods,
        not the minutes that 8 slots a period would take."""
        f = self.front
        moves: dict[tuple[int, int], list[int]] = {}
        measured = idle = 0
        for w in dedicated:
            for s in sorted(f.channels.router.slots_of(w), key=self.slot_weight,
                            reverse=True):
                busy = s in self.slot_load
                full = measured >= MAX_MOVES if busy else idle >= f.cfg.pool.max_concurrent_moves
                if full or not free(s):
                    continue
                if busy:
                    measured += 1
                    dst = min(movable, key=loads.__getitem__)
                else:
                    dst = movable[idle % len(movable)]
                    idle += 1
                moves.setdefault((w, dst), []).append(s)
                loads[w] -= min(loads[w], self.slot_load.get(s, 0.0))
                loads[dst] += self.slot_weight(s)
        return moves

    def _act(self, now: float) -> None:
        f = self.front
        for step in self.plan:
            try:
                if step["kind"] == "move":
                    f.mover.start(tuple(step["slots"]), (), step["dst"], "levelling")
                else:
                    cid = bytes.fromhex(step["channel"])
                    f.mover.start((), (cid,), step["dst"], "hot channel" if step["kind"] == "pin"
                                  else "unpin")
                    if step["kind"] == "pin":
                        self.auto_pins.add(cid)
                        self.hot_streak.pop(cid, None)
                    else:
                        self.auto_pins.discard(cid)
                        self.cool_streak.pop(cid, None)
            except MoveRefused as exc:
                log.info("levelling: %s not started: %s", step["kind"], exc)

    def on_unpinned(self, cid: bytes) -> None:
        """An operator unpinned (or re-pinned) ``cid``: levelling no longer owns that pin."""
        self.auto_pins.discard(cid)
        self.cool_streak.pop(cid, None)

    # -- reporting -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        f = self.front
        loads = self.worker_loads()
        total = sum(loads)
        return {
            "mode": f.cfg.pool.rebalance,
            "load": [round(x, 4) for x in loads],
            "load_share": [round(x / total, 4) if total else 0.0 for x in loads],
            "plan": self.plan,
            "dedicated": {w: c.hex() for w, c in self._dedicated().items()},
            "saturated": self.saturated,
        }


def _describe(plan: list[dict[str, Any]]) -> str:
    parts = []
    for step in plan:
        if step["kind"] == "move":
            parts.append(
                f"move {len(step['slots'])} slot(s) worker {step['src']} → {step['dst']} "
                f"(load {step['load']:.3f})"
            )
        else:
            parts.append(
                f"{step['kind']} channel {step['channel']} worker {step['src']} → {step['dst']} "
                f"(load {step['load']:.3f})"
            )
    return "; ".join(parts)
