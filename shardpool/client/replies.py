"""What a producer gets back: :class:`Reply`, and the :class:`ReplyError` family for the ones that
were not processed successfully."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import ShardPoolError

__all__ = [
    "Reply",
    "ReplyClosed",
    "ReplyError",
    "ReplyFailed",
    "ReplyInDoubt",
    "ReplyRejected",
    "reply_error",
]


class ReplyError(ShardPoolError):
    """A message was not processed successfully. ``status`` is the reply's status (``"failed"``,
    ``"rejected"``, ``"closed"``, ``"in_doubt"``, ``"halted"``, or ``"protocol"`` for a frame the
    backend could not read), ``code`` the protocol error code and ``info`` the whole error map.

    Raised as one of its subclasses for the four final outcomes; catching ``ReplyError`` catches
    them all.
    """

    def __init__(self, status: str, info: Any) -> None:
        info = info if isinstance(info, dict) else {"message": str(info)}
        self.status = status
        self.code: str = str(info.get("error", status))
        self.info: dict[str, Any] = info
        super().__init__(f"{status}: {info.get('message', self.code)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.status, self.info))


class ReplyRejected(ReplyError):
    """Refused at the door, never processed (``"rejected"``): bad input (channel id, payload,
    frame), the backend shutting down or draining, its pool broken, or too many messages of this
    producer unanswered; ``code`` says which."""


class ReplyFailed(ReplyError):
    """The handler raised on this message (``"failed"``); ``info`` holds the exception's
    ``type``, ``message``, the message's ``seq`` and the failure ``policy`` applied."""


class ReplyClosed(ReplyError):
    """Accepted, then handed back when the backend shut down, never given to the handler
    (``"closed"``): safe to send again."""


class ReplyInDoubt(ReplyError):
    """The backend stopped while the handler may have been running this message (``"in_doubt"``):
    it may or may not have been applied (the per-channel ``seq`` lets a handler tell)."""


_BY_STATUS: dict[str, type[ReplyError]] = {
    "rejected": ReplyRejected,
    "failed": ReplyFailed,
    "closed": ReplyClosed,
    "in_doubt": ReplyInDoubt,
}


def reply_error(status: str, info: Any) -> ReplyError:
    """The error for a reply of ``status`` with value ``info``: the subclass for its status, or a
    plain :class:`ReplyError` for any other status."""
    return _BY_STATUS.get(status, ReplyError)(status, info)


class Reply(NamedTuple):
    """One reply from the backend (``corr`` is None only for an item sent without a readable
    correlation id, which this client never does). A named tuple: one is built per message."""

    corr: int | None
    status: str
    value: Any

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def final(self) -> bool:
        """False only for a ``halted`` notice: the message's final reply is still to come."""
        return self.status != "halted"

    def error(self) -> ReplyError | None:
        """The error of a non-ok reply, else None."""
        return None if self.ok else reply_error(self.status, self.value)
