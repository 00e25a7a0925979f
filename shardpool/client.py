"""Producer clients for the ingress of ``shardpool run``: :class:`Client` (blocking) and
:class:`AsyncClient` (asyncio).

::

    from shardpool.client import Client

    with Client() as client:                          # finds the backend of config/shardpool.toml
        corr = client.send(b"chan-1", {"type": "update_add_htlc", ...})   # batched, returns at once
        fut = client.request(b"chan-2", {"type": "shutdown", ...})        # a future of the result
        print(fut.result(timeout=5))
        for reply in client.results(timeout=10):      # replies to send(), per-channel order
            print(reply.corr, reply.status, reply.value)

Both clients batch messages into frames (``batch_size`` messages or ``batch_bytes`` bytes, and
whatever is pending when you flush, request, wait or read results), and give flow control: at most
``max_outstanding`` messages may await their reply, and ZeroMQ's queue towards the backend is
bounded, so when the pool falls behind a producer's ``send`` waits (never drops) — up to
``timeout`` seconds, then :class:`TimeoutError` with nothing lost (the message is still queued
and goes out with the next flush). Every wait in these classes has a timeout.

A reply's ``status`` is ``"ok"`` (``value`` is the handler's return value), ``"failed"`` (the
handler raised), ``"rejected"`` (refused at the door: bad channel id, payload too large, backend
shutting down, ...), ``"closed"`` (accepted but handed back at shutdown, never processed: safe to
send again), ``"in_doubt"`` (the backend stopped while the handler may have been running it) or
``"halted"`` (not final: the channel is parked under the ``halt`` policy until an operator acts).
A client is not thread-safe: use one per thread (or one :class:`AsyncClient` per event loop).

**A lost backend is noticed within about 2 s**, not at your timeout: the client watches its
connection (a ZeroMQ socket monitor sees a closed connection at once, e.g. when the backend
process dies; ZeroMQ heartbeats declare a silent tcp peer gone after 1.5 s). If messages were
sent and are still unanswered then — or are sent while the connection stays down past that —
every call (``send``, ``request`` and its future, ``call``, ``results``, ``wait``, ``poll``,
``flush``, ``hello``) raises :class:`~shardpool.errors.BackendLost` naming the endpoint and how
many messages were left unanswered (each may or may not have been processed). The client is then
broken for good: create a new one. A connection lost with nothing unanswered is not an error
(ZeroMQ reconnects). On an ipc endpoint left by a backend that is gone (its socket file remains
but nobody holds its lock), the handshake fails at once with
:class:`~shardpool.control.NotRunning` naming the pid the lock named.

The HELLO answer advertises the backend's ``max_pending_per_producer``; ``max_outstanding`` is
lowered to it, so a client that reads its replies is never refused ``too_many_pending``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import math
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

import cbor2
import zmq
import zmq.asyncio

from . import protocol as P
from .config import Config, find_config_path, load_config
from .control import (
    HEARTBEAT_TIMEOUT_MS,
    ConnectionWatch,
    NotRunning,
    apply_heartbeats,
    stale_backend,
)
from .errors import AccessDenied, BackendLost, PayloadTooLarge, ShardPoolError
from .routing import check_channel_id
from .security import load_client_keys, load_public_key, resolve_endpoints

__all__ = ["AsyncClient", "Client", "Reply", "ReplyError", "ReplyFuture", "default_endpoint"]

DEFAULT_TIMEOUT_S = 30.0
_LOOK_S = 0.25  # a sync client's send reads what has arrived at least this often (seconds)


class ReplyError(ShardPoolError):
    """A message was not processed successfully: ``status`` is ``"failed"``, ``"rejected"``,
    ``"closed"``, ``"in_doubt"`` (or ``"protocol"`` for a frame the backend could not read); ``code`` is the
    protocol error code and ``info`` the whole error map."""

    def __init__(self, status: str, info: Any) -> None:
        info = info if isinstance(info, dict) else {"message": str(info)}
        self.status = status
        self.code: str = str(info.get("error", status))
        self.info: dict[str, Any] = info
        super().__init__(f"{status}: {info.get('message', self.code)}")


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
        return None if self.ok else ReplyError(self.status, self.value)


def default_endpoint(config: Config | str | os.PathLike[str] | None = None) -> str:
    """The ingress endpoint of the backend started with ``config`` (default: the config
    ``shardpool run`` itself would load)."""
    cfg = config if isinstance(config, Config) else load_config(find_config_path(config))
    return resolve_endpoints(cfg)[0]


def _curve_options(
    config: Config | None,
    server_public_key: str | os.PathLike[str] | bytes | None,
    client_secret_key: str | os.PathLike[str] | None,
) -> tuple[bytes, bytes, bytes] | None:
    """``(server public, client public, client secret)`` or None when CURVE is not used."""
    if server_public_key is None and config is not None and config.ingress.curve_public_key:
        server_public_key = config.ingress.curve_public_key
    if server_public_key is None and client_secret_key is None:
        return None
    if server_public_key is None or client_secret_key is None:
        raise ValueError("CURVE needs both server_public_key and client_secret_key")
    if isinstance(server_public_key, bytes) and len(server_public_key) == 40:
        server = server_public_key
    else:
        server = load_public_key(server_public_key)  # type: ignore[arg-type]
    public, secret = load_client_keys(client_secret_key)
    return server, public, secret


def _make_socket(
    sock: zmq.Socket[Any], endpoint: str, curve: tuple[bytes, bytes, bytes] | None, sndhwm: int
) -> ConnectionWatch:
    """Configure and connect the client's DEALER; returns the watch on its connection."""
    sock.linger = 0
    sock.sndhwm = sndhwm
    sock.rcvhwm = 0  # replies are bounded by what we sent; never let ZeroMQ drop one
    apply_heartbeats(sock)
    if curve is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve
    watch = ConnectionWatch(sock)  # before connect: the first connection is an event too
    sock.connect(endpoint)
    return watch


def _check_not_stale(endpoint: str) -> None:
    stale = stale_backend(endpoint)
    if stale is not None:
        raise NotRunning(stale)


def _check(channel_id: bytes, payload: bytes, max_bytes: int | None) -> bytes:
    cid = check_channel_id(channel_id)
    if type(payload) is not bytes:
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        else:
            raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadTooLarge(
            f"payload is {len(payload)} bytes, over the backend's maximum of {max_bytes}"
        )
    return cid


class _Core:
    """State shared by both clients: numbering, the batch, outstanding replies."""

    def __init__(self, batch_size: int, batch_bytes: int, max_outstanding: int) -> None:
        if batch_size < 1 or batch_bytes < 1 or max_outstanding < 1:
            raise ValueError("batch_size, batch_bytes and max_outstanding must be >= 1")
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
        self.endpoint = ""
        self._watch: ConnectionWatch | None = None

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
        """Judge the connection after ``disconnections`` were seen (replies that arrived before
        them already taken): lost when messages are unanswered and the connection closed, or
        stayed down past the heartbeat timeout. Marks the client lost (and fails its futures)."""
        if self._lost is not None:
            return self._lost
        if self._watch is not None and self._watch.refused is not None:
            # Nothing this client sends can get through: fail now, whatever is outstanding.
            n = self.unanswered
            return self._fail_all(
                AccessDenied(
                    f"the shardpool backend at {self.endpoint} refused this client's "
                    f"connection: {self._watch.refused} (ingress.curve_clients_dir holds the "
                    f"keys it accepts); {n} messages were not delivered",
                    endpoint=self.endpoint,
                    unanswered=n,
                )
            )
        if self.unanswered <= 0 or self._watch is None:
            return None
        down = self._watch.down_since
        if not disconnections and (
            down is None or time.monotonic() - down <= HEARTBEAT_TIMEOUT_MS / 1000
        ):
            return None
        n = self.unanswered
        unsent = len(self._buf)
        err = BackendLost(
            f"the shardpool backend at {self.endpoint} went away (its connection closed, or "
            f"was silent for {HEARTBEAT_TIMEOUT_MS / 1000:g} s) with {n} messages unanswered; "
            "each may or may not have been processed"
            + (f"; {unsent} more were never sent" if unsent else "")
            + ". This client is broken: create a new one.",
            endpoint=self.endpoint,
            unanswered=n,
        )
        return self._fail_all(err)

    def _fail_all(self, err: BackendLost) -> BackendLost:
        """Mark the client lost with ``err`` and fail every future with it."""
        self._lost = err
        for fut in self._futures.values():
            self._resolve(fut, err)
        self._futures.clear()
        return err

    def _add(self, cid: bytes, payload: bytes, fut: Any = None) -> int:
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

    def _take_frame(self) -> bytes:
        frame = P.encode_submit(self._buf)
        return frame

    def _sent(self) -> None:
        self._buf = []
        self._buf_bytes = 0

    def _on_frame(self, data: bytes) -> None:
        """Dispatch one frame from the backend."""
        try:
            msg = cbor2.loads(data)
            version, kind = msg[0], msg[1]
        except Exception:  # noqa: BLE001 - a garbled frame is the backend's bug; skip it
            return
        if version != P.VERSION:
            return
        if kind == P.REPLIES:
            for corr, status, value in msg[2]:
                self._on_reply(Reply(corr, P.STATUS_NAMES.get(status, str(status)), value))
        elif kind == P.HELLO:
            self._hello[msg[2]] = msg[3]
        elif kind == P.ERROR:
            # This client only sends well-formed frames, so a frame error (too many producers,
            # version mismatch) means nothing it sends can succeed: fail everything outstanding.
            err = ReplyError("protocol", msg[2])
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


# ------------------------------------------------------------------------------------------ sync


class ReplyFuture(concurrent.futures.Future[Any]):
    """The future of one :meth:`Client.request`. Waiting on it (``result(timeout)``) also drives
    the client's socket, since a :class:`Client` has no background thread. ``halted`` holds the
    HALTED notice if the channel was parked on this message."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self._client = client
        self.halted: Reply | None = None

    def result(self, timeout: float | None = None) -> Any:
        """The handler's result. Raises ReplyError (failed/rejected/closed) or TimeoutError."""
        self._client._wait_for(self.done, timeout, "reply")
        return super().result(0)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._client._wait_for(self.done, timeout, "reply")
        return super().exception(0)


class Client(_Core):
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
        handshake: send a HELLO and wait for the answer in the constructor (learns the backend's
            limits; fails fast when there is no backend or its keys are refused).
        sndhwm: frames ZeroMQ may queue towards the backend.

    Raises:
        TimeoutError: the handshake got no answer in ``timeout`` seconds.
        NotRunning: (handshake) the ipc endpoint is left from a backend that is gone.
        AccessDenied: (handshake) the backend refused this client's CURVE handshake.
        ConfigError / OSError / ValueError: bad config or key files.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        config: Config | str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        batch_size: int = 256,
        batch_bytes: int = 1 << 20,
        max_outstanding: int = 65_536,
        server_public_key: str | os.PathLike[str] | bytes | None = None,
        client_secret_key: str | os.PathLike[str] | None = None,
        handshake: bool = True,
        sndhwm: int = 1000,
    ) -> None:
        super().__init__(batch_size, batch_bytes, max_outstanding)
        cfg = None
        if endpoint is None or (server_public_key is None and config is not None):
            cfg = config if isinstance(config, Config) else load_config(find_config_path(config))
        self.endpoint = endpoint if endpoint is not None else resolve_endpoints(cfg)[0]  # type: ignore[arg-type]
        self.timeout = timeout
        curve = _curve_options(cfg, server_public_key, client_secret_key)
        if handshake:
            _check_not_stale(self.endpoint)
        self._next_look = 0.0
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        try:
            self._watch = _make_socket(self._sock, self.endpoint, curve, sndhwm)
            self._poller = zmq.Poller()
            self._poller.register(self._sock, zmq.POLLIN)
            self._poller.register(self._watch.monitor, zmq.POLLIN)
            if handshake:
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
        cid = _check(channel_id, payload, self.max_message_bytes)
        corr = self._add(cid, payload)
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
        cid = _check(channel_id, payload, self.max_message_bytes)
        fut = ReplyFuture(self)
        self._add(cid, payload, fut)
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
        frame = self._take_frame()
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

    def _wait_for(self, cond: Any, timeout: float | None, what: str) -> None:
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
                try:
                    self._wait_for(
                        lambda: bool(self._ready) or self._pending_results == 0, timeout, "reply"
                    )
                except TimeoutError:
                    pass  # none yet: an empty list says so
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


# ------------------------------------------------------------------------------------------ async


class AsyncClient(_Core):
    """The asyncio producer client. Create it with ``await AsyncClient.connect(...)`` (same
    arguments as :class:`Client`) inside the event loop that uses it.

    A reader task receives replies as they come; :meth:`send` awaits (instead of blocking) under
    flow control; :meth:`request` returns an :class:`asyncio.Future`.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        config: Config | str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        batch_size: int = 256,
        batch_bytes: int = 1 << 20,
        max_outstanding: int = 65_536,
        server_public_key: str | os.PathLike[str] | bytes | None = None,
        client_secret_key: str | os.PathLike[str] | None = None,
        sndhwm: int = 1000,
    ) -> None:
        super().__init__(batch_size, batch_bytes, max_outstanding)
        cfg = None
        if endpoint is None or (server_public_key is None and config is not None):
            cfg = config if isinstance(config, Config) else load_config(find_config_path(config))
        self.endpoint = endpoint if endpoint is not None else resolve_endpoints(cfg)[0]  # type: ignore[arg-type]
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket = self._ctx.socket(zmq.DEALER)
        self._watch = _make_socket(
            self._sock,
            self.endpoint,
            _curve_options(cfg, server_public_key, client_secret_key),
            sndhwm,
        )
        self._changed = asyncio.Event()  # set whenever replies (or news of the backend) arrive
        self._lost_event = asyncio.Event()
        self._flush_handle: asyncio.Handle | None = None
        self._flush_lock = asyncio.Lock()
        self._reader = self._loop.create_task(self._read())

    @classmethod
    async def connect(
        cls, endpoint: str | None = None, *, handshake: bool = True, **kwargs: Any
    ) -> AsyncClient:
        """Create a client and (by default) handshake with the backend.

        Raises:
            TimeoutError: no answer to the handshake within ``timeout`` seconds.
            NotRunning: (handshake) the ipc endpoint is left from a backend that is gone.
        """
        client = cls(endpoint, **kwargs)
        if handshake:
            try:
                _check_not_stale(client.endpoint)
                await client.hello()
            except BaseException:
                await client.aclose(0)
                raise
        return client

    async def _read(self) -> None:
        """The reader task: replies as they come, and news of the connection."""
        sock = self._sock
        assert self._watch is not None
        mon: Any = self._watch.monitor  # an asyncio socket: its calls return futures
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        while True:
            # While the connection is down, wake now and then to judge how long it has been.
            wait_ms = 250 if self._watch.down_since is not None else None
            try:
                await poller.poll(wait_ms)
                while True:  # replies first: those sent before a loss are still good
                    try:
                        data = await sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_frame(data)
                disconnections = 0
                while True:
                    try:
                        frames = await mon.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    disconnections += self._watch.feed(frames)
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            if self._link_lost(disconnections) is not None:
                self._lost_event.set()
            self._changed.set()

    async def _wait_for(self, cond: Any, timeout: float | None, what: str) -> None:
        deadline = self._loop.time() + (self.timeout if timeout is None else timeout)
        while not cond():
            if self._lost is not None:
                raise self._lost
            if self._fatal is not None and what != "reply":
                raise self._fatal
            left = deadline - self._loop.time()
            if left <= 0:
                raise TimeoutError(
                    f"no {what} from the backend at {self.endpoint} within the timeout "
                    f"({self.outstanding} messages awaiting replies)"
                )
            self._changed.clear()
            if cond():
                return
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def send(self, channel_id: bytes, message: Any, timeout: float | None = None) -> int:
        """Queue ``message``; returns its correlation id (reply via :meth:`results`). Awaits
        under flow control up to ``timeout`` seconds (then TimeoutError; it stays queued)."""
        return await self.send_bytes(channel_id, cbor2.dumps(message), timeout)

    async def send_bytes(
        self, channel_id: bytes, payload: bytes, timeout: float | None = None
    ) -> int:
        cid = _check(channel_id, payload, self.max_message_bytes)
        corr = self._add(cid, payload)
        await self._after_add(timeout)
        return corr

    async def request(
        self, channel_id: bytes, message: Any, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``message`` and return a future of the handler's result (raises ReplyError)."""
        return await self.request_bytes(channel_id, cbor2.dumps(message), timeout)

    async def request_bytes(
        self, channel_id: bytes, payload: bytes, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        cid = _check(channel_id, payload, self.max_message_bytes)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._add(cid, payload, fut)
        await self._after_add(timeout)
        return fut

    async def call(self, channel_id: bytes, message: Any, timeout: float | None = None) -> Any:
        """Send one message and await its result, ``timeout`` seconds at most.

        Raises:
            ReplyError. TimeoutError. BackendLost: the backend went away before answering.
        """
        t = self.timeout if timeout is None else timeout
        fut = await self.request(channel_id, message, t)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), t)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no reply from the backend at {self.endpoint} within {t} s"
            ) from None

    async def _after_add(self, timeout: float | None) -> None:
        if self._batch_due():
            await self.flush(timeout)
        elif self._flush_handle is None:
            # Messages added in the same loop turn share a frame; the flush runs right after.
            self._flush_handle = self._loop.call_soon(self._kick)
        if self.outstanding >= self.max_outstanding:
            await self.flush(timeout)
            await self._wait_for(lambda: self.outstanding < self.max_outstanding, timeout, "room")

    def _kick(self) -> None:
        self._flush_handle = None
        if self._buf:
            task = self._loop.create_task(self.flush())
            task.add_done_callback(_ignore_result)

    async def flush(self, timeout: float | None = None) -> None:
        """Send the pending batch, awaiting queue room up to ``timeout`` seconds.

        Raises:
            TimeoutError: the queue stayed full (the batch stays pending).
            BackendLost: the backend went away with messages unanswered.
        """
        async with self._flush_lock:
            if self._lost is not None:
                raise self._lost
            if not self._buf:
                return
            frame = self._take_frame()
            buf = self._buf
            self._sent()
            t = self.timeout if timeout is None else timeout
            sending = asyncio.ensure_future(self._sock.send(frame))
            lost = asyncio.ensure_future(self._lost_event.wait())
            sent = False
            try:
                # A full queue towards a backend that died would hold the send until the
                # timeout: the loss ends the wait.
                await asyncio.wait((sending, lost), timeout=t, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not sending.done():
                    sending.cancel()
                sent = not sending.cancelled() and sending.exception() is None
                if not sent:
                    # Not sent: put the batch back in front of anything added meanwhile.
                    self._buf = buf + self._buf
                    self._buf_bytes = sum(len(i[1]) + len(i[2]) + 12 for i in self._buf)
            if sent:
                return
            if not sending.cancelled():
                raise sending.exception()  # type: ignore[misc]
            if self._lost is not None:
                raise self._lost
            raise TimeoutError(
                f"backend at {self.endpoint} did not take more messages within {t} s"
            )

    async def results(self, timeout: float | None = None) -> AsyncIterator[Reply]:
        """Yield replies to :meth:`send` until every message sent so far has its final reply.

        Raises:
            TimeoutError: no reply for ``timeout`` seconds while some are due.
            BackendLost: the backend went away with some still due.
        """
        await self.flush(timeout)
        while True:
            while self._ready:
                yield self._ready.popleft()
            if self._pending_results <= 0:
                return
            await self._wait_for(
                lambda: bool(self._ready) or self._pending_results <= 0, timeout, "reply"
            )

    async def wait(self, timeout: float | None = None) -> None:
        """Flush and await the final reply of everything sent so far.

        Raises:
            TimeoutError. BackendLost: the backend went away with some still due.
        """
        await self.flush(timeout)
        await self._wait_for(lambda: self.outstanding <= 0, timeout, "reply")

    async def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """Handshake / barrier; see :meth:`Client.hello`."""
        token = os.urandom(8)
        await self.flush(timeout)
        await self._sock.send(P.encode_hello(token))
        try:
            await self._wait_for(lambda: token in self._hello, timeout, "handshake answer")
        except TimeoutError:
            raise TimeoutError(f"no answer from a shardpool backend at {self.endpoint}") from None
        info = self._hello.pop(token)
        self._learn(info)
        return info

    async def aclose(self, timeout: float | None = 1.0) -> None:
        """Flush (up to ``timeout`` seconds) and close."""
        if self._sock.closed:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        try:
            if self._buf and timeout and self._lost is None:
                await self.flush(timeout)
        except (TimeoutError, zmq.ZMQError, ShardPoolError):
            pass
        self._reader.cancel()
        try:
            await self._reader
        except asyncio.CancelledError:
            pass
        for fut in self._futures.values():
            if not fut.done():
                fut.cancel()
        if self._watch is not None:
            self._watch.close()
        linger = 0 if self._lost is not None else int((timeout or 0) * 1000)
        self._sock.close(linger=linger)
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved so asyncio does not log it; the next flush raises again
