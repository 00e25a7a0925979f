"""What crosses from the pool's I/O thread to the ingress thread: one record per accepted message.

A :class:`Record` is the message's ``on_done`` callable. The pool calls ``record.halted(error)``
when the message's handler failed under the ``halt`` policy or its channel was quarantined (not
final: the message waits for an operator), and ``record(value, error)`` once, with its final
outcome. Each call only turns the outcome into a reply entry and appends an object to
:class:`Outcomes`, waking the ingress thread through a pipe at most once per batch; the socket is
only ever touched by the ingress thread.

The pool calls ``on_done`` (and ``halted``) of one channel's messages in the order it accepted
them, so replies come out in per-channel order as they are posted, without re-sequencing here.
"""

from __future__ import annotations

import collections
from typing import Any

from .. import protocol as P
from ..errors import HandlerError, InDoubt, PoolBroken, PoolClosed
from ..wakeup import WakePipe

__all__ = ["Notice", "Outcomes", "Record", "failure_value"]


class Outcomes:
    """The hand-over queue: :class:`Record` and :class:`Notice` objects in the order the pool
    reported them. ``post`` may be called from any thread; ``items`` is emptied by the ingress
    thread, which clears ``wake_pending`` before it reads them (an object posted after that
    wakes it again)."""

    __slots__ = ("items", "pipe", "wake_pending")

    def __init__(self) -> None:
        self.items: collections.deque[Record | Notice] = collections.deque()
        self.wake_pending = False
        self.pipe = WakePipe()

    def post(self, item: Record | Notice) -> None:
        """Queue ``item`` and wake the ingress thread unless a wake-up is already due."""
        self.items.append(item)
        if not self.wake_pending:
            self.wake_pending = True
            self.pipe.wake()


class Record:
    """One accepted message: who sent it, and its final reply once the pool reports it.

    The record itself is the ``on_done`` callback (no bound method or closure per message).
    ``status`` and ``value`` are None until then.
    """

    __slots__ = ("corr", "ident", "outcomes", "status", "value")

    def __init__(self, outcomes: Outcomes, ident: bytes, corr: int) -> None:
        self.outcomes = outcomes
        self.ident = ident
        self.corr = corr
        self.status: int | None = None
        self.value: Any = None

    def __call__(self, value: Any, error: BaseException | None) -> None:
        """The final outcome (pool I/O thread): nothing here may block or raise."""
        if error is None:
            self.value = value
            self.status = P.OK
        elif isinstance(error, HandlerError):
            self.value = failure_value(error)
            self.status = P.FAILED
        elif isinstance(error, InDoubt):
            self.value = {"error": P.E_IN_DOUBT, "message": str(error)}
            self.status = P.IN_DOUBT
        elif isinstance(error, (PoolClosed, PoolBroken)):
            self.value = {"error": P.E_CLOSED, "message": str(error)}
            self.status = P.CLOSED
        else:
            self.value = {"error": P.E_HANDLER_FAILED, "message": _safe_repr(error)}
            self.status = P.FAILED
        # Outcomes.post inlined: this runs once per message on the pool's busiest thread.
        outcomes = self.outcomes
        outcomes.items.append(self)
        if not outcomes.wake_pending:
            outcomes.wake_pending = True
            outcomes.pipe.wake()

    def halted(self, error: HandlerError) -> None:
        """This message's channel halted on it (pool I/O thread): its producer gets a HALTED
        notice now; the final reply follows once an operator resumes or skips the channel."""
        value = failure_value(error)
        value["error"] = P.E_HALTED
        self.outcomes.post(Notice(self.ident, self.corr, value))


class Notice:
    """A reply that is not final (a HALTED notice), shaped like a :class:`Record` so that the
    ingress thread releases both alike."""

    __slots__ = ("corr", "ident", "value")

    status = P.HALTED

    def __init__(self, ident: bytes, corr: int, value: dict[str, Any]) -> None:
        self.ident = ident
        self.corr = corr
        self.value = value


def failure_value(err: HandlerError) -> dict[str, Any]:
    """The reply value of a handler failure (see :mod:`shardpool.protocol`)."""
    return {
        "error": P.E_HANDLER_FAILED,
        "type": err.exc_type,
        "message": str(err),
        "seq": err.seq,
        "policy": err.policy,
    }


def _safe_repr(exc: BaseException) -> str:
    # Runs on the pool's I/O thread, which must not raise: an exception's repr can.
    try:
        return repr(exc)
    except Exception:  # noqa: BLE001
        return type(exc).__name__
