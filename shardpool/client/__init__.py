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
A future (or ``call``) whose message did not succeed raises the :class:`ReplyError` of its
status: :class:`ReplyFailed`, :class:`ReplyRejected`, :class:`ReplyClosed` or
:class:`ReplyInDoubt`. A client is not thread-safe: use one per thread (or one
:class:`AsyncClient` per event loop).

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
:class:`~shardpool.errors.NotRunning` naming the pid the lock named.

The HELLO answer advertises the backend's ``max_pending_per_producer``; ``max_outstanding`` is
lowered to it, so a client that reads its replies is never refused ``too_many_pending``.

Modules: :mod:`.sync` (:class:`Client`), :mod:`.aio` (:class:`AsyncClient`), :mod:`.core` (what
both share), :mod:`.connection` (socket set-up and the lost-backend judgement), :mod:`.replies`
(:class:`Reply` and the errors). Frames are built and read by :mod:`shardpool.protocol`.
"""

from __future__ import annotations

from .aio import AsyncClient
from .connection import default_endpoint
from .core import DEFAULT_TIMEOUT_S
from .replies import (
    Reply,
    ReplyClosed,
    ReplyError,
    ReplyFailed,
    ReplyInDoubt,
    ReplyRejected,
    reply_error,
)
from .sync import Client, ReplyFuture

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "AsyncClient",
    "Client",
    "Reply",
    "ReplyClosed",
    "ReplyError",
    "ReplyFailed",
    "ReplyFuture",
    "ReplyInDoubt",
    "ReplyRejected",
    "default_endpoint",
    "reply_error",
]
