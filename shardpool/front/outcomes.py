"""What the front hands to callers: one small record per outcome, delivered with the lock released.

The I/O thread builds them while it reads acknowledgements (lock held), then delivers them in
per-channel order (lock released, so a callback may submit more work). A callback that raises is
logged and delivery goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import HandlerError
from .window import DoneCallback

__all__ = [
    "Done",
    "FailureCallback",
    "HaltNotice",
    "Outcome",
    "Reported",
    "Result",
    "ResultCallback",
    "deliver",
]

log = logging.getLogger("shardpool.front")

ResultCallback = Callable[[bytes, int, Any], None]
FailureCallback = Callable[[HandlerError], None]


class Done:
    """A message submitted with ``on_done`` is settled: ``on_done(value, error)``."""

    __slots__ = ("callback", "value", "error")

    def __init__(self, callback: DoneCallback, value: Any, error: BaseException | None) -> None:
        self.callback = callback
        self.value = value
        self.error = error

    def deliver(self) -> None:
        self.callback(self.value, self.error)


class Result:
    """A handler returned a value for a message without ``on_done``: ``on_result(cid, seq, v)``."""

    __slots__ = ("callback", "channel_id", "seq", "value")

    def __init__(self, callback: ResultCallback, channel_id: bytes, seq: int, value: Any) -> None:
        self.callback = callback
        self.channel_id = channel_id
        self.seq = seq
        self.value = value

    def deliver(self) -> None:
        self.callback(self.channel_id, self.seq, self.value)


class Reported:
    """A failure for the pool's ``on_failure`` (logged with its traceback when there is none)."""

    __slots__ = ("callback", "error")

    def __init__(self, callback: FailureCallback | None, error: HandlerError) -> None:
        self.callback = callback
        self.error = error

    def deliver(self) -> None:
        if self.callback is not None:
            self.callback(self.error)
        else:
            log.error("%s\n%s", self.error, self.error.traceback)


class HaltNotice:
    """A message's channel halted on it (a failure under ``halt``, or a quarantine): not final.
    Its ``on_done`` hears of it through an optional ``halted(error)`` method (the ingress tells
    the producer at once); the final ``on_done(value, error)`` comes once an operator resumes or
    skips the channel, or the pool closes."""

    __slots__ = ("callback", "error")

    def __init__(self, callback: DoneCallback, error: HandlerError) -> None:
        self.callback = callback
        self.error = error

    def deliver(self) -> None:
        notice = getattr(self.callback, "halted", None)
        if notice is not None:
            notice(self.error)


Outcome = Done | Result | Reported | HaltNotice


def deliver(outcomes: Iterable[Outcome]) -> None:
    """Deliver each outcome in order (lock not held); a raising callback is logged, not fatal."""
    for outcome in outcomes:
        try:
            outcome.deliver()
        except Exception:  # noqa: BLE001 - a failing callback must not stop delivery
            log.exception("result/failure callback raised")
