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
:data:`LOG_INTERVAL_S`; it never raises out of the loop, so no frame can stop or stall the ingress.
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
    rcvhwm: int = 1000  # frames queued per producer before ZeroMQ pushes back on it

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
            self.value = {"error": P.E_HANDLER_FAILED, "message": repr(error)}
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
    """At most one warning per key per interval, with a count of what was held back."""

    def __init__(self, logger: logging.Logger, interval_s: float) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, key: str, message: str, *args: Any) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._held[key] = self._held.get(key, 0) + 1
            return
        held = self._held.pop(key, 0)
        self._last[key] = now
        suffix = f" ({held} more like it in the last {now - last:.0f} s)" if held and last else ""
        self._log.warning(message + suffix, *args)


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
            sock.router_mandatory = 1  # a reply to a vanished producer raises instead of vanishing
            sock.sndhwm = 0  # replies are bounded by what producers sent; never drop one
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
            events = dict(poller.poll(100))
            if wake_fd in events:
                self._wakeup.drain()
            if mon in events:
                self._on_monitor(mon)
            self._pump(sock)
            if self._closing:
                if not self._chans or time.monotonic() >= self._close_deadline:
                    if self._chans:
                        log.warning(
                            "ingress closing with %d replies never resolved",
                            sum(len(q) for q in self._chans.values()),
                        )
                    return
                continue
            if sock in events:
                for _ in range(_READ_BURST):
                    try:
                        parts = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._on_message(sock, parts)
                self._pump(sock)

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

    # -- replies -----------------------------------------------------------------------------

    def _pump(self, sock: zmq.Socket[bytes]) -> None:
        """Release outcomes that are due and send every producer its replies."""
        # Cleared before the deque is read: an outcome posted after this point wakes us again.
        self._wake_pending = False
        if self._outcomes:
            self._release_outcomes()
        if self._out:
            self._flush(sock)

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
            for e in entries:
                st = e[1]
                if st == P.OK:
                    c["ok"] += 1
                elif st == P.FAILED:
                    c["failed"] += 1
                elif st == P.CLOSED:
                    c["closed"] += 1
                elif st == P.IN_DOUBT:
                    c["in_doubt"] += 1
            try:
                frame = P.encode_replies(entries)
            except Exception:  # noqa: BLE001 - one unencodable value must not lose the others
                frame = P.encode_replies([_encodable(e) for e in entries])
            self._send(sock, ident, frame)
            c["replies"] += len(entries)
            c["reply_frames"] += 1

    def _send(self, sock: zmq.Socket[bytes], ident: bytes, frame: bytes) -> None:
        try:
            sock.send_multipart((ident, frame), copy=False)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # The producer disconnected before its replies were ready: nobody to tell.
            self.counters["undeliverable"] += 1
            self._known.discard(ident)
            self._warn.warn("gone", "ingress: a producer left before its replies were sent")

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
            self._out[ident] = lst
            self._flush(sock)
        self._send(sock, ident, P.encode_error(code, message))

    # -- requests ----------------------------------------------------------------------------

    def _on_message(self, sock: zmq.Socket[bytes], parts: list[bytes]) -> None:
        ident = parts[0]
        self.counters["frames"] += 1
        if len(parts) != 2:
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
            self._frame_error(sock, ident, exc.code, exc.message)
            return
        if kind == P.HELLO:
            # A barrier: everything already due goes out first.
            self._pump(sock)
            info = {**self._info, "accepting": self.accepting}
            try:
                reply = P.encode_hello_reply(body, info)
            except Exception:  # noqa: BLE001 - an unencodable token is the sender's problem
                reply = P.encode_hello_reply(None, info)
            self._send(sock, ident, reply)
            return
        self._submit_items(sock, ident, body)

    def _submit_items(self, sock: zmq.Socket[bytes], ident: bytes, items: list[Any]) -> None:
        max_bytes = self.settings.max_message_bytes
        chans = self._chans
        counters = self.counters
        counters["messages"] += len(items)
        accepted = 0
        for index, item in enumerate(items):
            if type(item) is not list or len(item) != 3:
                corr = None
                if type(item) is list and item and _valid_corr(item[0]):
                    corr = item[0]
                self._reject(
                    ident,
                    corr,
                    P.E_BAD_ITEM,
                    f"item {index} must be an array [corr, channel_id, payload], got "
                    f"{_describe(item)}",
                    index,
                )
                continue
            corr, cid, payload = item
            if not _valid_corr(corr):
                self._reject(
                    ident,
                    None,
                    P.E_BAD_CORR,
                    f"item {index}: correlation id must be an unsigned integer below 2**64, got "
                    f"{_describe(corr)}",
                    index,
                )
                continue
            if type(cid) is not bytes:
                self._reject(
                    ident,
                    corr,
                    P.E_BAD_CHANNEL_ID,
                    f"item {index}: channel id must be a byte string, got {_describe(cid)}",
                    index,
                )
                continue
            n = len(cid)
            if n == 0:
                self._reject(
                    ident, corr, P.E_EMPTY_CHANNEL_ID, f"item {index}: empty channel id", index
                )
                continue
            if n > MAX_CHANNEL_ID_BYTES:
                self._reject(
                    ident,
                    corr,
                    P.E_CHANNEL_ID_TOO_LONG,
                    f"item {index}: channel id is {n} bytes, at most {MAX_CHANNEL_ID_BYTES}",
                    index,
                )
                continue
            if type(payload) is not bytes:
                self._reject(
                    ident,
                    corr,
                    P.E_BAD_PAYLOAD,
                    f"item {index}: payload must be a byte string, got {_describe(payload)}",
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
            rec = _Rec(self, ident, corr, cid)
            if not self._submit_one(sock, rec, payload, index):
                continue
            accepted += 1
            q = chans.get(cid)
            if q is None:
                chans[cid] = collections.deque((rec,))
            else:
                q.append(rec)
        counters["accepted"] += accepted

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
                    rec.ident, rec.corr, P.E_POOL_BROKEN, f"the pool is broken: {exc}", index
                )
                return False
            except PoolClosed:
                self._reject(
                    rec.ident, rec.corr, P.E_SHUTTING_DOWN, "the backend is shutting down", index
                )
                return False
            except InputError as exc:  # checked by the caller already; kept as a safety net
                self._reject(rec.ident, rec.corr, P.E_BAD_ITEM, f"item {index}: {exc}", index)
                return False

    def _wait_room(self, sock: zmq.Socket[bytes]) -> None:
        """Block up to :data:`_ROOM_WAIT_S` for an outcome (acknowledgements free window room),
        sending whatever replies are due meanwhile."""
        self._pump(sock)
        self._wakeup.wait(_ROOM_WAIT_S)
        self._pump(sock)


def _valid_corr(corr: Any) -> bool:
    return type(corr) is int and 0 <= corr <= P.MAX_CORR


def _describe(value: Any) -> str:
    """A short description of a bad value for an error message (never its full contents)."""
    if isinstance(value, (bytes, str, list, dict)):
        return f"{type(value).__name__} of length {len(value)}"
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def _encodable(entry: list[Any]) -> list[Any]:
    try:
        P.encode_replies([entry])
        return entry
    except Exception as exc:  # noqa: BLE001
        return [
            entry[0],
            P.FAILED,
            {"error": P.E_HANDLER_FAILED, "message": f"result not encodable: {exc}"},
        ]
