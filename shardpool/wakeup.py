"""A self-pipe to wake a thread that waits in ``poll``/``select``.

The front's I/O thread, the ingress, the control server and the service's main loop each wait on
sockets and need a way for another thread (or a signal handler, through
:func:`signal.set_wakeup_fd`) to interrupt that wait. Both ends are non-blocking: a full pipe
means the waiter is already due to wake, and a closed one that it is gone.
"""

from __future__ import annotations

import contextlib
import os
import select


class WakePipe:
    """``wake()`` from anywhere; the waiting thread polls :meth:`fileno` and calls :meth:`drain`."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)

    def fileno(self) -> int:
        """The read end, to register with a poller or ``select``."""
        return self._r

    @property
    def write_fd(self) -> int:
        """The write end (for :func:`signal.set_wakeup_fd`)."""
        return self._w

    def wake(self) -> None:
        """Make the read end readable. Never blocks, never raises."""
        with contextlib.suppress(OSError):
            os.write(self._w, b"\0")

    def drain(self) -> None:
        """Consume every pending wake-up. Never blocks, never raises."""
        try:
            while os.read(self._r, 4096):
                pass
        except OSError:
            pass

    def wait(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a wake-up, then drain."""
        try:
            select.select([self._r], [], [], max(0.0, timeout))
        except (OSError, ValueError):
            return  # closed under us: the owner is shutting down
        self.drain()

    def close(self) -> None:
        """Close both ends (idempotent)."""
        for fd in (self._r, self._w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._r = self._w = -1
