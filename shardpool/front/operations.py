"""An operator's decisions on halted channels, and the figures the front reports.

Both run on the caller's thread with the front's lock held while they act.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .. import codec
from ..codec import ToWorker
from ..routing import check_channel_id
from .outcomes import Outcome, deliver

if TYPE_CHECKING:
    from .engine import Front

__all__ = ["control", "stats"]

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
        if not link.send(ToWorker.CONTROL, op, cid) and op == "skip":
            # The worker is being restarted: the replay will not re-halt the channel, so
            # settle the failed message here instead (a resume needs nothing: the replay
            # runs it).
            for w, item in win.open_entries():
                if item[0] == cid and item[1] == halt.seq:
                    front.io.on_ack(link, [], [], [codec.operator_skip(w)], outcomes)
                    break
        held, route.held = route.held or [], None
        win.count_parked(front.channels.is_halted)
        for cseq, payload, on_done in held:
            if win.place(route.prefix, cseq, payload, on_done):
                front.batch_started(win)
            elif len(win.parts) >= front.batch_parts:
                link.flush()
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
        asked = [k.index for k in front.links if k.send(ToWorker.STATS, req)]
        deadline = time.monotonic() + timeout
        while len(replies) < len(asked) and time.monotonic() < deadline:
            front.cv.wait(deadline - time.monotonic())
        del front.stats_replies[req]
        for index, reply in replies.items():
            front.links[index].stats = reply
        workers = [{**k.report(), **front.sup.report(k.index)} for k in front.links]
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
            "workers": workers,
        }
