"""The front: routing, batching, in-flight windows, result delivery, supervision.

::

  producer threads ── submit(cid, payload) ──┐                               (engine.py: Front)
                                             │ route: xxh64(cid) % slots → slot table → worker i
                                             │ stamp: per-channel seq (cseq), per-worker seq (wseq)
                                             ▼                                      (channels.py)
               ┌──── window[i]: every unacknowledged message, kept as the batches sent ─────────┐
               │ pending batch[i] ── flush when full, at i's next ack, on linger, or at once if   │
               │                     i is idle (Nagle) ────────────────────────────────▶ PUSH i  │
               └──────────────────────────────────────────────── (window.py) ── (link.py) ──────┘
                                                                                   │ BATCH frames
                       worker 0 … worker N-1 (one asyncio loop each, FIFO per channel)
                                                                                   │ ACK / READY /
  I/O thread ◀── one PULL ◀────────────────────────────────────────────────────────┘ HEARTBEAT / …
  (iothread.py)
    ├─ ACK: retire from the window (a whole batch at once when it can), deliver results and
    │  failures in per-channel order (outcomes.py), wake blocked producers; drop the records of
    │  channels the worker forgot (ended, or idle past the expiry)
    ├─ sentinel readable: the worker died → settle its window (what it took in may have run) →
    │  the supervisor decides (supervisor.py): restart with backoff, or give up (crash loop) →
    │  READY → replay the window to the new epoch, marked redelivered, before anything newer; the
    │  replay runs one message at a time, so a further death names its message (run slot) and a
    │  message that keeps killing its worker quarantines its channel instead of breaking the pool
    ├─ supervisor timers: READY deadline, heartbeat silence (kill the hung worker), restart due
    ├─ linger deadline: flush half-full batches
    ├─ moves (moves.py): fence a slot's channels at the front (held in order), DRAIN to the old
    │  worker, SLOT_STATE back → commit: route to the new worker, INSTALL (state) in its window,
    │  then the held messages; called off before the commit on a timeout or a death
    ├─ resize (resize.py): start new workers and move slots to them, or move every slot off the
    │  last workers and stop them — waves of moves
    └─ levelling (balance.py): LOAD reports → smoothed load per slot and channel → a plan of moves
       and hot-channel pins (shown under "advise", carried out under "auto")

  close(): stop intake → drain → SIGTERM (each worker finishes the call it is in, reports what is
  running, acknowledges, says BYE) → kill what is left at the deadline → report every message not
  finished as unfinished (never handed to a handler) or in doubt (a handler may have run it).

Producers only take the lock, append and occasionally send a full batch; everything that waits
(acknowledgements, deaths, timers) happens on the one I/O thread, which is also the only thread that
starts workers (with SIGINT/SIGTERM blocked, so children inherit them blocked).
"""

from .channels import Halt, Route
from .engine import Front
from .outcomes import FailureCallback, ResultCallback
from .shutdown import STOP_GRACE_S, CloseReport, stop_grace
from .state import PoolState
from .window import Batch, DoneCallback, Window

__all__ = [
    "STOP_GRACE_S",
    "Batch",
    "CloseReport",
    "DoneCallback",
    "FailureCallback",
    "Front",
    "Halt",
    "PoolState",
    "ResultCallback",
    "Route",
    "Window",
    "stop_grace",
]
