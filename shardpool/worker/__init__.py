"""The worker: a process with one asyncio event loop serving its channels strictly in order.

::

    front ── BATCH / STATS / CONTROL / STOP ──▶ serve loop ──▶ Dispatcher ──▶ handler(channel, seq,
                                                (serve.py)     (dispatch.py)        message, ...)
    front ── DRAIN / CANCEL / INSTALL (moves) ──▶ serve loop ──▶ Handoff (handoff.py)
    front ◀── READY / ACK / STATS / HEARTBEAT / LOAD / SLOT_STATE / CANCELLED / STOPPING / BYE /
              CRASH ── Acks (acks.py)
    front ◀── run slot (shared memory: what was taken in, which careful call runs) ── process.py

* :mod:`.process` — what a worker is given (:class:`WorkerSpec`), its entry point, the parent
  guard (it leaves within about a second of its front's death), the run slot. Its exit codes are
  in :mod:`shardpool.exitcodes`.
* :mod:`.serve` — one incarnation's life: start, serve frames, stop request, heartbeat, load
  report, idle sweep, BYE.
* :mod:`.dispatch` — messages to per-channel FIFOs, one handler call per channel at a time,
  order checks, failure policies, careful replays, forgetting channels.
* :mod:`.handoff` — channels leaving (drained, their state taken) and arriving (restored) with a
  slot move.
* :mod:`.acks` — what finished, one ACK frame per event-loop turn.
"""

from .acks import Acks
from .dispatch import Dispatcher
from .process import (
    NO_MESSAGE,
    RunSlot,
    WorkerSpec,
    guard_parent,
    worker_main,
)
from .serve import Worker

__all__ = [
    "NO_MESSAGE",
    "Acks",
    "Dispatcher",
    "RunSlot",
    "Worker",
    "WorkerSpec",
    "guard_parent",
    "worker_main",
]
