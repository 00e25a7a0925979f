"""Closing the front, in explicit phases, so that every accepted message ends in one outcome.

1. stop intake (producers get :class:`PoolClosed`);
2. drain, until :func:`stop_grace` before the deadline;
3. ask every worker to stop (SIGTERM): it finishes the handler call it is in, starts nothing more,
   reports which calls are running, acknowledges and says BYE;
4. kill whatever still runs at the deadline;
5. settle every message that did not finish: *unfinished* (never handed to a handler: safe to
   submit again) or *in doubt* (a handler may have run it: its worker was killed mid-call, or an
   earlier incarnation that had it died); a message its channel is halted on keeps its failure;
6. reap the processes, release sockets and the runtime directory.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import DrainTimeout, InDoubt, PoolBroken, PoolClosed
from .outcomes import Done, Outcome, deliver
from .state import PoolState
from .window import DoneCallback

if TYPE_CHECKING:
    from .engine import Front

__all__ = ["STOP_GRACE_S", "CloseReport", "close", "stop_grace"]

log = logging.getLogger("shardpool.front")

STOP_GRACE_S = 1.0
"""At most this much of a close's deadline is kept for the workers to finish the call they are in
after the drain (seconds); see :func:`stop_grace`."""

_Entry = tuple[bytes, int, bytes]  # (channel_id, cseq, payload)


def stop_grace(timeout: float) -> float:
    """The part of a ``timeout``-second close that follows the drain: a quarter, at most
    :data:`STOP_GRACE_S` (seconds)."""
    return min(STOP_GRACE_S, timeout / 4)


@dataclass
class CloseReport:
    """What :meth:`Front.close` could not finish. Every accepted message ends in exactly one of:
    finished (its result or failure was delivered; a message its channel is halted on counts as
    failed), ``unfinished`` (never handed to a handler: safe to submit again) or ``in_doubt`` (a
    worker was stopped or died while its handler may have been running it). Both lists hold
    ``(channel_id, seq, payload)`` in per-channel order; ``exitcodes`` maps worker index to exit
    code; ``drained`` is True when both are empty."""

    unfinished: list[_Entry] = field(default_factory=list)
    in_doubt: list[_Entry] = field(default_factory=list)
    exitcodes: dict[int, int | None] = field(default_factory=dict)
    drained: bool = True


def close(front: Front, timeout: float | None = None, *, drain: bool = True) -> CloseReport:
    """Shut down in phases: stop intake, drain, stop the workers, report, reap.

    ``timeout`` (seconds, default ``stop_timeout_s``) bounds the whole close. With ``drain``
    it waits for in-flight work until :func:`stop_grace` before the deadline; then each worker
    is asked to stop (SIGTERM): it finishes the handler call it is in, starts nothing more,
    acknowledges and leaves. Whatever still runs at the deadline is killed. Every message not
    finished is returned in the report, as unfinished (never handed to a handler) or in doubt
    (its handler may have run), and its ``on_done`` gets a :class:`PoolClosed` or an
    :class:`InDoubt`; a message its channel is halted on gets its failure. Idempotent.
    """
    if front.state == PoolState.CLOSED:
        return CloseReport()
    timeout = front.cfg.supervisor.stop_timeout_s if timeout is None else max(0.0, timeout)
    deadline = time.monotonic() + timeout
    report = CloseReport()
    # Phase 1: stop intake.
    with front.lock:
        was_broken = front.state == PoolState.BROKEN
        if not was_broken:
            front.set_state(PoolState.CLOSING)
        front.cv.notify_all()
    # Phase 2: drain, keeping the last part of the deadline for the workers to stop.
    if drain and not was_broken:
        with contextlib.suppress(DrainTimeout, PoolBroken):
            front.drain(max(0.0, deadline - stop_grace(timeout) - time.monotonic()))
    with front.lock:
        # Phase 3: ask every worker to stop, and wait for them until the deadline. A move in
        # progress ends here: its held messages stay held and are reported below.
        front.mover.halt()
        front.resizer.halt()
        front.roller.halt()
        front.sup.stop_all()
        _await_stopped(front, deadline)
        # Phase 4: kill what is left (its sentinel still has to be seen: a bounded wait).
        for index in front.sup.kill_stopping():
            log.warning("worker %d did not stop within the deadline; killed it", index)
        _await_stopped(front, time.monotonic() + 5.0)
        # Phase 5: settle every message that did not finish.
        outcomes = _settle(front, report)
        report.drained = not (report.unfinished or report.in_doubt)
        if not report.drained:
            log.warning(
                "closing with %d messages unfinished (never handed to a handler) and %d in "
                "doubt (a handler may have run them)",
                len(report.unfinished),
                len(report.in_doubt),
            )
        front.set_state(PoolState.CLOSED)
        front.cv.notify_all()
        front.release_room_waiters()
    deliver(outcomes)
    # Phase 6: reap the processes and release sockets and the runtime directory.
    report.exitcodes = front.teardown(reap_timeout=max(0.5, deadline - time.monotonic()))
    return report


def _await_stopped(front: Front, deadline: float) -> None:
    """Wait (lock held, released while waiting) until no worker is stopping, or the deadline."""
    while front.sup.stopping():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        front.cv.wait(min(left, 0.2))


def _settle(front: Front, report: CloseReport) -> list[Outcome]:
    """Sort every message that did not finish into ``report``; return the outcomes for their
    ``on_done`` (lock held; the workers are gone or being killed)."""
    outcomes: list[Outcome] = []
    halts = front.channels.halts

    def hand_back(entry: _Entry, on_done: DoneCallback | None, doubtful: bool) -> None:
        (report.in_doubt if doubtful else report.unfinished).append(entry)
        if on_done is not None:
            err = (
                InDoubt(
                    f"closed while channel {entry[0].hex()} seq {entry[1]} may have been in "
                    "its handler (its worker stopped or died before acknowledging it); it may "
                    "have been applied"
                )
                if doubtful
                else PoolClosed("closed before this message was handed to its handler")
            )
            outcomes.append(Done(on_done, None, err))

    for link in front.links:
        for item, on_done, doubtful in link.window.unsettled(
            link.said_bye, link.stop_running
        ):
            cid, cseq = item[0], item[1]
            halt = halts.get(cid)
            if halt is not None and halt.seq == cseq:
                # Handed to its handler and failed: that failure is its outcome.
                if on_done is not None:
                    outcomes.append(Done(on_done, None, halt.error))
                continue
            hand_back((cid, cseq, item[2]), on_done, doubtful)
        for on_done in link.window.waiters.values():  # none expected: all are in the window
            outcomes.append(Done(on_done, None, PoolClosed("the pool closed")))
        link.window.waiters.clear()
    for cid, route in front.channels.routes.items():
        for cseq, payload, on_done in route.held or ():
            hand_back((cid, cseq, payload), on_done, False)
    return outcomes
