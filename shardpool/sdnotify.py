"""The systemd notification protocol (``sd_notify``), without a dependency.

When the service manager sets ``NOTIFY_SOCKET`` (``Type=notify`` units), a service tells it how it
is doing in datagrams of ``KEY=value`` lines sent to that unix socket: ``READY=1`` once it serves,
``STATUS=...`` a line for ``systemctl status``, ``RELOADING=1`` / ``READY=1`` around a reload,
``STOPPING=1`` when it begins to shut down, and ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
microseconds when the unit has ``WatchdogSec=``. An address starting with ``@`` is in the Linux
abstract namespace. Without ``NOTIFY_SOCKET`` every call is a no-op.

Sending never blocks and never raises: a notification that cannot be sent is logged (once per
kind of error) and dropped — the service must not stop because its manager is not listening.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier"]

log = logging.getLogger("shardpool.sdnotify")


class Notifier:
    """Notifications to the service manager named by ``env`` (default ``os.environ``).

    ``enabled`` is False when ``NOTIFY_SOCKET`` is unset or empty; ``watchdog_interval_s`` is
    half of ``WATCHDOG_USEC`` (None when unset, invalid, or meant for another process per
    ``WATCHDOG_PID``).
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval_s = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._errors: set[str] = set()
        self._status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` (``"KEY=value"`` each) in one datagram; True if it was sent."""
        if self.address is None:
            return False
        data = "\n".join(lines).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self.address)
        except OSError as exc:
            kind = type(exc).__name__
            if kind not in self._errors:
                self._errors.add(kind)
                log.warning("sd_notify to %r failed (%s); further ones are dropped quietly",
                            self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with a ``STATUS=`` line if given)."""
        return self.notify("READY=1", *self._status_lines(status))

    def reloading(self) -> bool:
        """``RELOADING=1`` with the monotonic time (systemd's ``Type=notify-reload`` wants it);
        follow it with :meth:`ready` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1`` (with a ``STATUS=`` line if given)."""
        return self.notify("STOPPING=1", *self._status_lines(status))

    def status(self, text: str) -> bool:
        """``STATUS=text``, only if it differs from the last one sent."""
        if text == self._status:
            return False
        return self.notify(*self._status_lines(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive."""
        return self.notify("WATCHDOG=1")

    def _status_lines(self, text: str | None) -> list[str]:
        if text is None:
            return []
        self._status = text
        return ["STATUS=" + text.replace("\n", " ")]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    return value


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, as sd_watchdog_enabled(3) recommends."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return usec / 2e6
