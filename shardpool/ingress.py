"""The ingress: a ZeroMQ ROUTER socket through which producer processes submit channel messages.

::

  producer DEALER ─[1, SUBMIT, items]─▶ ROUTER ─▶ check items ─▶ pool.submit_bytes(on_done=rec)
        ▲                               (one thread owns the socket)            │
        │                                                     pool I/O thread: rec(value, error)
        └─[1, REPLIES, [[corr, status, value], ...]]◀─ per-channel release ◀─ deque + pipe wake

One thread (``shardpool-ingress``) owns the socket, its monitor and the CURVE authenticator's
context. It reads frames, checks every item (see :mod:`shardpool.protocol` for the wire format and
the error codes) and submits accepted ones without blocking. When a worker's in-flight window is
full it stops reading the socket (so ZeroMQ's high-water marks push back on the producers; nothing
is dropped) and only moves replies until the pool has room again.

Outcomes arrive on the pool's I/O thread through ``on_done``; that thread only records the outcome
and appends the record to a deque (waking this thread through a pipe at most once per batch), so
the socket is never touched from two threads. Replies to one channel are released in the order its
messages were accepted, whatever order the pool reports them in: each channel keeps the records of
its accepted messages in a FIFO and a record is released only once everything before it was.

Bad input is answered, counted by error code and logged at most once per code per
:data:`LOG_INTERVAL_S`. Error texts describe bad values without formatting them
(:func:`shardpool.protocol.describe`). Whatever else goes wrong while one frame or item is handled
(a bug) is answered ``internal_error``, counted and logged with its traceback, rate-limited, and
the loop goes on; a failure while sending replies or reading the monitor is caught the same way.
So no frame can stop or stall the ingress.

Replies leave without blocking: the ROUTER has a small send high-water mark and
``router_mandatory``, so a producer that does not read makes ZeroMQ refuse its replies (EAGAIN)
instead of queueing them without bound. Refused reply frames wait in that producer's backlog and
are re-tried after 1 ms, then less and less often (up to every 50 ms) while none of them takes any,
as everyone else's replies flow. What a producer holds — accepted messages not yet answered plus
replies in its backlog — is bounded by ``max_pending_per_producer``: past it, its items are
answered ``too_many_pending``, and while it still does not read, its frames are refused whole and
counted into one ERROR. Per-producer state is freed when it reaches zero or the producer is gone.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, Protocol

import zmq
import zmq.auth
from zmq.utils.monitor import parse_monitor_message

from . import protocol as P
from .errors import HandlerError, InDoubt, InputError, PoolBroken, PoolClosed
from .routing import MAX_CHANNEL_ID_BYTES
from .security import CurveServerKeys, secure_socket_file
from .wakeup import WakePipe

log = logging.getLogger("shardpool.ingress")

__all__ = ["Ingress", "IngressSettings"]

LOG_INTERVAL_S = 10.0
"""Bad-input warnings of one error code are logged at most once per this many seconds."""

_READ_BURST = 64  # frames read per loop turn before replies get their turn again
_ROOM_WAIT_S = 0.05  # backpressure: re-try a full window at least this often (seconds)
# ZeroMQ's own reply queue per producer is at most _REPLY_HWM frames of _REPLY_ENTRIES replies;
# past that, replies wait in the producer's backlog where they count towards its bound.
_REPLY_HWM = 64
_REPLY_ENTRIES = 64
# Producers whose replies ZeroMQ refused are tried again after _RETRY_MIN_MS: a producer that
# reads is usually ready by then (ZeroMQ frees its pipe in steps). While none takes anything the
# gap doubles up to _RETRY_MAX_MS, so one that never reads costs almost nothing.
_RETRY_MIN_MS = 1
_RETRY_MAX_MS = 50
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


class _Submitter(Protocol):
    # submit_bytes(channel_id, payload, *, block, on_done) -> per-channel seq (ShardPool's, which
    # is typed without the keywords its bound front method takes).
    @property
    def submit_bytes(self) -> Callable[..., int]: ...


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs (sizes in bytes, times in seconds)."""

    endpoint: str
    max_message_bytes: int = 1 << 20
    max_items: int = 16_384
    max_producers: int = 1024
    curve: CurveServerKeys | None = None
    # Frames ZeroMQ reads ahead per producer before it pushes back on it. Small: it is memory
    # the backend holds for a producer whatever the ingress does (1000 frames of 200 KB held
    # 135 MB for one producer flooding a busy ingress); 16 frames of 256 messages still keep the
    # ingress fed.
    rcvhwm: int = 16
    # Messages accepted but unanswered plus replies held, per producer (see shardpool.protocol).
    max_pending_per_producer: int = 10_000

    @property
    def max_frame_bytes(self) -> int:
        """Largest frame accepted; ZeroMQ disconnects a peer that sends a larger one."""
        return max(64 << 20, 2 * self.max_message_bytes + (64 << 10))


class _Rec:
    """One accepted message: who sent it, and its outcome once the pool reports one.

    The record itself is the ``on_done`` callback (no bound method or closure per message).
    """

    __slots__ = ("ing", "ident", "corr", "cid", "cseq", "status", "value")

    def __init__(self, ing: Ingress, ident: bytes, corr: int, cid: bytes) -> None:
        self.ing = ing
        self.ident = ident
        self.corr = corr
        self.cid = cid
        self.cseq = -1
        self.status: int | None = None
        self.value: Any = None

    def __call__(self, value: Any, error: BaseException | None) -> None:
        # Runs on the pool's I/O thread: record, queue, wake. Nothing here may block or raise.
        if error is None:
            self.value = value
            self.status = P.OK
        elif isinstance(error, HandlerError):
            self.value = _failure_value(error)
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
        # Ingress._post inlined: this runs once per message on the pool's busiest thread.
        ing = self.ing
        ing._outcomes.append(self)
        if not ing._wake_pending:
            ing._wake_pending = True
            ing._wake()


def _failure_value(err: HandlerError) -> dict[str, Any]:
    return {
        "error": P.E_HANDLER_FAILED,
        "type": err.exc_type,
        "message": str(err),
        "seq": err.seq,
        "policy": err.policy,
    }


class _RateLimitedLog:
    """At most one record per key per interval (seconds), with a count of what was held back."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, key: str, message: str, *args: Any) -> None:
        """A warning (no traceback)."""
        self._emit(logging.WARNING, key, message, args, False)

    def error(self, key: str, message: str, *args: Any) -> None:
        """An error with the traceback of the exception being handled."""
        self._emit(logging.ERROR, key, message, args, True)

    def _emit(self, level: int, key: str, message: str, args: tuple[Any, ...], tb: bool) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" ({held} more like it in the last {now - last:.0f} s)" if held and last else ""
        self._log.log(level, message + suffix, *args, exc_info=tb)


class _Producer:
    """What one producer (ZeroMQ routing id) holds in the ingress.

    ``open`` counts its accepted messages whose final reply has not yet been handed to ZeroMQ;
    ``backlog`` holds reply frames ZeroMQ refused (its pipe to the producer was full), in order,
    each as ``(frame, finals, others)``: the frame (None for the place of the coalesced ERROR
    about refused frames), how many final replies to accepted messages it carries and how many
    other replies (rejections, HALTED notices, a HELLO answer or an ERROR). ``queued`` sums the
    ``others`` in the backlog, so ``open + queued`` is what counts towards the bound.
    """

    __slots__ = ("backlog", "held", "open", "queued", "refused_frames", "refused_messages")

    def __init__(self) -> None:
        self.open = 0
        self.backlog: collections.deque[tuple[bytes | None, int, int]] = collections.deque()
        self.queued = 0
        self.held = 0  # replies in the backlog (finals and others)
        self.refused_frames = 0  # frames refused whole since the last ERROR about them
        self.refused_messages = 0

    @property
    def pending(self) -> int:
        return self.open + self.queued


class Ingress:
    """The ingress socket and its thread.

    Args:
        pool: anything with ``submit_bytes(cid, payload, *, block, on_done) -> seq`` (a
            :class:`~shardpool.ShardPool`).
        settings: endpoint, limits and CURVE keys.
        info: extra fields for HELLO replies (e.g. the service's pid).
    """

    def __init__(
        self, pool: _Submitter, settings: IngressSettings, info: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self._submit = pool.submit_bytes
        self._info = {
            "version": P.VERSION,
            "max_message_bytes": settings.max_message_bytes,
            "max_items": settings.max_items,
            "max_frame_bytes": settings.max_frame_bytes,
            "max_pending_per_producer": settings.max_pending_per_producer,
            **(info or {}),
        }
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "frames",
                "bytes",
                "messages",
                "accepted",
                "rejected",
                "frame_errors",
                "replies",
                "reply_frames",
                "ok",
                "failed",
                "closed",
                "in_doubt",
                "halted",
                "undeliverable",
                "backpressure_waits",
                "internal_errors",
                "refused_frames",
                "refused_messages",
                "stalled_sends",
                "connections",
                "disconnections",
                "auth_failures",
            ),
            0,
        )
        self.errors: dict[str, int] = dict.fromkeys(P.FRAME_ERRORS + P.ITEM_ERRORS, 0)
        self.endpoint = settings.endpoint  # the bound address once started (tcp port resolved)
        self._warn = _RateLimitedLog(log, LOG_INTERVAL_S)
        # Cross-thread: the pool's I/O thread appends outcomes and wakes us through the pipe.
        self._outcomes: collections.deque[Any] = collections.deque()
        self._wake_pending = False
        self._wakeup = WakePipe()
        # Owned by the ingress thread.
        self._chans: dict[bytes, collections.deque[_Rec]] = {}
        self._out: dict[bytes, list[list[Any]]] = {}
        self._known: set[bytes] = set()
        self._producers: dict[bytes, _Producer] = {}
        self._stalled: set[bytes] = set()  # producers with a backlog
        self._held_replies = 0  # replies in all backlogs (read by stats() from any thread)
        self._current: bytes | None = None  # the producer whose frame is being submitted
        self._next_retry = 0.0
        self._retry_gap_ms = _RETRY_MIN_MS
        self._intake_reason: str | None = None
        self._closing = False
        self._close_deadline = 0.0
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="shardpool-ingress", daemon=True)

    # -- life cycle (any thread) -----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> str:
        """Bind the socket (in the ingress thread) and return the bound endpoint.

        Raises:
            zmq.ZMQError: the endpoint cannot be bound (in use, bad address).
            TimeoutError: the thread did not report within ``timeout`` seconds.
        """
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"ingress did not bind {self.settings.endpoint} in {timeout} s")
        if self._start_error is not None:
            self._thread.join(5.0)
            self._wakeup.close()
            raise self._start_error
        return self.endpoint

    def stop_intake(self, reason: str = P.E_SHUTTING_DOWN) -> None:
        """From now on every message is answered REJECTED with ``reason`` (``shutting_down`` or
        ``draining``) instead of being submitted; replies to accepted ones keep flowing."""
        self._intake_reason = reason
        self._wake()

    @property
    def accepting(self) -> bool:
        return self._intake_reason is None

    @property
    def alive(self) -> bool:
        """False once the ingress thread has ended (closed, or failed: see the log)."""
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Send every reply still due (waiting up to ``timeout`` seconds for outcomes of accepted
        messages), then close the socket and join the thread. Call after the pool has closed, so
        that every accepted message has had its outcome. Idempotent."""
        if not self._thread.is_alive():
            self._wakeup.close()
            return
        self._intake_reason = self._intake_reason or P.E_SHUTTING_DOWN
        self._close_deadline = time.monotonic() + timeout
        self._closing = True
        self._wake()
        self._thread.join(timeout + 5.0)
        if self._thread.is_alive():
            log.error("ingress thread did not stop")
        else:
            self._wakeup.close()

    def on_failure(self, err: HandlerError) -> None:
        """Pool failure hook (I/O thread): a ``halt`` failure parks its channel without finishing
        the message, so the producer is told now with a HALTED notice."""
        self._post(("halt", err))

    def stats(self) -> dict[str, Any]:
        """Counters (messages, frames, errors by code) and gauges; safe from any thread."""
        return {
            **self.counters,
            "endpoint": self.endpoint,
            "accepting": self.accepting,
            "producers": max(0, self.counters["connections"] - self.counters["disconnections"]),
            "pending": sum(len(q) for q in list(self._chans.values())),
            "stalled_producers": len(self._stalled),
            "held_replies": self._held_replies,
            "errors": {k: v for k, v in self.errors.items() if v},
        }

    # -- cross-thread wake -------------------------------------------------------------------

    def _post(self, item: Any) -> None:
        self._outcomes.append(item)
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    # -- the ingress thread ------------------------------------------------------------------

    def _main(self) -> None:
        ctx = zmq.Context()
        auth: Any = None
        sock: zmq.Socket[bytes] | None = None
        mon: zmq.Socket[bytes] | None = None
        try:
            s = self.settings
            sock = ctx.socket(zmq.ROUTER)
            sock.linger = 0
            # With router_mandatory a reply to a vanished producer raises EHOSTUNREACH and one to
            # a producer whose pipe is full raises EAGAIN: ZeroMQ never drops one silently, and
            # the small high-water mark keeps what it queues per producer small (see _Producer).
            sock.router_mandatory = 1
            sock.sndhwm = _REPLY_HWM
            sock.heartbeat_ivl = _HEARTBEAT_IVL_MS
            sock.heartbeat_timeout = _HEARTBEAT_TIMEOUT_MS
            sock.rcvhwm = s.rcvhwm
            sock.maxmsgsize = s.max_frame_bytes
            if s.curve is not None:
                from zmq.auth.thread import ThreadAuthenticator

                auth = ThreadAuthenticator(ctx, log=logging.getLogger("shardpool.ingress.auth"))
                auth.start()
                auth.configure_curve(
                    domain=_ZAP_DOMAIN, location=s.curve.clients_dir or zmq.auth.CURVE_ALLOW_ANY
                )
                sock.curve_secretkey = s.curve.secret
                sock.curve_publickey = s.curve.public
                sock.curve_server = True
                sock.zap_domain = _ZAP_DOMAIN.encode()
            mon = sock.get_monitor_socket(_MONITOR_EVENTS)
            sock.bind(s.endpoint)
            secure_socket_file(s.endpoint)
            self.endpoint = str(sock.get_string(zmq.LAST_ENDPOINT))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self._started.set()
            self._release(ctx, sock, mon, auth)
            return
        self._started.set()
        try:
            self._loop(sock, mon)
        except BaseException:  # noqa: BLE001 - must never die silently with producers waiting
            log.exception("ingress thread failed")
        finally:
            # Replies still queued in ZeroMQ get a moment to leave.
            self._release(ctx, sock, mon, auth, linger_ms=1000)

    @staticmethod
    def _release(
        ctx: zmq.Context[Any],
        sock: zmq.Socket[bytes] | None,
        mon: zmq.Socket[bytes] | None,
        auth: Any,
        linger_ms: int = 0,
    ) -> None:
        if sock is not None:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            sock.close(linger=linger_ms)
        if mon is not None:
            mon.close(linger=0)
        if auth is not None:
            auth.stop()
        ctx.term()

    def _loop(self, sock: zmq.Socket[bytes], mon: zmq.Socket[bytes]) -> None:
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        wake_fd = self._wakeup.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        recv = sock.recv_multipart
        while True:
            events = dict(poller.poll(self._retry_gap_ms if self._stalled else 100))
            if wake_fd in events:
                self._wakeup.drain()
            if mon in events:
                try:
                    self._on_monitor(mon)
                except Exception:  # noqa: BLE001 - counting connections is not worth the thread
                    self._internal_failure("monitor", "reading the socket monitor")
            self._safe_pump(sock)
            if self._closing:
                if (not self._chans and not self._stalled) or (
                    time.monotonic() >= self._close_deadline
                ):
                    if self._chans or self._stalled:
                        log.warning(
                            "ingress closing with %d replies never resolved and %d not taken by "
                            "their producers",
                            sum(len(q) for q in self._chans.values()),
                            self._held_replies,
                        )
                    return
                continue
            if sock in events:
                for _ in range(_READ_BURST):
                    try:
                        parts = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._on_message(sock, parts)
                    except Exception:  # noqa: BLE001 - one frame must not stop the ingress
                        self._frame_failed(sock, parts)
                self._safe_pump(sock)

    def _on_monitor(self, mon: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(frames)["event"]
            except Exception:  # noqa: BLE001
                continue
            if event == zmq.EVENT_ACCEPTED:
                self.counters["connections"] += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.counters["disconnections"] += 1
            elif event & _AUTH_FAILURES:
                self.counters["auth_failures"] += 1
                self._warn.warn("auth", "ingress: a producer failed the CURVE handshake")

    # -- failures of our own -----------------------------------------------------------------

    def _internal_failure(self, key: str, what: str) -> None:
        """Count and log (with the traceback, at most once per key per interval) an exception
        raised while ``what``; call from an ``except`` block."""
        self.counters["internal_errors"] += 1
        self._warn.error("internal:" + key, "ingress: internal error while %s", what)

    def _frame_failed(self, sock: zmq.Socket[bytes], parts: list[bytes]) -> None:
        """Handling a frame raised: answer its sender ``internal_error`` and go on."""
        self._internal_failure("frame", "handling a frame")
        self.counters["frame_errors"] += 1
        self.errors[P.E_INTERNAL_ERROR] += 1
        try:
            self._send_frame(
                sock,
                parts[0],
                P.encode_error(
                    P.E_INTERNAL_ERROR,
                    "the backend failed while handling this frame (a bug; logged with its "
                    "traceback); nothing in it was processed",
                ),
            )
        except Exception:  # noqa: BLE001
            self._internal_failure("frame-reply", "answering a frame that failed")

    # -- replies -----------------------------------------------------------------------------

    def _safe_pump(self, sock: zmq.Socket[bytes]) -> None:
        try:
            self._pump(sock)
        except Exception:  # noqa: BLE001 - replies to others must keep flowing
            self._internal_failure("pump", "sending replies")

    def _pump(self, sock: zmq.Socket[bytes]) -> None:
        """Release outcomes that are due, send every producer its replies and re-try the
        producers whose replies ZeroMQ refused."""
        # Cleared before the deque is read: an outcome posted after this point wakes us again.
        self._wake_pending = False
        if self._outcomes:
            self._release_outcomes()
        if self._out:
            self._flush(sock)
        if self._stalled:
            now = time.monotonic()
            if now >= self._next_retry:
                held = self._held_replies
                for ident in list(self._stalled):
                    self._drain_backlog(sock, ident)
                if self._held_replies < held:
                    self._retry_gap_ms = _RETRY_MIN_MS
                else:
                    self._retry_gap_ms = min(2 * self._retry_gap_ms, _RETRY_MAX_MS)
                self._next_retry = now + self._retry_gap_ms / 1000

    def _release_outcomes(self) -> None:
        outcomes = self._outcomes
        chans = self._chans
        out = self._out
        halts = []
        while outcomes:
            rec = outcomes.popleft()
            if type(rec) is not _Rec:
                halts.append(rec[1])
                continue
            q = chans.get(rec.cid)
            if q is None or q[0] is not rec:
                continue  # an earlier message of its channel is still out; released with it
            while q and q[0].status is not None:
                r = q.popleft()
                entry = [r.corr, r.status, r.value]
                lst = out.get(r.ident)
                if lst is None:
                    out[r.ident] = [entry]
                else:
                    lst.append(entry)
            if not q:
                del chans[rec.cid]
        for err in halts:
            q = chans.get(err.channel_id)
            for r in q or ():
                if r.cseq == err.seq and r.status is None:
                    self.counters["halted"] += 1
                    value = _failure_value(err)
                    value["error"] = P.E_HALTED
                    out.setdefault(r.ident, []).append([r.corr, P.HALTED, value])
                    break

    def _flush(self, sock: zmq.Socket[bytes]) -> None:
        out = self._out
        self._out = {}
        c = self.counters
        for ident, entries in out.items():
            try:
                pieces = self._encode_entries(entries)
            except Exception:  # noqa: BLE001 - one producer's failure must not lose the others'
                self._internal_failure("encode", "encoding a producer's replies")
                c["undeliverable"] += 1
                st = self._producers.get(ident)
                if st is not None:
                    st.open -= sum(1 for e in entries if e[1] in _FINALS)
                    self._forget_if_idle(ident, st)
                continue
            self._emit(sock, ident, pieces)

    def _send_entries(self, sock: zmq.Socket[bytes], ident: bytes, entries: list[Any]) -> None:
        """Send ``entries`` to ``ident`` after its backlog; what ZeroMQ refuses joins it."""
        self._emit(sock, ident, self._encode_entries(entries))

    def _encode_entries(self, entries: list[Any]) -> list[tuple[bytes | None, int, int]]:
        """Reply frames of at most :data:`_REPLY_ENTRIES` entries, as backlog pieces."""
        c = self.counters
        pieces: list[tuple[bytes | None, int, int]] = []
        for i in range(0, len(entries), _REPLY_ENTRIES):
            chunk = entries[i : i + _REPLY_ENTRIES]
            finals = 0
            for e in chunk:
                st = e[1]
                if st == P.OK:
                    c["ok"] += 1
                elif st == P.FAILED:
                    c["failed"] += 1
                elif st == P.CLOSED:
                    c["closed"] += 1
                elif st == P.IN_DOUBT:
                    c["in_doubt"] += 1
                else:
                    continue
                finals += 1
            try:
                frame = P.encode_replies(chunk)
            except Exception:  # noqa: BLE001 - one unencodable value must not lose the others
                frame = P.encode_replies([_encodable(e) for e in chunk])
            pieces.append((frame, finals, len(chunk) - finals))
            c["replies"] += len(chunk)
            c["reply_frames"] += 1
        return pieces

    def _send_frame(self, sock: zmq.Socket[bytes], ident: bytes, frame: bytes) -> None:
        """Send one HELLO answer or ERROR to ``ident`` (after its backlog)."""
        self._emit(sock, ident, [(frame, 0, 1)])

    def _emit(
        self, sock: zmq.Socket[bytes], ident: bytes, pieces: list[tuple[bytes | None, int, int]]
    ) -> None:
        st = self._producers.get(ident)
        if st is not None and st.backlog:
            self._enqueue(ident, st, pieces, 0)
            self._drain_backlog(sock, ident)
            return
        for k, (frame, finals, _others) in enumerate(pieces):
            sent = self._try_send(sock, ident, frame)  # type: ignore[arg-type]
            if sent is None:
                if st is None:
                    st = self._producers[ident] = _Producer()
                self._enqueue(ident, st, pieces, k)
                return
            if st is not None:
                st.open -= finals
            if not sent:
                self._gone(ident, pieces[k + 1 :])
                break
        if st is not None:
            self._forget_if_idle(ident, st)

    def _enqueue(
        self,
        ident: bytes,
        st: _Producer,
        pieces: list[tuple[bytes | None, int, int]],
        start: int,
    ) -> None:
        if not st.backlog and start < len(pieces):
            # Newly stalled: try again soon, whatever producers that never read made the gap.
            self._retry_gap_ms = _RETRY_MIN_MS
            self._next_retry = min(self._next_retry, time.monotonic() + _RETRY_MIN_MS / 1000)
        for k in range(start, len(pieces)):
            piece = pieces[k]
            st.backlog.append(piece)
            st.queued += piece[2]
            st.held += piece[1] + piece[2]
            self._held_replies += piece[1] + piece[2]
        if st.backlog:
            self._stalled.add(ident)

    def _drain_backlog(self, sock: zmq.Socket[bytes], ident: bytes) -> None:
        """Send what ZeroMQ takes of ``ident``'s backlog, in order."""
        st = self._producers.get(ident)
        if st is None:
            self._stalled.discard(ident)
            return
        backlog = st.backlog
        while backlog:
            queued, finals, others = backlog[0]
            marker = queued is None
            if queued is not None:
                frame = queued
            else:
                frame = P.encode_error(
                    P.E_TOO_MANY_PENDING,
                    f"{st.refused_frames} frames ({st.refused_messages} messages) were refused "
                    f"whole: this producer held more than {self.settings.max_pending_per_producer}"
                    " unanswered messages and unread replies (ingress.max_pending_per_producer) "
                    "and did not read its replies",
                    frames=st.refused_frames,
                    messages=st.refused_messages,
                )
            sent = self._try_send(sock, ident, frame)
            if sent is None:
                return
            backlog.popleft()
            if marker:
                st.refused_frames = st.refused_messages = 0  # the coalesced ERROR went out
            st.open -= finals
            st.queued -= others
            st.held -= finals + others
            self._held_replies -= finals + others
            if not sent:
                self._gone(ident, [])
                return
        self._stalled.discard(ident)
        self._forget_if_idle(ident, st)

    def _try_send(self, sock: zmq.Socket[bytes], ident: bytes, frame: bytes) -> bool | None:
        """True: ZeroMQ took the frame. None: the producer's pipe is full (it does not read).
        False: the producer is gone (nobody to tell; counted)."""
        try:
            sock.send_multipart((ident, frame), zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.counters["stalled_sends"] += 1
            return None
        except zmq.ZMQError as exc:
            self.counters["undeliverable"] += 1
            if exc.errno == zmq.EHOSTUNREACH:
                self._warn.warn("gone", "ingress: a producer left before its replies were sent")
            else:
                self._internal_failure("send", "sending a reply frame (dropped)")
            return False

    def _gone(self, ident: bytes, rest: list[tuple[bytes | None, int, int]]) -> None:
        """``ident`` disconnected: drop its backlog and ``rest``; its state lives on only while
        messages of it are still being processed (their replies are dropped as they come)."""
        self._known.discard(ident)
        st = self._producers.get(ident)
        if st is None:
            return
        for _frame, finals, _others in list(st.backlog) + rest:
            st.open -= finals
            self.counters["undeliverable"] += 1
        self._held_replies -= st.held
        st.backlog.clear()
        st.queued = st.held = st.refused_frames = st.refused_messages = 0
        self._stalled.discard(ident)
        self._forget_if_idle(ident, st)

    def _forget_if_idle(self, ident: bytes, st: _Producer) -> None:
        if st.open <= 0 and not st.backlog and ident != self._current:
            self._producers.pop(ident, None)

    def _reject(self, ident: bytes, corr: Any, code: str, message: str, index: int) -> None:
        self.counters["rejected"] += 1
        self.errors[code] += 1
        if code not in (P.E_SHUTTING_DOWN, P.E_DRAINING):
            self._warn.warn(code, "ingress: rejected a message: %s", message)
        entry = [corr, P.REJECTED, {"error": code, "message": message, "index": index}]
        lst = self._out.get(ident)
        if lst is None:
            self._out[ident] = [entry]
        else:
            lst.append(entry)

    def _frame_error(self, sock: zmq.Socket[bytes], ident: bytes, code: str, message: str) -> None:
        self.counters["frame_errors"] += 1
        self.errors[code] += 1
        self._warn.warn(code, "ingress: rejected a frame: %s", message)
        # Order: replies already due to this producer go out before the error.
        lst = self._out.pop(ident, None)
        if lst:
            self._send_entries(sock, ident, lst)
        self._send_frame(sock, ident, P.encode_error(code, message))

    def _refusing(self, ident: bytes) -> _Producer | None:
        """The producer's state if its frames are to be refused whole: it is at its bound and
        does not even take its replies (ZeroMQ refused some), so answering each item would only
        grow its backlog."""
        st = self._producers.get(ident)
        if st is not None and st.backlog and st.pending >= self.settings.max_pending_per_producer:
            return st
        return None

    def _refuse(self, ident: bytes, st: _Producer, messages: int) -> None:
        """Refuse one frame whole: counted into the one ERROR that waits in the backlog."""
        if st.refused_frames == 0:
            st.backlog.append((None, 0, 0))  # where the coalesced ERROR goes out
        st.refused_frames += 1
        st.refused_messages += messages
        c = self.counters
        c["frame_errors"] += 1
        c["refused_frames"] += 1
        c["refused_messages"] += messages
        self._warn.warn(
            "refused",
            "ingress: refused a frame of %d messages whole: its producer holds %d unanswered "
            "messages and unread replies (ingress.max_pending_per_producer = %d) and reads none",
            messages,
            st.pending,
            self.settings.max_pending_per_producer,
        )

    # -- requests ----------------------------------------------------------------------------

    def _on_message(self, sock: zmq.Socket[bytes], parts: list[bytes]) -> None:
        ident = parts[0]
        self.counters["frames"] += 1
        if len(parts) != 2:
            st = self._refusing(ident)
            if st is not None:
                self._refuse(ident, st, 0)
                return
            self._frame_error(
                sock, ident, P.E_BAD_FRAME, f"a message must be one frame, got {len(parts) - 1}"
            )
            return
        frame = parts[1]
        self.counters["bytes"] += len(frame)
        if ident not in self._known:
            producers = self.counters["connections"] - self.counters["disconnections"]
            if producers > self.settings.max_producers:
                self._frame_error(
                    sock,
                    ident,
                    P.E_TOO_MANY_PRODUCERS,
                    f"{producers} producers connected, at most {self.settings.max_producers} "
                    "(ingress.max_producers)",
                )
                return
            if len(self._known) > 2 * self.settings.max_producers:
                self._known.clear()  # forget departed producers; live ones are re-admitted
            self._known.add(ident)
        try:
            kind, body = P.decode(frame, self.settings.max_items)
        except P.FrameError as exc:
            st = self._refusing(ident)
            if st is not None:
                self._refuse(ident, st, 0)
                return
            self._frame_error(sock, ident, exc.code, exc.message)
            return
        st = self._refusing(ident)
        if st is not None:
            self._refuse(ident, st, len(body) if kind == P.SUBMIT else 0)
            return
        if kind == P.HELLO:
            # A barrier: everything already due goes out first.
            self._safe_pump(sock)
            info = {**self._info, "accepting": self.accepting}
            try:
                reply = P.encode_hello_reply(body, info)
            except Exception:  # noqa: BLE001 - an unencodable token is the sender's problem
                reply = P.encode_hello_reply(None, info)
            self._send_frame(sock, ident, reply)
            return
        st = self._producers.get(ident)
        if st is None:
            st = self._producers[ident] = _Producer()
        # Pinned while its items are submitted: replies sent meanwhile (backpressure waits pump
        # them) must not forget a state this frame is still adding to.
        self._current = ident
        try:
            self._submit_items(sock, ident, st, body)
        finally:
            self._current = None
            self._forget_if_idle(ident, st)

    def _submit_items(
        self, sock: zmq.Socket[bytes], ident: bytes, st: _Producer, items: list[Any]
    ) -> None:
        max_bytes = self.settings.max_message_bytes
        limit = self.settings.max_pending_per_producer
        # Room at the start of the frame: replies sent while it is submitted only add to it.
        room = limit - st.open - st.queued
        chans = self._chans
        counters = self.counters
        counters["messages"] += len(items)
        accepted = 0
        try:
            for index, item in enumerate(items):
                try:
                    if type(item) is not list or len(item) != 3:
                        corr = None
                        if type(item) is list and item and _valid_corr(item[0]):
                            corr = item[0]
                        self._reject(
                            ident,
                            corr,
                            P.E_BAD_ITEM,
                            f"item {index} must be an array [corr, channel_id, payload], got "
                            f"{P.describe(item)}",
                            index,
                        )
                        continue
                    corr, cid, payload = item
                    if not _valid_corr(corr):
                        self._reject(
                            ident,
                            None,
                            P.E_BAD_CORR,
                            f"item {index}: correlation id must be an unsigned integer below "
                            f"2**64, got {P.describe(corr)}",
                            index,
                        )
                        continue
                    if type(cid) is not bytes:
                        self._reject(
                            ident,
                            corr,
                            P.E_BAD_CHANNEL_ID,
                            f"item {index}: channel id must be a byte string, got "
                            f"{P.describe(cid)}",
                            index,
                        )
                        continue
                    n = len(cid)
                    if n == 0:
                        self._reject(
                            ident,
                            corr,
                            P.E_EMPTY_CHANNEL_ID,
                            f"item {index}: empty channel id",
                            index,
                        )
                        continue
                    if n > MAX_CHANNEL_ID_BYTES:
                        self._reject(
                            ident,
                            corr,
                            P.E_CHANNEL_ID_TOO_LONG,
                            f"item {index}: channel id is {n} bytes, at most "
                            f"{MAX_CHANNEL_ID_BYTES}",
                            index,
                        )
                        continue
                    if type(payload) is not bytes:
                        self._reject(
                            ident,
                            corr,
                            P.E_BAD_PAYLOAD,
                            f"item {index}: payload must be a byte string, got "
                            f"{P.describe(payload)}",
                            index,
                        )
                        continue
                    if len(payload) > max_bytes:
                        self._reject(
                            ident,
                            corr,
                            P.E_PAYLOAD_TOO_LARGE,
                            f"item {index}: payload is {len(payload)} bytes, over "
                            f"transport.max_message_bytes = {max_bytes}",
                            index,
                        )
                        continue
                    if accepted >= room:
                        self._reject(
                            ident,
                            corr,
                            P.E_TOO_MANY_PENDING,
                            f"item {index}: this producer holds {limit} or more unanswered "
                            f"messages and unread replies, at most {limit} "
                            "(ingress.max_pending_per_producer); read replies before sending more",
                            index,
                        )
                        continue
                    rec = _Rec(self, ident, corr, cid)
                    if not self._submit_one(sock, rec, payload, index):
                        continue
                except Exception:  # noqa: BLE001 - one item must not stop the ingress or its frame
                    self._item_failed(ident, item, index)
                    continue
                accepted += 1
                q = chans.get(cid)
                if q is None:
                    chans[cid] = collections.deque((rec,))
                else:
                    q.append(rec)
        finally:
            # Counted once per frame (cheaper than per item); kept if an item raised.
            st.open += accepted
            counters["accepted"] += accepted

    def _item_failed(self, ident: bytes, item: Any, index: int) -> None:
        """Checking or submitting one item raised (a bug): answer it ``internal_error``."""
        self._internal_failure("item", "handling one item of a frame")
        corr = item[0] if type(item) is list and item and _valid_corr(item[0]) else None
        self._reject(
            ident,
            corr,
            P.E_INTERNAL_ERROR,
            f"item {index}: the backend failed while handling this item (a bug; logged with its "
            "traceback); it was not accepted",
            index,
        )

    def _submit_one(self, sock: zmq.Socket[bytes], rec: _Rec, payload: bytes, index: int) -> bool:
        """Submit one checked message without blocking the socket's owner; True if accepted
        (``rec.cseq`` set), False if it was answered with a rejection instead."""
        submit = self._submit
        while True:
            reason = self._intake_reason
            if reason is not None:
                text = (
                    "the backend is shutting down"
                    if reason == P.E_SHUTTING_DOWN
                    else "the backend is draining and accepts no new messages"
                )
                self._reject(rec.ident, rec.corr, reason, text, index)
                return False
            try:
                rec.cseq = submit(rec.cid, payload, block=False, on_done=rec)
                return True
            except BlockingIOError:
                # The worker's window is full: stop reading (the socket's queue then fills and
                # ZeroMQ pushes back on producers) and keep replies flowing until there is room.
                self.counters["backpressure_waits"] += 1
                self._wait_room(sock)
            except PoolBroken as exc:
                self._reject(
                    rec.ident,
                    rec.corr,
                    P.E_POOL_BROKEN,
                    f"the pool is broken: {P.exc_text(exc)}",
                    index,
                )
                return False
            except PoolClosed:
                self._reject(
                    rec.ident, rec.corr, P.E_SHUTTING_DOWN, "the backend is shutting down", index
                )
                return False
            except InputError as exc:  # checked by the caller already; kept as a safety net
                self._reject(
                    rec.ident, rec.corr, P.E_BAD_ITEM, f"item {index}: {P.exc_text(exc)}", index
                )
                return False

    def _wait_room(self, sock: zmq.Socket[bytes]) -> None:
        """Block up to :data:`_ROOM_WAIT_S` for an outcome (acknowledgements free window room),
        sending whatever replies are due meanwhile."""
        self._safe_pump(sock)
        self._wakeup.wait(_ROOM_WAIT_S)
        self._safe_pump(sock)


_FINALS = frozenset({P.OK, P.FAILED, P.CLOSED, P.IN_DOUBT})  # final replies to accepted messages


def _valid_corr(corr: Any) -> bool:
    return type(corr) is int and 0 <= corr <= P.MAX_CORR


def _safe_repr(exc: BaseException) -> str:
    # Runs on the pool's I/O thread, which must not raise: an exception's repr can.
    try:
        return repr(exc)
    except Exception:  # noqa: BLE001
        return type(exc).__name__


def _encodable(entry: list[Any]) -> list[Any]:
    try:
        P.encode_replies([entry])
        return entry
    except Exception as exc:  # noqa: BLE001
        return [
            entry[0],
            P.FAILED,
            {"error": P.E_HANDLER_FAILED, "message": f"result not encodable: {P.exc_text(exc)}"},
        ]
