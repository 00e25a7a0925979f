"""A remote worker's lease: the time it may take messages without having heard from its front.

The front answers each HEARTBEAT with a LEASE frame that echoes the heartbeat's ``sent_at`` (the
worker's monotonic clock). The lease then runs until ``sent_at + lease_s``: it starts when the
worker *sent* the heartbeat, before the front received it, so the worker's lease always ends
before ``lease_s`` after the last frame the front received from it. The front fails the worker
over only ``lease_s + lease_margin_s`` after that frame: by then the worker has stopped on its own
(self-fencing), and a channel never runs on two hosts at once, whatever the network does::

    worker  ──HEARTBEAT(sent_at)──▶ front            front: last heard at t ≥ sent_at
    worker  ◀──LEASE(sent_at)────── front            worker: lease until sent_at + lease_s
    lease over: no new call; a call still running after the grace → exit (EXIT_FENCED)
    front:  silent since t for lease_s + margin → the worker's slots go to other workers

A thread watches the deadline, so the fence holds while a synchronous handler holds the event
loop; it needs the GIL only for a moment. Clocks of the two hosts are never compared: each side
measures only its own intervals.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from ..exitcodes import EXIT_FENCED

__all__ = ["Lease"]


class Lease:
    """The lease of one remote worker incarnation.

    Args:
        lease_s: how long a LEASE answer lets the worker go on (seconds).
        granted_at: when the lease starts (the worker's monotonic clock: when it sent HELLO).
        grace_s: how long after the lease ran out a handler call may still finish before the
            process exits with :data:`EXIT_FENCED` (seconds; less than the front's margin).
    """

    def __init__(self, lease_s: float, granted_at: float, grace_s: float) -> None:
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.until = granted_at + lease_s  # monotonic seconds
        self.rtt_s = 0.0  # the last heartbeat → LEASE round trip
        self.expired = False
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def renew(self, sent_at: float) -> None:
        """A LEASE answered the heartbeat sent at ``sent_at``: extend the lease from then."""
        now = time.monotonic()
        if not isinstance(sent_at, (int, float)) or sent_at > now:
            return  # not a time of ours
        self.rtt_s = now - sent_at
        until = sent_at + self.lease_s
        if until > self.until and not self.expired:
            self.until = until  # read by the watch thread on its next wake; it never shortens

    def start(self, on_expire: Callable[[], None]) -> None:
        """Watch the deadline in a thread: ``on_expire()`` once it passes (from that thread),
        and the process exits with :data:`EXIT_FENCED` if :meth:`close` has not been called
        ``grace_s`` later."""
        self._thread = threading.Thread(
            target=self._watch, args=(on_expire,), name="shardpool-lease", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """The incarnation ended: stop watching."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _watch(self, on_expire: Callable[[], None]) -> None:
        with self._cv:
            while not self._closed:
                left = self.until - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            if self._closed:
                return
            self.expired = True
        on_expire()
        with self._cv:
            deadline = time.monotonic() + self.grace_s
            while not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    # A handler call outlived the lease: leave before the front hands its
                    # channel to another worker.
                    os._exit(EXIT_FENCED)
                self._cv.wait(left)
