"""What a producer gets back: :class:`Reply`, and the :class:`ReplyError` family for the ones that
were not processed successfully."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..errors import ReplyClosed, ReplyError, ReplyFailed, ReplyInDoubt, ReplyRejected

__all__ = [
    "Reply",
    "ReplyClosed",
    "ReplyError",
    "ReplyFailed",
    "ReplyInDoubt",
    "ReplyRejected",
    "reply_error",
]


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
