"""The worker process itself: what it is given, how it starts, and its ties to the front.

* :class:`WorkerSpec` — everything a worker needs, pickled to the child at spawn.
* :func:`worker_main` — the process entry point: signals, the parent guard, the event loop.
* :func:`guard_parent` — the worker leaves within about a second of its front's death, whatever
  its handler is doing.
* :class:`RunSlot` — memory shared with the front that survives a crash: what the worker took in,
  and which message a careful replay is running.
"""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..exitcodes import EXIT_PARENT_GONE

NO_MESSAGE = -1
"""The run slot's value while no careful call is running."""

PARENT_POLL_S = 0.2
"""How often the parent watchdog thread looks for its parent (seconds)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; pickled to the child at spawn."""

    index: int
    epoch: int
    data_endpoint: str  # the worker binds its PULL here
    front_endpoint: str  # the worker connects its PUSH here
    handler: Any  # "module:attr" or a (dill-picklable) object
    handler_options: dict[str, Any] = field(default_factory=dict)
    payload: str = "cbor"  # "cbor": decode each payload; "raw": hand the bytes over
    failure_policy: str = "halt"
    failure_policy_by_type: dict[str, str] = field(default_factory=dict)  # message["type"] → policy
    retry_limit: int = 3
    retry_backoff_s: float = 0.05
    heartbeat_interval_s: float = 0.5
    parent_pid: int = 0  # the process the parent guard watches (the front, or the fork server)
    run_slot: str = ""  # path of this worker's RunSlot file ("" = none)
    channel_idle_expiry_s: float = 0.0  # 0 = never forget an idle channel
    slots: int = 4096  # the routing slot count (a move names slots)
    move_state: str = "auto"  # how handler state leaves and arrives with a moved channel
    load_interval_s: float = 0.0  # period of the LOAD report (seconds; 0 = none)


class RunSlot:
    """Sixteen bytes shared by the front and one worker incarnation, read by the front once the
    worker has died or been killed:

    * ``taken``: the last wseq the worker has taken in. Every message up to it may have reached a
      handler; none after it has (it was never read). Set once per batch, before its first call.
    * ``running``: the wseq a careful replay is running, or :data:`NO_MESSAGE`; set just before and
      after each careful call, so a death during a replay names its message exactly.

    Shared memory, unlike a frame, survives a segfault or SIGKILL that lands before anything could
    be sent. It is a file in the front's private runtime directory mapped by both, since spawned
    processes share no anonymous memory.
    """

    SIZE = 16

    def __init__(self, path: str, *, create: bool = False) -> None:
        """Map ``path`` (created and reset when ``create``).

        Raises:
            OSError: the file cannot be created, opened or mapped.
        """
        self.path = path
        if create:
            with open(path, "wb") as f:
                f.write(bytes(self.SIZE))
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self.SIZE)
        self._view = memoryview(self._map).cast("q")
        if create:
            self.reset()

    def reset(self) -> None:
        """Nothing taken in, nothing running (before each incarnation starts)."""
        self._view[0] = -1
        self._view[1] = NO_MESSAGE

    def take(self, wseq: int) -> None:
        self._view[0] = wseq

    def run(self, wseq: int) -> None:
        self._view[1] = wseq

    def read(self) -> tuple[int, int]:
        """``(taken, running)``."""
        return int(self._view[0]), int(self._view[1])

    def close(self) -> None:
        self._view.release()
        self._map.close()


def guard_parent(parent_pid: int, *, pdeathsig: bool = True, poll_s: float = PARENT_POLL_S) -> None:
    """Make this process leave within about a second of its parent's death, whatever its main
    thread is doing (a handler may be deep in a long synchronous call).

    On Linux the kernel kills it the moment its parent ends (``prctl(PR_SET_PDEATHSIG, SIGKILL)``;
    note that the "parent" is the thread that forked it: the fork server's, which ends with the
    front's process, or for a spawned worker the front's I/O thread). Everywhere, a daemon thread
    checks every ``poll_s`` seconds whether the process was re-parented and exits with
    :data:`EXIT_PARENT_GONE`; it needs the GIL only for a moment, which a pure-Python handler
    gives up every switch interval. ``pdeathsig=False`` leaves the kernel out (to test the thread).
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog thread below still covers it
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)  # the parent died before the guard was in place
    threading.Thread(
        target=_watch_parent, args=(parent_pid, poll_s), name="shardpool-parent-watch", daemon=True
    ).start()


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)  # sleep-ok - a watchdog's period, not synchronisation
        if os.getppid() != parent_pid:
            # Re-parented: the front is gone and nothing we could still send has a reader.
            os._exit(EXIT_PARENT_GONE)


def worker_main(spec: WorkerSpec, environ: dict[str, str] | None = None) -> None:
    """Process entry point. Exits with an ``EXIT_*`` code. ``environ``: the front's environment,
    for a worker forked from the fork server (whose own is that of its start; see
    :mod:`shardpool.launch`)."""
    from .serve import Worker  # the event-loop side; imported in the child only

    if environ is not None:
        from ..launch import forked_child

        forked_child(environ)

    # The front coordinates shutdown: Ctrl-C in a terminal reaches the whole process group, and a
    # worker that died of it would look like a crash. SIGTERM is the stop request. SIGHUP and
    # SIGUSR1 are the front's (reload, reopen logs): one sent to the process group (a closed
    # terminal) must not kill the workers either.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    worker = Worker(spec)
    signal.signal(signal.SIGTERM, worker.note_stop)
    if spec.parent_pid:
        # Before unblocking: the watchdog thread keeps SIGINT/SIGTERM blocked, so they reach us.
        guard_parent(spec.parent_pid)
    # The front blocked these before spawning us so that no signal could hit a half-started child.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(asyncio.run(worker.run()))
