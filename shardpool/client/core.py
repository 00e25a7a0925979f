"""What both clients share: numbering, the batch, outstanding replies and their dispatch."""

from __future__ import annotations

import collections
import itertools
import os
from typing import Any

from .. import protocol as P
from ..control import ConnectionWatch
from ..errors import BackendLost
from .connection import ConfigArg, Curve, KeyArg, check_not_stale, judge_link, resolve
from .replies import Reply, ReplyError

__all__ = ["DEFAULT_TIMEOUT_S", "ClientCore"]

DEFAULT_TIMEOUT_S = 30.0


class ClientCore:
    """State shared by both clients, and their common construction: the arguments are
    :class:`~shardpool.client.Client`'s. A subclass opens its socket in :meth:`_open` and sets
    ``_watch`` there.

    Raises:
        ValueError: ``batch_size``, ``batch_bytes`` or ``max_outstanding`` is below 1, or only
            one of the CURVE keys is given.
        NotRunning: (handshake) the ipc endpoint is left from a backend that is gone.
        ConfigError / OSError: bad config or key files.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        config: ConfigArg = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        batch_size: int = 256,
        batch_bytes: int = 1 << 20,
        max_outstanding: int = 65_536,
        server_public_key: KeyArg = None,
        client_secret_key: str | os.PathLike[str] | None = None,
        handshake: bool = True,
        sndhwm: int = 1000,
    ) -> None:
        if batch_size < 1 or batch_bytes < 1 or max_outstanding < 1:
            raise ValueError("batch_size, batch_bytes and max_outstanding must be >= 1")
        self.endpoint, curve = resolve(endpoint, config, server_public_key, client_secret_key)
        self.timeout = timeout
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.max_outstanding = max_outstanding
        self._asked_outstanding = max_outstanding
        self.max_message_bytes: int | None = None
        self.server_info: dict[str, Any] = {}
        self._corr = itertools.count()
        self._buf: list[list[Any]] = []
        self._buf_bytes = 0
        self.outstanding = 0  # sent or batched, final reply not yet received
        self._pending_results = 0  # of those, sent with send(): their replies go to results()
        self._ready: collections.deque[Reply] = collections.deque()
        self._futures: dict[int, Any] = {}
        self._hello: dict[Any, dict[str, Any]] = {}
        self._fatal: ReplyError | None = None
        self._lost: BackendLost | None = None
        self._watch: ConnectionWatch | None = None
        self._handshake = handshake
        if handshake:
            check_not_stale(self.endpoint)
        self._open(curve, sndhwm)

    def _open(self, curve: Curve | None, sndhwm: int) -> None:
        """Create and connect the socket (and, for a blocking client, handshake)."""
        raise NotImplementedError

    def _learn(self, info: dict[str, Any]) -> None:
        """Take what a HELLO answer says: the backend's limits."""
        self.server_info = info
        self.max_message_bytes = info.get("max_message_bytes")
        cap = info.get("max_pending_per_producer")
        if type(cap) is int and cap >= 1:
            # The backend refuses what a producer has pending past this: stay within it.
            self.max_outstanding = min(self._asked_outstanding, cap)

    @property
    def unanswered(self) -> int:
        """Messages handed to the socket whose final reply has not come (batched ones not)."""
        return self.outstanding - len(self._buf)

    def _link_lost(self, disconnections: int) -> BackendLost | None:
        """Judge the connection after ``disconnections`` were seen (see
        :func:`~.connection.judge_link`); once lost, the client stays lost and its futures fail."""
        if self._lost is not None:
            return self._lost
        if self._watch is None:
            return None
        err = judge_link(
            self._watch, self.endpoint, self.unanswered, len(self._buf), disconnections
        )
        if err is None:
            return None
        self._lost = err
        for fut in self._futures.values():
            self._resolve(fut, err)
        self._futures.clear()
        return err

    def _add(self, channel_id: Any, payload: Any, fut: Any = None) -> int:
        """Check and batch one message; its correlation id.

        Raises:
            ChannelIdError / PayloadTooLarge / TypeError: refused locally (nothing batched).
            BackendLost / ReplyError: the client is broken.
        """
        cid, payload = P.check_item(channel_id, payload, self.max_message_bytes)
        if self._lost is not None:
            raise self._lost
        if self._fatal is not None:
            raise self._fatal
        corr = next(self._corr)
        self._buf.append([corr, cid, payload])
        self._buf_bytes += len(payload) + len(cid) + 12
        self.outstanding += 1
        if fut is None:
            self._pending_results += 1
        else:
            self._futures[corr] = fut
        return corr

    def _batch_due(self) -> bool:
        return len(self._buf) >= self.batch_size or self._buf_bytes >= self.batch_bytes

    def _sent(self) -> None:
        self._buf = []
        self._buf_bytes = 0

    def _on_frame(self, data: bytes) -> None:
        """Dispatch one frame from the backend."""
        try:
            kind, body = P.decode_reply(data)
        except P.FrameError:
            return  # a garbled frame is the backend's bug; skip it
        if kind == P.REPLIES:
            names = P.STATUS_NAMES
            for corr, status, value in body:
                self._on_reply(Reply(corr, names.get(status, str(status)), value))
        elif kind == P.HELLO:
            token, info = body
            if type(token) is bytes:  # ours are; another is not an answer to us
                self._hello[token] = info
        else:
            # This client only sends well-formed frames, so a frame error (too many producers,
            # version mismatch) means nothing it sends can succeed: fail everything outstanding.
            err = ReplyError("protocol", body)
            self._fatal = err
            for fut in self._futures.values():
                self._resolve(fut, err)
            self._futures.clear()
            self.outstanding = 0
            self._pending_results = 0

    def _on_reply(self, reply: Reply) -> None:
        final = reply.final
        fut = self._futures.get(reply.corr) if reply.corr is not None else None
        if fut is not None:
            if not final:
                fut.halted = reply
                return
            del self._futures[reply.corr]  # type: ignore[arg-type]
            self.outstanding -= 1
            if reply.ok:
                self._resolve(fut, None, reply.value)
            else:
                self._resolve(fut, reply.error())
            return
        if final and reply.corr is not None:
            self.outstanding -= 1
            self._pending_results -= 1
        self._ready.append(reply)

    @staticmethod
    def _resolve(fut: Any, error: BaseException | None, value: Any = None) -> None:
        if fut.done():
            return
        if error is None:
            fut.set_result(value)
        else:
            fut.set_exception(error)
