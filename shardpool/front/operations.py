"""An operator's decisions on halted channels, and the figures the front reports.

Both run on the caller's thread with the front's lock held while they act.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from ..codec import ToWorker
from ..errors import MoveRefused
from ..routing import check_channel_id
from .outcomes import Outcome, deliver

if TYPE_CHECKING:
    from .engine import Front
    from .moves import Move

__all__ = ["control", "move", "pin", "stats", "unpin"]

log = logging.getLogger("shardpool.front")


def control(front: Front, channel_id: bytes, op: str) -> None:
    """An operator's decision on a halted channel, sent to its worker in band: ``resume``
    (run the failed message again) or ``skip`` (record it as skipped); then its held
    messages follow in order.

    Raises:
        NotHalted: the channel is not halted.
    """
    outcomes: list[Outcome] = []
    with front.lock:
        cid = check_channel_id(channel_id)
        halt, route = front.channels.resume(cid)
        log.info(
            "channel %s: %s by the operator (was %s at seq %d)",
            cid.hex(),
            "resumed" if op == "resume" else "skipped",
            "quarantined" if halt.quarantined else "halted",
            halt.seq,
        )
        win = route.window
        link = front.links[win.index]
        if win.parts:
            link.flush()
        if op == "skip":
            # Until the worker acknowledges the skip, the front remembers it: if the worker is
            # down, or dies before it has read it, the front settles the message itself, so
            # the replay does not run it again (a resume needs nothing: the replay runs it).
            front.channels.skipping[cid] = halt.seq
        if not link.send(ToWorker.CONTROL, op, cid) and op == "skip":
            front.io.settle_skips(link, outcomes)
        win.count_parked(front.channels.is_halted)
        if route.move is None:  # (a moving channel's messages stay held until the move ends)
            held, route.held = route.held or [], None
            for cseq, payload, on_done in held:
                front.place(route, cseq, payload, on_done, win)
        front.cv.notify_all()
    deliver(outcomes)


def stats(front: Front, timeout: float) -> dict[str, Any]:
    """Front counters and a fresh per-worker report (asked in band, so it reflects every
    message sent before the call). A worker that does not answer in ``timeout`` seconds keeps
    its last known figures."""
    with front.lock:
        req = next(front.stats_ids)
        replies = front.stats_replies[req] = {}
        front.flush_pending()
        remote = front.remote
        # (A remote worker silent past its lease is not asked: it would only hold the answer.)
        asked = [
            k.index for k in front.links
            if not (remote is not None and remote.silent(k.index)) and k.send(ToWorker.STATS, req)
        ]
        deadline = time.monotonic() + timeout
        while len(replies) < len(asked) and time.monotonic() < deadline:
            front.cv.wait(deadline - time.monotonic())
        del front.stats_replies[req]
        for index, reply in replies.items():
            front.links[index].stats = reply
        workers = [
            {
                **k.report(),
                **front.sup.report(k.index),
                **(
                    remote.report(k.index)
                    if remote is not None and remote.is_remote(k.index)
                    else {"remote": False, "host": "local", "link": "ipc"}
                ),
            }
            for k in front.links
        ]
        channels = front.channels
        return {
            "state": front.state,
            "submitted": channels.submitted(),
            **front.counters,
            "batches": sum(k.batches_sent for k in front.links),
            "forgotten": channels.forgotten,
            "inflight": sum(k.window.inflight for k in front.links),
            "channels": len(channels.routes),
            "halted_channels": len(channels.halts),
            "halted": channels.report(),
            "placement": placement(front),
            "workers": workers,
            "remote": None if remote is None else remote.summary(),
        }


def move(
    front: Front,
    slots: tuple[int, ...],
    cids: tuple[bytes, ...],
    dst: int,
    reason: str,
    timeout: float | None,
) -> Move:
    """Move ``slots`` (or the channels ``cids``) to worker ``dst`` and wait up to ``timeout``
    seconds (default ``pool.move_timeout_s`` + 5) for the move to end; returns it (``state``
    ``"committed"``, or still in progress if the wait ran out).

    Raises:
        MoveRefused: it could not start, or it was called off (with the reason).
    """
    with front.lock:
        m = front.mover.start(slots, cids, dst, reason)
    m.done.wait(front.cfg.pool.move_timeout_s + 5 if timeout is None else timeout)
    if m.state == "aborted":
        raise MoveRefused(f"{m.describe()} was called off: {m.error}")
    return m


def pin(
    front: Front, channel_id: bytes, worker: int | None, timeout: float | None
) -> Move | None:
    """Place one channel on ``worker`` (None: the least loaded other worker that is not
    retiring), ahead of the slot table, through the move barrier (None: it was there already;
    the pin is recorded).

    Raises:
        ChannelIdError / MoveRefused.
    """
    cid = check_channel_id(channel_id)
    with front.lock:
        ch = front.channels
        route = ch.routes.get(cid)
        here = route.window.index if route is not None else ch.worker_of(cid)
        if worker is None:
            worker = least_loaded(front, exclude=here)
        front.balancer.on_unpinned(cid)  # the operator's pin from now on
        if here == worker:
            ch.pins[cid] = worker
            log.info("channel %s pinned to worker %d (already there)", cid.hex(), worker)
            return None
    return move(front, (), (cid,), worker, "pin", timeout)


def least_loaded(front: Front, exclude: int) -> int:
    """The worker other than ``exclude`` with the least measured load (then the fewest slots)
    that is not retiring.

    Raises:
        MoveRefused: there is no such worker.
    """
    loads = front.balancer.worker_loads()
    table = front.channels.router.table
    others = [
        w for w in range(len(front.links))
        if w != exclude and w not in front.resizer.retiring | front.roller.evacuating()
    ]
    if not others:
        raise MoveRefused("no other worker to pin to")
    return min(others, key=lambda w: (loads[w], table.count(w)))


def unpin(front: Front, channel_id: bytes, timeout: float | None) -> Move | None:
    """Send a pinned channel back to its slot's worker (None: it is there already).

    Raises:
        ChannelIdError / MoveRefused (also when the channel is not pinned).
    """
    cid = check_channel_id(channel_id)
    with front.lock:
        ch = front.channels
        if cid not in ch.pins:
            raise MoveRefused(f"channel {cid.hex()} is not pinned")
        front.balancer.on_unpinned(cid)
        owner = ch.router.worker_of(cid)
        if ch.pins[cid] == owner:
            del ch.pins[cid]
            log.info("channel %s unpinned (on its slot's worker %d)", cid.hex(), owner)
            return None
    return move(front, (), (cid,), owner, "unpin", timeout)


def placement(front: Front) -> dict[str, Any]:
    """Where the channels go (lock held): slots per worker, pins, moves (in progress, counts,
    pause p50/p99 in seconds), the resize under way, and the levelling (measured load per worker
    in shares of a core, the plan, dedicated workers, saturated channels), remote workers (link
    state, lease age, round trip, failovers, refusals)."""
    ch = front.channels
    per_worker = [0] * len(front.links)
    for w in ch.router.table:
        per_worker[w] += 1
    return {
        "workers": len(front.links),
        "slots_per_worker": per_worker,
        "pins": {cid.hex(): w for cid, w in ch.pins.items()},
        "moves": front.mover.report(),
        "resize": front.resizer.report(),
        "roll": front.roller.report(),
        "levelling": front.balancer.report(),
        "remote": None if front.remote is None else front.remote.summary(),
    }
