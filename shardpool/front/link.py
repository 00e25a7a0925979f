"""One worker as the front sees it: its window, the socket to it, and what its incarnation said.

The socket exists only while the worker is ready: a sealed batch is sent at once when it does, and
waits in the window otherwise (the replay after READY sends it). Each incarnation gets a fresh
socket to a fresh endpoint, so no stale ZeroMQ pipe can deliver an old frame to a new worker.

Not thread-safe: the front calls it with its lock held.
"""

from __future__ import annotations

import time
from typing import Any

import psutil
import zmq

from .. import codec
from ..codec import ToWorker
from ..worker import RunSlot
from .window import Batch, Window

__all__ = ["Link"]


class Link:
    """The front's side of worker ``index`` across its incarnations."""

    __slots__ = (
        "index",
        "window",
        "epoch",
        "sock",
        "run_slot",
        "said_bye",
        "stop_running",
        "last_tb",
        "stats",
        "ps",
        "died_at",
        "recovery_s",
        "batches_sent",
    )

    def __init__(self, index: int, slot_path: str) -> None:
        self.index = index
        self.window = Window(index)
        self.epoch = 0  # of the current incarnation
        self.sock: zmq.Socket[bytes] | None = None  # only while the worker is ready
        self.run_slot = RunSlot(slot_path, create=True)
        # This incarnation's word on what it ran: BYE (nothing unacknowledged), or the calls that
        # were running when it was asked to stop (None: no report).
        self.said_bye = False
        self.stop_running: set[int] | None = None
        self.last_tb = ""  # traceback of the last CRASH frame
        self.stats: dict[str, Any] = {}  # its last stats reply
        self.ps: psutil.Process | None = None
        self.died_at = 0.0  # monotonic seconds of the death being recovered from (0: none)
        self.recovery_s: list[float] = []  # death → successor READY and replay sent
        self.batches_sent = 0

    def incarnation(self, epoch: int) -> None:
        """A new incarnation is being spawned: forget what the last one said."""
        self.epoch = epoch
        self.said_bye = False
        self.stop_running = None
        self.last_tb = ""
        self.run_slot.reset()

    def watch(self, pid: int | None) -> None:
        """Follow the new process's CPU and memory (psutil), for stats."""
        try:
            self.ps = psutil.Process(pid)
            self.ps.cpu_percent(None)
        except (psutil.Error, ValueError, TypeError):
            self.ps = None

    # -- sending -------------------------------------------------------------------------------

    def connect(self, ctx: zmq.Context[Any], endpoint: str) -> None:
        sock = ctx.socket(zmq.PUSH)
        # The window bounds what is queued; a blocking send under the lock could deadlock.
        sock.sndhwm = 0
        sock.linger = 0
        sock.connect(endpoint)
        self.sock = sock

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def flush(self) -> Batch:
        """Seal the pending batch and send it if the worker is ready."""
        batch = self.window.seal(self.epoch)
        if self.sock is not None:
            self.sock.send(batch.frame, copy=False)
            batch.sent = True
            self.batches_sent += 1
        return batch

    def install(self, gen: int, states: list[Any]) -> None:
        """Append a move's INSTALL entry to the window and send it if the worker is ready (the
        pending batch goes first)."""
        if self.window.parts:
            self.flush()
        batch = self.window.add_install(self.epoch, gen, states)
        if self.sock is not None:
            self.sock.send(batch.frame)
            batch.sent = True

    def send(self, kind: ToWorker, *fields: Any) -> bool:
        """Send a cold frame ``[kind, epoch, *fields]``; False if the worker is not ready."""
        if self.sock is None:
            return False
        self.sock.send(codec.frame(kind, self.epoch, *fields))
        return True

    def replay(self, halted: list[bytes], batch_size: int) -> int:
        """Send a fresh incarnation its whole window, after re-halting its halted channels (so
        the replay does not silently run past a failure an operator has not resolved). Returns
        how many of the messages a dead incarnation may have run."""
        replay = self.window.take_for_replay(self.epoch, batch_size)
        for cid in halted:
            self.send(ToWorker.CONTROL, "halt", cid)
        assert self.sock is not None
        for batch in replay.batches:
            self.sock.send(batch.frame)
        return replay.redelivered

    # -- reporting -----------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Its last stats, with the front's figures: in flight, the age of the oldest unfinished
        message (``oldest_unacked_s``, 0 when none), the window's latency histogram
        (``latency_buckets`` per :data:`~shardpool.front.window.LATENCY_BOUNDS` and +Inf, not
        cumulative; ``latency_sum_s``), CPU (``cpu_percent`` since the last report,
        ``cpu_seconds`` user + system since the process started) and RSS, recovery times."""
        rep: dict[str, Any] = dict(self.stats)
        oldest = self.window.oldest_at()
        rep.update(
            index=self.index,
            inflight=self.window.inflight,
            oldest_unacked_s=0.0 if oldest is None else max(0.0, time.monotonic() - oldest),
            latency_buckets=list(self.window.latency),
            latency_sum_s=self.window.latency_sum,
            recovery_s=list(self.recovery_s[-20:]),
        )
        ps = self.ps
        if ps is not None:
            try:
                with ps.oneshot():
                    rep["cpu_percent"] = ps.cpu_percent(None)
                    cpu = ps.cpu_times()
                    rep["cpu_seconds"] = cpu.user + cpu.system
                    rep["rss_bytes"] = ps.memory_info().rss
            except psutil.Error:
                pass
        return rep
