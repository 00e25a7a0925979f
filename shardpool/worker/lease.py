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

The same thread watches the connection (a ZeroMQ socket monitor it alone reads): a connection the
front's side closed (its process died, or it closed the socket) ends the lease at once, since an
incarnation never reconnects. A link that is cut silently (a partition) is left to the deadline.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..exitcodes import EXIT_FENCED

__all__ = ["Lease"]


class Lease:
    """The lease of one remote worker incarnation.

    Args:
        lease_s: how long a LEASE answer lets the worker go on (seconds).
        granted_at: when the lease starts (the worker's monotonic clock: when it sent HELLO).
        grace_s: how long after the lease ran out a handler call may still finish before the
            process exits with :data:`EXIT_FENCED` (seconds; less than the front's margin).
        monitor: the link socket's monitor (``get_monitor_socket(EVENT_DISCONNECTED)``), or
            None; the lease's thread reads it, and closes it when it ends (or :meth:`close`
            does, if the thread never started).
    """

    POLL_S = 0.05
    """How often the thread looks at the monitor (seconds)."""

    def __init__(
        self,
        lease_s: float,
        granted_at: float,
        grace_s: float,
        monitor: zmq.Socket[bytes] | None = None,
    ) -> None:
        self.lease_s = lease_s
        self.grace_s = grace_s
        self.until = granted_at + lease_s  # monotonic seconds
        self.rtt_s = 0.0  # the last heartbeat → LEASE round trip
        self.expired = False
        self.link_closed = False  # the connection was closed from the front's side
        self._monitor: Any = monitor
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
        """The incarnation ended: stop watching (idempotent)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
            if self._thread is None:
                self._close_monitor()

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.close(linger=0)
            self._monitor = None

    def _link_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds on the monitor (the lock not held); True once the
        connection was closed."""
        mon = self._monitor
        if mon is None:
            with self._cv:
                if not self._closed:
                    self._cv.wait(timeout)
            return False
        with contextlib.suppress(zmq.ZMQError):
            if mon.poll(max(1, int(timeout * 1000))):
                mon.recv_multipart(zmq.NOBLOCK)  # only EVENT_DISCONNECTED is asked for
                self.link_closed = True
        return self.link_closed

    def _watch(self, on_expire: Callable[[], None]) -> None:
        try:
            self._watch_lease(on_expire)
        finally:
            with self._cv:
                self._close_monitor()

    def _watch_lease(self, on_expire: Callable[[], None]) -> None:
        while True:
            with self._cv:
                if self._closed:
                    return
                left = self.until - time.monotonic()
            wait = left if self._monitor is None else min(left, self.POLL_S)
            if left <= 0 or self._link_closed(wait):
                break
        with self._cv:
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
