"""The error tree: everything shardpool raises derives from :class:`ShardPoolError`.

::

    ShardPoolError
    ├── ConfigError            a config value is missing, of the wrong type or out of range
    ├── InputError             a message was refused at the door (ValueError too)
    │   ├── ChannelIdError     channel id is not 1..64 bytes
    │   ├── PayloadTooLarge    encoded payload is over ``transport.max_message_bytes``
    │   └── NotHalted          resume/skip of a channel that is not halted
    ├── PoolClosed             you closed the pool (or it is closing); nothing is wrong
    │   └── InDoubt            closed while the handler may have been running this message
    ├── PoolBroken             something else broke it: a worker could not start or keeps dying
    │   └── WorkerStartError   a worker failed before READY (import error, crash, deadline)
    ├── BackendLost            a client's backend went away with messages unanswered
    │   └── AccessDenied       the backend refused the client's handshake (CURVE keys)
    ├── HandlerError           the handler raised (or its worker kept dying on the message)
    ├── DrainTimeout           ``drain``/``close`` ran past its deadline (TimeoutError too)
    ├── MoveRefused            a slot or channel move could not start or was called off
    ├── StateNotRestored       a moved channel's state could not be restored on its new worker
    ├── NotRunning             no backend answers at a control endpoint (none started, a stale
    │                          socket file, or it went away while a request waited)
    ├── ControlError           the backend answered a control request with an error
    │   └── BadRequest         the request itself was wrong (a slot, worker or channel that is
    │                          malformed or names nothing there)
    ├── EndpointInUse          another ``shardpool run`` holds this ipc endpoint
    ├── InsecurePathError      a runtime directory is a symlink, not a directory, or not ours
    ├── FrameError             a producer's frame could not be read (``.code`` names the problem)
    └── ReplyError             a client's message was not processed (``.status`` says why)
        ├── ReplyRejected      refused at the door (bad input, draining, too many pending)
        ├── ReplyFailed        the handler raised on it
        ├── ReplyClosed        handed back at shutdown, never given to the handler
        └── ReplyInDoubt       the backend stopped while the handler may have been running it

:class:`RemoteTraceback` stands outside the tree on purpose: it is never raised, only chained as
the ``__cause__`` of :class:`HandlerError` and :class:`WorkerStartError` to carry a worker's
traceback text, as :mod:`concurrent.futures` does.

"Closed by you" (:class:`PoolClosed`) and "broken by something else" (:class:`PoolBroken`) are
deliberately different types: the first is a programming-order issue in the caller, the second is an
operational failure that an operator has to look at.
"""

from __future__ import annotations

from typing import Any


class ShardPoolError(Exception):
    """Base of every error raised by shardpool."""


class ConfigError(ShardPoolError):
    """One or more config values are invalid.

    ``problems`` lists ``(key, value, allowed)`` triples; ``str()`` names each key, the bad value
    and what is allowed, one per line.
    """

    def __init__(self, problems: list[tuple[str, Any, str]] | str) -> None:
        if isinstance(problems, str):
            problems = [("", None, problems)]
        self.problems: list[tuple[str, Any, str]] = problems
        super().__init__(self._render())

    def _render(self) -> str:
        lines = []
        for key, value, allowed in self.problems:
            if key:
                lines.append(f"{key} = {value!r}: {allowed}")
            else:
                lines.append(allowed)
        return "\n".join(lines)

    @property
    def key(self) -> str:
        """The first offending key (convenience for the common single-problem case)."""
        return self.problems[0][0]


class InputError(ShardPoolError, ValueError):
    """A message was refused before it was accepted; nothing else is affected."""


class ChannelIdError(InputError):
    """The channel id is not ``bytes`` of 1 to 64 bytes."""


class PayloadTooLarge(InputError):
    """The encoded payload is larger than ``transport.max_message_bytes``."""


class NotHalted(InputError):
    """``resume``/``skip`` named a channel that is not halted (nothing was changed)."""


class PoolClosed(ShardPoolError):
    """The pool was closed by its owner (or is shutting down); submit no more work."""


class InDoubt(PoolClosed):
    """The pool closed (or broke) while this message may have been in its handler: a worker was
    stopped or died after the message was handed to it and before it was acknowledged. It may or
    may not have been applied; resubmitting it may apply it twice (the per-channel ``seq`` lets a
    handler tell). Messages that were certainly never handed to the handler get a plain
    :class:`PoolClosed` instead."""


class PoolBroken(ShardPoolError):
    """The pool cannot go on: a worker could not be started or kept dying.

    ``exitcodes`` maps worker index to its last exit code (negative: killed by that signal).
    """

    def __init__(self, message: str, *, exitcodes: dict[int, int | None] | None = None) -> None:
        super().__init__(message)
        self.exitcodes: dict[int, int | None] = dict(exitcodes or {})


class WorkerStartError(PoolBroken):
    """A worker failed before its READY handshake; ``__cause__`` holds its traceback when it had
    one."""


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker process.

    Attached as ``__cause__`` of :class:`HandlerError` / :class:`WorkerStartError` so that the
    worker's stack prints under the local one, as :mod:`concurrent.futures` does.
    """

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


class BackendLost(ShardPoolError):
    """A client's backend went away (its process ended, or the connection was silent past the
    heartbeat timeout) while messages were still unanswered.

    ``endpoint`` names the backend; ``unanswered`` counts the messages sent without a final reply
    (each may or may not have been processed).
    """

    def __init__(self, message: str, *, endpoint: str, unanswered: int) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.unanswered = unanswered


class AccessDenied(BackendLost):
    """The backend refused this client's connection handshake: its CURVE key is not authorised,
    or one side uses CURVE and the other does not. Nothing this client sends can be processed;
    ``unanswered`` counts what it had sent."""


class HandlerError(ShardPoolError):
    """The handler raised while processing one message.

    Attributes: ``channel_id``, ``seq`` (per-channel sequence number), ``exc_type`` (name of the
    remote exception type), ``policy`` (the failure policy that was applied) and ``traceback``
    (the worker-side traceback text, also chained as ``__cause__``).
    """

    def __init__(
        self,
        message: str,
        *,
        channel_id: bytes,
        seq: int,
        exc_type: str,
        policy: str,
        traceback: str,
    ) -> None:
        super().__init__(message)
        self.channel_id = channel_id
        self.seq = seq
        self.exc_type = exc_type
        self.policy = policy
        self.traceback = traceback
        self.__cause__ = RemoteTraceback(traceback)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_handler_error,
            (str(self), self.channel_id, self.seq, self.exc_type, self.policy, self.traceback),
        )


def _rebuild_handler_error(
    message: str, channel_id: bytes, seq: int, exc_type: str, policy: str, tb: str
) -> HandlerError:
    return HandlerError(
        message, channel_id=channel_id, seq=seq, exc_type=exc_type, policy=policy, traceback=tb
    )


class DrainTimeout(ShardPoolError, TimeoutError):
    """Work was still in flight when the deadline passed; ``pending`` counts it."""

    def __init__(self, message: str, *, pending: int) -> None:
        super().__init__(message)
        self.pending = pending


class NotRunning(ShardPoolError):
    """No backend runs at the endpoint (nothing answers, its socket file is missing or stale, or
    it went away while a request waited)."""


class ControlError(ShardPoolError):
    """The backend answered a control request with an error (or with a reply it cannot have
    sent: not ``[1, ok, payload]``)."""


class EndpointInUse(ShardPoolError):
    """Another ``shardpool run`` already listens on this ipc endpoint."""


class InsecurePathError(ShardPoolError):
    """A runtime directory or socket path is unsafe (symlink, foreign owner, not a directory)."""


class FrameError(ShardPoolError):
    """A producer's frame could not be read; ``code`` is one of
    :data:`shardpool.protocol.FRAME_ERRORS`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


class StateNotRestored(ShardPoolError):
    """A moved channel's state could not be restored on its new worker (the handler's ``restore``
    hook raised, or the CBOR state did not decode). Raised in the worker in place of the channel's
    next message, so the failure policy applies: under ``halt`` the channel halts with this error
    and its cause's traceback; ``resume`` then runs the message without the moved state."""


class MoveRefused(ShardPoolError):
    """A slot or channel move could not start (the pool is not running, a worker is not ready,
    it is already moving, too many moves at once) or was called off before its commit (its drain
    timed out, a channel's state could not be taken, its worker died): nothing was lost or
    reordered; the channels stayed where they were."""
