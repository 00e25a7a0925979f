"""Warnings about bad input, rate-limited: a producer sending garbage cannot flood the log."""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["RateLimitedLog"]


class RateLimitedLog:
    """At most one record per key per interval (seconds), with a count of what was held back."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, key: str, message: str, *args: Any) -> None:
        """A warning (no traceback)."""
        self._emit(logging.WARNING, key, message, args, False)

    def error(self, key: str, message: str, *args: Any) -> None:
        """An error with the traceback of the exception being handled."""
        self._emit(logging.ERROR, key, message, args, True)

    def _emit(self, level: int, key: str, message: str, args: tuple[Any, ...], tb: bool) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" ({held} more like it in the last {now - last:.0f} s)" if held and last else ""
        self._log.log(level, message + suffix, *args, exc_info=tb)
