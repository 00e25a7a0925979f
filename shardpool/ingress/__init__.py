"""The ingress: a ZeroMQ ROUTER socket through which producer processes submit channel messages.

::

  producer DEALER ─[1, SUBMIT, items]─▶ ROUTER ─▶ read_item ─▶ pool.submit_bytes(on_done=record)
        ▲                               (one thread owns the socket)                │
        │                                      pool I/O thread: record(value, error) │
        │                                                   or record.halted(error)  ▼
        └─[1, REPLIES, [[corr, status, value], ...]]◀─ Outbox ◀─ Outcomes (deque + pipe wake)

One thread (``shardpool-ingress``, :mod:`.server`) owns the socket, its monitor and the CURVE
authenticator's context (:mod:`.sockets`). It reads frames, checks every item (:mod:`.items`; see
:mod:`shardpool.protocol` for the wire format and the error codes) and submits accepted ones
without blocking. When a worker's in-flight window is full it stops reading the socket (so
ZeroMQ's high-water marks push back on the producers; nothing is dropped) and only moves replies
until the pool has room again.

Outcomes arrive on the pool's I/O thread through each message's own ``on_done`` record
(:mod:`.records`); that thread only records the outcome and queues the record, so the socket is
never touched from two threads. The pool reports one channel's outcomes in the order it accepted
the messages, so replies leave in that order as they come. The :mod:`.outbox` sends them without
blocking and bounds what each producer can make the backend hold.

Bad input is answered, counted by error code and logged at most once per code per
:data:`LOG_INTERVAL_S` (:mod:`shardpool.ratelog`). Error texts describe bad values without
formatting them
(:func:`shardpool.protocol.describe`). Whatever else goes wrong while one frame or item is handled
(a bug) is answered ``internal_error``, counted and logged with its traceback, rate-limited, and
the loop goes on; a failure while sending replies or reading the monitor is caught the same way.
So no frame can stop or stall the ingress.
"""

from __future__ import annotations

from .server import LOG_INTERVAL_S, Ingress
from .settings import IngressSettings

__all__ = ["LOG_INTERVAL_S", "Ingress", "IngressSettings"]
