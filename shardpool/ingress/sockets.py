"""The ingress's ROUTER socket: its options, CURVE authentication and connection monitor."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import zmq
import zmq.auth

from ..ratelog import RateLimitedLog
from ..security import monitor_events, secure_socket_file
from .outbox import REPLY_HWM
from .settings import IngressSettings

__all__ = ["RouterSocket", "open_router"]

# Heartbeats towards producers (ms): a producer host that vanished without closing its tcp
# connection is dropped, so its backlog is freed.
_HEARTBEAT_IVL_MS = 5_000
_HEARTBEAT_TIMEOUT_MS = 15_000
# pyzmq's authenticator applies "*" only to sockets without a domain; name ours explicitly.
_ZAP_DOMAIN = "shardpool"

_MONITOR_EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_AUTH_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class RouterSocket:
    """The bound ROUTER (``sock``), its monitor (``mon``), the CURVE authenticator (if any) and
    the context that owns them; all used and closed by the thread that opened them."""

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        self.sock: zmq.Socket[bytes] | None = None
        self.mon: zmq.Socket[bytes] | None = None
        self.auth: Any = None  # zmq.auth.thread.ThreadAuthenticator, imported only for CURVE

    def count_events(self, counters: dict[str, int], warn: RateLimitedLog) -> None:
        """Read every monitor event waiting: connections, disconnections, failed handshakes."""
        assert self.mon is not None
        for event in monitor_events(self.mon):
            if event == zmq.EVENT_ACCEPTED:
                counters["connections"] += 1
            elif event == zmq.EVENT_DISCONNECTED:
                counters["disconnections"] += 1
            elif event & _AUTH_FAILURES:
                counters["auth_failures"] += 1
                warn.warn("auth", "ingress: a producer failed the CURVE handshake")

    def close(self, linger_ms: int = 0) -> None:
        """Close everything and terminate the context; replies still queued in ZeroMQ get up to
        ``linger_ms`` milliseconds to leave."""
        if self.sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.disable_monitor()
            self.sock.close(linger=linger_ms)
        if self.mon is not None:
            self.mon.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()


def open_router(s: IngressSettings, router: RouterSocket) -> str:
    """Create, configure and bind ``router``'s socket as ``s`` says; returns the bound endpoint
    (a tcp port of 0 resolved). What was created before a failure stays in ``router`` to close.

    Raises:
        zmq.ZMQError: the endpoint cannot be bound (in use, bad address).
        OSError / InsecurePathError: the ipc socket file cannot be secured.
    """
    sock = router.sock = router.ctx.socket(zmq.ROUTER)
    sock.linger = 0
    # With router_mandatory a reply to a vanished producer raises EHOSTUNREACH and one to a
    # producer whose pipe is full raises EAGAIN: ZeroMQ never drops one silently, and the small
    # high-water mark keeps what it queues per producer small (see shardpool.ingress.outbox).
    sock.router_mandatory = 1
    sock.sndhwm = REPLY_HWM
    sock.heartbeat_ivl = _HEARTBEAT_IVL_MS
    sock.heartbeat_timeout = _HEARTBEAT_TIMEOUT_MS
    sock.rcvhwm = s.rcvhwm
    sock.maxmsgsize = s.max_frame_bytes
    if s.curve is not None:
        from zmq.auth.thread import ThreadAuthenticator

        auth = router.auth = ThreadAuthenticator(
            router.ctx, log=logging.getLogger("shardpool.ingress.auth")
        )
        auth.start()
        auth.configure_curve(
            domain=_ZAP_DOMAIN, location=s.curve.clients_dir or zmq.auth.CURVE_ALLOW_ANY
        )
        sock.curve_secretkey = s.curve.secret
        sock.curve_publickey = s.curve.public
        sock.curve_server = True
        sock.zap_domain = _ZAP_DOMAIN.encode()
    router.mon = sock.get_monitor_socket(_MONITOR_EVENTS)
    sock.bind(s.endpoint)
    secure_socket_file(s.endpoint)
    return str(sock.get_string(zmq.LAST_ENDPOINT))
