"""The blocking client: :class:`Client` (one ZeroMQ DEALER socket, no background thread) and the
:class:`ReplyFuture` of its requests, whose waits drive the socket."""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import zmq

from .. import protocol as P
from ..errors import BackendLost, ShardPoolError
from .connection import Curve, make_socket
from .core import ClientCore
from .replies import Reply

__all__ = ["Client", "ReplyFuture"]

_LOOK_S = 0.25  # send reads what has arrived at least this often (seconds)


class ReplyFuture(concurrent.futures.Future[Any]):
    """The future of one :meth:`Client.request`. Waiting on it (``result(timeout)``) also drives
    the client's socket, since a :class:`Client` has no background thread. ``halted`` holds the
    HALTED notice if the channel was parked on this message."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client
        self.halted: Reply | None = None

    def result(self, timeout: float | None = None) -> Any:
        """The handler's result, waiting up to ``timeout`` seconds (None: the client's timeout).

        Raises:
            ReplyError: as ``ReplyFailed``, ``ReplyRejected``, ``ReplyClosed`` or
                ``ReplyInDoubt``. BackendLost. TimeoutError.
        """
        self._client._wait_for(self.done, timeout, "reply")
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._client._wait_for(self.done, timeout, "reply")
        return super().exception(0)


class Client(ClientCore):
    """A blocking producer client (one ZeroMQ DEALER socket, no background thread).

    Args:
        endpoint: the ingress endpoint; default: that of ``config``.
        config: a Config or a path; default: the config ``shardpool run`` would load.
        timeout: default seconds for every wait (flow control, flush, handshake, results).
        batch_size: messages per frame, at most. batch_bytes: payload bytes per frame, about.
        max_outstanding: messages awaiting their reply before ``send`` waits; lowered by the
            handshake to the backend's ``max_pending_per_producer``.
        server_public_key / client_secret_key: CURVE key files (or the server's Z85 key); the
            server key defaults to ``ingress.curve_public_key`` of the config.
        handshake: send a HELLO and wait for the answer when connecting, here in the
            constructor (:meth:`AsyncClient.connect` for the asyncio client): learns the
            backend's limits, fails fast when there is no backend or its keys are refused.
        sndhwm: frames ZeroMQ may queue towards the backend.

    Raises:
        TimeoutError: the handshake got no answer in ``timeout`` seconds.
        NotRunning: (handshake) the ipc endpoint is left from a backend that is gone.
        AccessDenied: (handshake) the backend refused this client's CURVE handshake.
        ConfigError / OSError / ValueError: bad config or key files, or a batch size, batch
            bytes or ``max_outstanding`` below 1.
    """

    def _open(self, curve: Curve | None, sndhwm: int) -> None:
        self._next_look = 0.0
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        try:
            self._watch = make_socket(self._sock, self.endpoint, curve, sndhwm)
            self._poller = zmq.Poller()
            self._poller.register(self._sock, zmq.POLLIN)
            self._poller.register(self._watch.monitor, zmq.POLLIN)
            if self._handshake:
                self.hello()
        except BaseException:
            self.close(0)
            raise

    # -- sending -----------------------------------------------------------------------------

    def send(self, channel_id: bytes, message: Any, timeout: float | None = None) -> int:
        """Queue ``message`` (CBOR-encoded here) for ``channel_id``; returns its correlation id.

        Its reply comes through :meth:`results` / :meth:`poll`. Waits (up to ``timeout``) while
        ``max_outstanding`` messages await replies or the socket's queue is full.

        Raises:
            ChannelIdError / PayloadTooLarge / TypeError: refused locally (nothing sent).
            TimeoutError: flow control did not let it go in time (it stays queued).
            ReplyError: the backend refused this client's frames (protocol error).
            BackendLost: the backend went away with messages unanswered (see the module doc).
        """
        return self.send_bytes(channel_id, cbor2.dumps(message), timeout)

    def send_bytes(self, channel_id: bytes, payload: bytes, timeout: float | None = None) -> int:
        """:meth:`send` for a pre-encoded payload (forwarded to the handler as is)."""
        corr = self._add(channel_id, payload)
        self._after_add(timeout)
        return corr

    def request(self, channel_id: bytes, message: Any, timeout: float | None = None) -> ReplyFuture:
        """Queue ``message`` and return a future of the handler's result (its reply does not go
        to :meth:`results`). The message goes out with the next flush or the future's wait."""
        return self.request_bytes(channel_id, cbor2.dumps(message), timeout)

    def request_bytes(
        self, channel_id: bytes, payload: bytes, timeout: float | None = None
    ) -> ReplyFuture:
        """:meth:`request` for a pre-encoded payload."""
        fut = ReplyFuture(self)
        self._add(channel_id, payload, fut)
        self._after_add(timeout)
        return fut

    def call(self, channel_id: bytes, message: Any, timeout: float | None = None) -> Any:
        """Send one message and wait for its result (``timeout`` seconds for the whole call).

        Raises:
            ReplyError: the message failed, was rejected or handed back. TimeoutError.
            BackendLost: the backend went away before answering.
        """
        fut = self.request(channel_id, message, timeout)
        return fut.result(self.timeout if timeout is None else timeout)

    def _after_add(self, timeout: float | None) -> None:
        if self._batch_due():
            self.flush(timeout)
        elif time.monotonic() >= self._next_look:
            # Without a thread of its own, the client learns of replies and of a lost backend
            # only when it looks: a producer that sends now and then looks this often.
            self._next_look = time.monotonic() + _LOOK_S
            self._receive(0)
        if self.outstanding >= self.max_outstanding:
            # End-to-end flow control: replies only come as the pool finishes work.
            self.flush(timeout)
            self._wait_for(lambda: self.outstanding < self.max_outstanding, timeout, "room")

    def flush(self, timeout: float | None = None) -> None:
        """Send the pending batch now, waiting up to ``timeout`` seconds for queue room.

        Raises:
            TimeoutError: the queue stayed full (the batch stays pending; nothing is lost).
            BackendLost: the backend went away with messages unanswered.
        """
        if not self._buf:
            self._receive(0)
            return
        frame = P.encode_submit(self._buf)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            try:
                self._sock.send(frame, zmq.NOBLOCK)
                break
            except zmq.Again:
                pass
            # Keep reading replies while we wait: the backend may be waiting for us to read.
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"backend at {self.endpoint} did not take more messages within the timeout "
                    f"({self.outstanding} awaiting replies)"
                )
            self._sock.poll(math.ceil(min(left, 0.1) * 1000), zmq.POLLIN | zmq.POLLOUT)
            self._receive(0)
        self._sent()
        self._receive(0)

    # -- receiving ---------------------------------------------------------------------------

    def _receive(self, timeout_s: float) -> bool:
        """Read every frame available, waiting up to ``timeout_s`` for the first (or for news
        of the connection); True if any.

        Raises:
            BackendLost: the connection is lost with messages unanswered (replies that arrived
                before that are taken first).
        """
        if self._lost is not None:
            raise self._lost
        sock = self._sock
        if timeout_s > 0:
            self._poller.poll(math.ceil(timeout_s * 1000))
        got = False
        while True:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            got = True
            self._on_frame(data)
        assert self._watch is not None
        lost = self._link_lost(self._watch.events())
        if lost is not None:
            raise lost
        return got

    def _wait_for(self, cond: Callable[[], bool], timeout: float | None, what: str) -> None:
        if cond():
            return
        try:
            self.flush(timeout)
            deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
            while not cond():
                if self._fatal is not None and what != "reply":
                    raise self._fatal
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"no {what} from the backend at {self.endpoint} within the timeout "
                        f"({self.outstanding} messages awaiting replies)"
                    )
                self._receive(min(left, 0.5))
        except BackendLost:
            if not cond():  # e.g. a future the loss has just failed: it is done now
                raise

    def poll(self, timeout: float = 0.0) -> list[Reply]:
        """Replies to :meth:`send` received so far (flushing first), waiting up to ``timeout``
        seconds for at least one if there is none yet.

        Raises:
            BackendLost: the backend went away and no reply is left to return.
        """
        try:
            self.flush()
            if not self._ready and timeout > 0 and self._pending_results > 0:
                with contextlib.suppress(TimeoutError):  # none yet: an empty list says so
                    self._wait_for(
                        lambda: bool(self._ready) or self._pending_results == 0, timeout, "reply"
                    )
        except BackendLost:
            if not self._ready:
                raise  # else: what arrived before the loss first; the next call raises
        out = list(self._ready)
        self._ready.clear()
        return out

    def results(self, timeout: float | None = None) -> Iterator[Reply]:
        """Yield replies to :meth:`send` until every message sent so far has its final reply.

        Raises:
            TimeoutError: no reply for ``timeout`` seconds while some are still due.
            BackendLost: the backend went away with some still due.
        """
        self.flush(timeout)
        while True:
            while self._ready:
                yield self._ready.popleft()
            if self._pending_results <= 0:
                return
            self._wait_for(
                lambda: bool(self._ready) or self._pending_results <= 0, timeout, "reply"
            )

    def wait(self, timeout: float | None = None) -> None:
        """Flush and wait until every message sent so far has its final reply (replies to
        :meth:`send` stay available to :meth:`results`).

        Raises:
            TimeoutError: after ``timeout`` seconds.
            BackendLost: the backend went away with some still due.
        """
        self._wait_for(lambda: self.outstanding <= 0, timeout, "reply")

    def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """Handshake (and barrier: answered after every reply ready before it); returns the
        backend's info (version, limits, pid) and learns its ``max_message_bytes``.

        Raises:
            TimeoutError: no answer in ``timeout`` seconds.
            AccessDenied: the backend refused this client's CURVE handshake (or its lack of one).
        """
        token = os.urandom(8)
        self.flush(timeout)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._sock.send(P.encode_hello(token))
        while token not in self._hello:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no answer from a shardpool backend at {self.endpoint}")
            self._receive(min(left, 0.5))
        info = self._hello.pop(token)
        self._learn(info)
        return info

    # -- closing -----------------------------------------------------------------------------

    def close(self, timeout: float | None = 1.0) -> None:
        """Flush what is pending (up to ``timeout`` seconds), then close. Replies not received
        yet are lost to this client (the messages are still processed)."""
        sock = getattr(self, "_sock", None)
        if sock is None or sock.closed:
            return
        try:
            if self._buf and timeout and self._lost is None:
                self.flush(timeout)
        except (TimeoutError, zmq.ZMQError, ShardPoolError):
            pass
        if self._watch is not None:
            self._watch.close()
        # Nothing queued can reach a backend that is gone: do not linger for it.
        linger = 0 if self._lost is not None else int((timeout or 0) * 1000)
        sock.close(linger=linger)
        self._ctx.term()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
