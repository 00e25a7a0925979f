"""The front's per-channel records: routes, halts, and what counts against a poison message.

A channel's :class:`Route` says which worker's window it goes to, the next per-channel seq, the
pre-encoded start of its batch items, its slot, and — while the channel is halted or being moved —
the messages held back at the front in order (outside the window, so a parked channel cannot fill
its worker's window and stall the other channels). :class:`Channels` keeps the routes (and which
channels each slot holds, for moves), the pins (a channel placed on a worker of its own, ahead of
the slot table), the halts (with why and since when), the deaths counted against messages
(quarantine), and the rule by which a channel a worker forgot is forgotten here too.

Not thread-safe: the front calls it with its lock held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import codec
from ..errors import HandlerError, NotHalted
from ..routing import Router, check_channel_id
from .window import DoneCallback, Window

if TYPE_CHECKING:
    from .moves import Move

__all__ = ["Channels", "Halt", "Route", "quarantine_error"]

Held = list[tuple[int, bytes, "DoneCallback | None"]]  # (cseq, payload, on_done) while halted


class Route:
    """One channel as the front routes it (the producer hot path reads and bumps these)."""

    __slots__ = ("window", "next_seq", "prefix", "held", "slot", "move")

    def __init__(self, window: Window, prefix: bytes, slot: int) -> None:
        self.window = window
        self.next_seq = 0
        self.prefix = prefix  # array(3) head + the channel id: the start of each of its items
        # Messages waiting at the front, in order, while it is halted or being moved (else None).
        self.held: Held | None = None
        self.slot = slot
        self.move: Move | None = None  # the move fencing it


@dataclass
class Halt:
    """Why a channel is halted: the seq it is halted on, the failure reported for it, when
    (epoch seconds), and whether it was quarantined (its worker kept dying on that message)."""

    seq: int
    error: HandlerError
    since: float
    quarantined: bool = False


class Channels:
    """Routes, halts and poison-message counts of every channel the front knows."""

    def __init__(self, router: Router, windows: list[Window]) -> None:
        self.router = router
        self.windows = windows
        self.routes: dict[bytes, Route] = {}
        self.by_slot: dict[int, set[bytes]] = {}  # the channels of each slot the front knows
        self.pins: dict[bytes, int] = {}  # channel → the worker it is pinned to
        self.moving: dict[int, Move] = {}  # slot → the move it is part of
        self.halts: dict[bytes, Halt] = {}
        # Operator skips sent to a worker and not yet acknowledged by it: channel → the skipped
        # seq. If that worker dies first, the front settles the skip (FrontIO.settle_skips).
        self.skipping: dict[bytes, int] = {}
        # (cid, cseq) → deaths of a worker with this message in its handler (careful replays)
        self.suspects: dict[tuple[bytes, int], int] = {}
        self.forgotten = 0  # records dropped
        self._forgotten_submitted = 0  # messages numbered for channels since forgotten

    # -- routes --------------------------------------------------------------------------------

    def route(self, channel_id: Any) -> Route:
        """The route of ``channel_id``, created on its first message.

        Raises:
            ChannelIdError: not bytes of 1..64 bytes.
        """
        cid = check_channel_id(channel_id)
        route = self.routes.get(cid)
        if route is None:
            slot = self.router.slot_of(cid)
            pinned = self.pins.get(cid)
            worker = self.router.table[slot] if pinned is None else pinned
            route = self.routes[cid] = Route(self.windows[worker], codec.item_prefix(cid), slot)
            self.by_slot.setdefault(slot, set()).add(cid)
            move = self.moving.get(slot) if pinned is None else None
            if move is not None:
                # A new channel of a slot being moved: held here until the move ends.
                route.move = move
                route.held = []
        return route

    def worker_of(self, cid: bytes) -> int:
        """Where ``cid`` goes now: its route's worker, else its pin, else its slot's owner."""
        route = self.routes.get(cid)
        if route is not None:
            return route.window.index
        return self.pins.get(cid, self.router.table[self.router.slot_of(cid)])

    def of_slots(self, slots: tuple[int, ...]) -> list[bytes]:
        """The known channels of these slots that follow the slot table (pinned ones do not)."""
        pins = self.pins
        return [cid for s in slots for cid in self.by_slot.get(s, ()) if cid not in pins]

    def submitted(self) -> int:
        """Messages numbered so far, forgotten channels included."""
        return self._forgotten_submitted + sum(r.next_seq for r in self.routes.values())

    def forget(self, window: Window, entries: list[list[Any]]) -> int:
        """A worker dropped these ``[cid, next_cseq]`` channels: drop their routes too, unless a
        newer message was numbered since (it is on its way, and the channel lives on) or the
        channel is halted. Returns how many were dropped."""
        n = 0
        for cid, next_cseq in entries:
            route = self.routes.get(cid)
            if (
                route is not None
                and route.window is window
                and route.next_seq == next_cseq
                and route.held is None
                and cid not in self.halts
            ):
                del self.routes[cid]
                members = self.by_slot.get(route.slot)
                if members is not None:
                    members.discard(cid)
                    if not members:
                        del self.by_slot[route.slot]
                self._forgotten_submitted += next_cseq
                n += 1
        self.forgotten += n
        return n

    # -- halts ---------------------------------------------------------------------------------

    def halt(self, cid: bytes, halt: Halt) -> Window:
        """Park ``cid`` on ``halt.seq``: its later messages wait here. Returns its window (whose
        parked count the caller recounts)."""
        self.halts[cid] = halt
        route = self.routes[cid]
        if route.held is None:
            route.held = []
        return route.window

    def resume(self, cid: bytes) -> tuple[Halt, Route]:
        """Un-halt ``cid`` (an operator's resume or skip): its halt and route; the caller sends
        the decision to the worker and places the held messages.

        Raises:
            NotHalted: the channel is not halted.
        """
        halt = self.halts.pop(cid, None)
        if halt is None:
            raise NotHalted(f"channel {cid.hex()} is not halted")
        return halt, self.routes[cid]

    def is_halted(self, cid: bytes) -> bool:
        return cid in self.halts

    def halted_on(self, window: Window) -> list[bytes]:
        """The halted channels routed to ``window`` (re-halted before a replay)."""
        return [cid for cid in self.halts if self.routes[cid].window is window]

    def report(self) -> list[dict[str, Any]]:
        """Every halted channel: id, seq, since, quarantined, the error text and type."""
        return [
            {
                "channel": cid,
                "seq": halt.seq,
                "since": halt.since,
                "quarantined": halt.quarantined,
                "error": str(halt.error),
                "type": halt.error.exc_type,
            }
            for cid, halt in self.halts.items()
        ]

    # -- poison messages -----------------------------------------------------------------------

    def count_death(self, window: Window, key: tuple[bytes, int] | None) -> int:
        """Count a death against message ``key`` (None: no message explains it) and return its
        deaths so far. Forgets the counts of this window's messages that have since finished."""
        if self.suspects:
            open_keys = {(item[0], item[1]) for _, item in window.open_entries()}
            for k in [k for k in self.suspects if k not in open_keys]:
                route = self.routes.get(k[0])
                if route is None or route.window is window:
                    del self.suspects[k]
        if key is None:
            return 0
        n = self.suspects[key] = self.suspects.get(key, 0) + 1
        return n

    def quarantine(
        self, key: tuple[bytes, int], error: HandlerError
    ) -> tuple[Window, DoneCallback | None]:
        """Halt the channel of a message that keeps killing its worker; returns its window and
        the message's ``on_done`` (to be told of the halt)."""
        self.suspects.pop(key, None)
        window = self.halt(key[0], Halt(key[1], error, time.time(), quarantined=True))
        return window, window.waiter_of(*key)


def quarantine_error(
    key: tuple[bytes, int], death: str, hung: bool, deaths: int, limit: int, traceback: str
) -> HandlerError:
    """The failure reported for a quarantined message: the death (``"worker 0 killed by
    SIGSEGV"``), how many times, and the limit that was reached."""
    cid, cseq = key
    return HandlerError(
        f"channel {cid.hex()} quarantined at seq {cseq}: {death} with this message in its "
        f"handler, {deaths} times (supervisor.poison_after_crashes = {limit}); the channel is "
        "halted",
        channel_id=cid,
        seq=cseq,
        exc_type="WorkerHung" if hung else "WorkerDied",
        policy="quarantine",
        traceback=traceback,
    )
