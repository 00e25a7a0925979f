"""The control socket of ``shardpool run`` and its clients: ``status``, ``drain``, ``undrain``,
``stop``, and the placement operations (``move``, ``pin``, ``unpin``, ``resize``).

Wire format (one CBOR frame each way, DEALER → ROUTER)::

    request  [1, op, args]            op: one of :data:`OPS`; args: a map (below)
    reply    [1, ok, payload]         ok: true → payload is the answer;
                                      false → {"error": text} (+ "code": "bad_request" when the
                                      request itself was wrong: :class:`BadRequest`)

* ``ping``   → ``{"pid", "version", "state", "intake", "ingress", "control", "metrics",
  "workers"}``: the readiness handshake (the socket is bound only once the pool, the ingress
  and the metrics are up).
* ``status`` → a snapshot (see :meth:`shardpool.service.Service.snapshot`), ``placement``
  included.
* ``placement`` → the pool's placement alone (:meth:`shardpool.ShardPool.placement`: slots per
  worker, pins, moves, resize, levelling), answered at once without asking the workers.
* ``drain``  → stop intake, finish every accepted message (``args["timeout"]`` seconds at most),
  then answer ``{"drained": bool, "pending": n}``; the backend stays up (status keeps working,
  producers are answered ``draining``) until it is stopped or undrained.
* ``undrain`` → reopen intake after a ``drain`` (a drain still waiting is called off: its answer
  is an error saying so); the demo load, if any, starts again. ``{"intake": "open", "was":
  state}`` (``was`` ``running``: intake was open already); an error once shutting down.
* ``stop``   → answered at once with ``{"stopping": true, "pid": n}``; the backend then shuts down
  as on SIGTERM.
  With ``{"wait": true}`` (``shardpool stop``) it is answered at the end of the shutdown instead,
  with ``{"stopped": true, "pid": n, "exit_code": 0|1}`` — the code the backend then exits with.
* ``resume`` / ``skip`` → ``{op: channel hex}`` once the halted channel's failed message is
  retried / recorded as skipped; an error when the channel is not halted.
* ``move`` ``{"slots": [int, ...], "worker": int, "timeout"?: s}`` → once the move has ended,
  ``{"gen", "slots", "src", "dst", "state", "pause_s"}`` (``state`` ``"committed"``, or still in
  progress when ``timeout`` ran out); an error when it could not start or was called off.
* ``pin`` ``{"channel": hex, "worker"?: int, "timeout"?: s}`` (no worker: the least loaded other
  one) / ``unpin`` ``{"channel": hex, "timeout"?: s}`` → ``{"channel", "worker", "moved", "gen",
  "state", "pause_s"}`` (``moved`` false: it was on that worker already).
* ``resize`` ``{"workers": n, "timeout"?: s, "wait"?: bool}`` → once done, ``{"done": true,
  "workers": n, "seconds": s}``; ``{"done": false, ...}`` when ``timeout`` passed first (the
  resize goes on); with ``wait`` false, ``{"started": true, ...}`` at once.
* ``roll`` ``{"timeout"?: s, "wait"?: bool}`` → every worker replaced by a fresh process, one at a
  time (a rolling restart through slot moves), once done ``{"done": true, "workers": n,
  "pids": [...], "seconds": s}``; ``{"done": false, ...}`` when ``timeout`` passed first (it goes
  on); with ``wait`` false, ``{"started": true, ...}`` at once; an error if it was refused (a roll
  or resize under way) or called off.
* ``dead-letters`` ``{"action": "list", "channel"?: hex, "ids"?: [int], "limit"?: n}`` →
  ``{"entries": [{"id", "time", "channel", "seq", "payload", "error_type", "error",
  "action"}], "count", "dropped", "write_errors", "path"}``; ``{"action": "replay", "channel"?,
  "ids"?, "timeout"?: s}`` → once answered, ``{"submitted", "replayed", "failed", "pending",
  "errors"}``; ``{"action": "purge", "channel": hex}`` or ``{"action": "purge", "all": true}`` →
  ``{"purged": n}``. An error when ``[deadletters]`` is off (see :mod:`shardpool.deadletters`).

A bad slot, worker, channel id or count is answered with a :class:`BadRequest` error naming the
value and what is allowed; a move the pool refuses or calls off with an error saying why.

:func:`encode_request`, :func:`decode_request`, :func:`encode_reply` and :func:`decode_reply` are
the only code that builds or reads these frames (server and client both use them).

A request that takes time (drain on the main thread; move, pin, unpin and resize on a thread of
their own) is answered later; the server thread keeps answering others meanwhile, which is why
this is a ROUTER and not a REP socket.

A client learns at once that no backend runs: a missing ipc socket file, or one whose
``<socket>.lock`` is held by nobody (the backend that wrote its pid there is gone:
:func:`stale_backend`), answers :class:`NotRunning` without waiting; a backend that dies while a
request waits (``drain`` may take a long time) is noticed through the connection closing (or
ZeroMQ heartbeats going unanswered for :data:`HEARTBEAT_TIMEOUT_MS` on tcp).
:class:`ConnectionWatch` follows a DEALER's connection for this client and for the producer
clients of :mod:`shardpool.client`.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import cbor2
import zmq
from zmq.utils.monitor import parse_monitor_message

from .errors import ControlError, NotRunning
from .security import ipc_path, secure_socket_file
from .wakeup import WakePipe

log = logging.getLogger("shardpool.control")

__all__ = [
    "BAD_REQUEST",
    "BadRequest",
    "ConnectionWatch",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "NotRunning",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "stale_backend",
]

VERSION = 1
OPS = (
    "ping",
    "status",
    "placement",
    "drain",
    "undrain",
    "stop",
    "resume",
    "skip",
    "move",
    "pin",
    "unpin",
    "resize",
    "roll",
    "dead-letters",
)
"""Every op a backend answers; any other is answered with an error naming these."""
BAD_REQUEST = "bad_request"
"""The ``code`` of an error reply to a request that was itself wrong (see :class:`BadRequest`)."""


class BadRequest(ControlError):
    """The backend refused a control request as wrong in itself: a slot, worker, channel id or
    worker count that is malformed or names nothing there (the caller's input, as opposed to an
    operation that could not be carried out)."""

Respond = Callable[[bool, Any], None]
Handler = Callable[[str, dict[str, Any], Respond], None]


# ------------------------------------------------------------------------------------ wire format


def encode_request(op: str, args: Mapping[str, Any] | None = None) -> bytes:
    """The request frame ``[1, op, args]``."""
    return cbor2.dumps([VERSION, op, dict(args or {})])


def decode_request(frame: bytes) -> tuple[str, dict[str, Any]]:
    """``(op, args)`` of a request frame.

    Raises:
        ValueError: not CBOR, or not ``[1, op: str, args: map]``.
    """
    try:
        msg = cbor2.loads(frame)
    except cbor2.CBORError as exc:
        raise ValueError(f"not CBOR: {exc}") from exc
    if type(msg) is not list or len(msg) != 3 or msg[0] != VERSION:
        raise ValueError("a request must be [1, op, args]")
    _, op, args = msg
    if not isinstance(op, str) or not isinstance(args, dict):
        raise ValueError("op must be a string and args a map")
    return op, args


def encode_reply(ok: bool, payload: Any) -> bytes:
    """The reply frame ``[1, ok, payload]``; a payload CBOR cannot encode becomes an error reply
    naming why (never raises for the payload)."""
    try:
        return cbor2.dumps([VERSION, ok, payload])
    except Exception as exc:  # noqa: BLE001 - the asking client must still get an answer
        return cbor2.dumps([VERSION, False, {"error": f"unencodable reply: {exc}"}])


def decode_reply(frame: bytes) -> Any:
    """The payload of a reply frame whose ``ok`` is true.

    Raises:
        BadRequest: ``ok`` is false and the error's code is :data:`BAD_REQUEST`.
        ControlError: ``ok`` is false otherwise (the text of its ``error``), or the frame is not
            a reply ``[1, ok, payload]`` at all.
    """
    try:
        msg = cbor2.loads(frame)
    except cbor2.CBORError as exc:
        raise ControlError(f"unreadable control reply: {exc}") from exc
    if type(msg) is not list or len(msg) != 3 or msg[0] != VERSION:
        raise ControlError(f"malformed control reply: {msg!r:.200}")
    _, ok, payload = msg
    if not ok:
        if not isinstance(payload, dict):
            raise ControlError(str(payload))
        error = str(payload.get("error", payload))
        raise BadRequest(error) if payload.get("code") == BAD_REQUEST else ControlError(error)
    return payload


# Heartbeats on client connections (ms): a backend whose host or process froze without closing
# the connection (tcp) is declared gone after HEARTBEAT_TIMEOUT_MS without any traffic; a closed
# connection (a process that died, on ipc or tcp) is seen at once. The TTL asks the backend to
# drop the connection of a client silent that long (it frees what it held for it).
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
HEARTBEAT_TTL_MS = 10_000


def apply_heartbeats(sock: zmq.Socket[Any]) -> None:
    """Turn on ZMTP heartbeats on a client socket (before it connects)."""
    sock.heartbeat_ivl = HEARTBEAT_IVL_MS
    sock.heartbeat_timeout = HEARTBEAT_TIMEOUT_MS
    sock.heartbeat_ttl = HEARTBEAT_TTL_MS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def stale_backend(endpoint: str) -> str | None:
    """Why no backend can be listening on ``endpoint`` although its socket file exists, or None
    when one may be (or the endpoint is not ipc, or its socket file is missing).

    ``shardpool run`` holds an ``flock`` on ``<socket>.lock`` (which holds its pid) while the
    socket is bound; a backend that was killed leaves the socket file behind with nobody holding
    the lock. The pid is checked first, so the lock is only probed (a shared lock taken and
    dropped at once) when that pid is gone.
    """
    path = ipc_path(endpoint)
    if path is None or not path.exists():
        return None
    lock = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: not a socket of shardpool run; nothing to say
    try:
        text = os.read(fd, 32).decode(errors="replace").strip()
        pid = int(text) if text.isdigit() else None
        if pid is not None and _pid_alive(pid):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return None  # held: a backend is there (one starting has not written its pid yet)
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    named = f"pid {pid}" if pid is not None else "no pid"
    return (
        f"no shardpool backend at {endpoint}: its socket file is left from a backend that did "
        f"not shut down cleanly ({lock} names {named}, which is gone); start `shardpool run`"
    )


class ConnectionWatch:
    """Follows one client socket's connection through a ZeroMQ socket monitor.

    ``events()`` reads what the monitor has and returns how many disconnections it saw;
    ``connected`` is the state after them and ``down_since`` (``time.monotonic()`` seconds) when
    the connection was last lost and not re-made (None while connected or before the first
    connection). Create it before the socket connects; call :meth:`close` before the socket.
    """

    EVENTS = (
        zmq.EVENT_CONNECTED
        | zmq.EVENT_CONNECT_RETRIED
        | zmq.EVENT_DISCONNECTED
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )
    _REFUSALS: dict[int, str] = {
        zmq.EVENT_HANDSHAKE_FAILED_AUTH: "its CURVE key is not authorised",
        zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "the security handshake failed",
        zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "the security handshake failed",
    }

    def __init__(self, sock: zmq.Socket[Any]) -> None:
        self._sock = sock
        self.monitor: zmq.Socket[Any] = sock.get_monitor_socket(self.EVENTS)
        self.connected = False
        self.ever_connected = False
        self.down_since: float | None = None
        self.refused: str | None = None  # why the backend refused the handshake, if it did
        # A connection attempt failed (refused: nothing listens there) and will be retried.
        self.retried = False

    def feed(self, frames: list[bytes]) -> bool:
        """Take one monitor message; True if it was a disconnection."""
        try:
            event = parse_monitor_message(frames)["event"]
        except Exception:  # noqa: BLE001 - a monitor message we cannot read changes nothing
            return False
        if event == zmq.EVENT_CONNECTED:
            self.connected = self.ever_connected = True
            self.down_since = None
            return False
        if event == zmq.EVENT_CONNECT_RETRIED:
            self.retried = True
            return False
        if event == zmq.EVENT_DISCONNECTED:
            self.connected = False
            self.down_since = time.monotonic()
            return True
        if event in self._REFUSALS:
            self.refused = self._REFUSALS[event]
        return False

    def events(self) -> int:
        """Read every event waiting (never blocks); the number of disconnections among them."""
        lost = 0
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return lost
            lost += self.feed(frames)

    def close(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self.monitor.close(linger=0)


# ---------------------------------------------------------------------------------------- server


class ControlServer:
    """A ROUTER socket on ``endpoint`` served by its own thread.

    ``handler(op, args, respond)`` runs on the server thread; it must call ``respond(ok,
    payload)`` exactly once, from any thread, now or later.
    """

    def __init__(self, endpoint: str, handler: Handler) -> None:
        self.endpoint = endpoint
        self._handler = handler
        self._replies: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._wakeup = WakePipe()
        self._stop = False
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="shardpool-control", daemon=True)

    def start(self, timeout: float = 10.0) -> str:
        """Bind in the server thread; return the bound endpoint.

        Raises:
            zmq.ZMQError: cannot bind. TimeoutError: the thread did not report in time.
        """
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"control socket did not bind {self.endpoint} in {timeout} s")
        if self._error is not None:
            self._thread.join(5.0)
            self._wakeup.close()
            raise self._error
        return self.endpoint

    def close(self) -> None:
        """Send replies already due, close the socket, join the thread. Idempotent."""
        if self._thread.is_alive():
            self._stop = True
            self._wakeup.wake()
            self._thread.join(5.0)
        self._wakeup.close()

    def _main(self) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 500
        sock.router_mandatory = 1
        sock.maxmsgsize = 1 << 20  # requests are tiny; anything larger is not a client of ours
        try:
            sock.bind(self.endpoint)
            secure_socket_file(self.endpoint)
            self.endpoint = str(sock.get_string(zmq.LAST_ENDPOINT))
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
            sock.close(linger=0)
            ctx.term()
            self._started.set()
            return
        self._started.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        wake_fd = self._wakeup.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        try:
            while not self._stop:
                events = dict(poller.poll(500))
                if wake_fd in events:
                    self._wakeup.drain()
                self._send_replies(sock)
                if sock in events:
                    while True:
                        try:
                            parts = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_request(parts)
                    self._send_replies(sock)
            self._send_replies(sock)
        except BaseException:  # noqa: BLE001
            log.exception("control thread failed")
        finally:
            sock.close()
            ctx.term()

    def _send_replies(self, sock: zmq.Socket[bytes]) -> None:
        while self._replies:
            ident, frame = self._replies.popleft()
            try:
                sock.send_multipart((ident, frame))
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                # The asking client gave up (e.g. Ctrl-C on `shardpool drain`).

    def _on_request(self, parts: list[bytes]) -> None:
        ident = parts[0]
        answered = False

        def respond(ok: bool, payload: Any) -> None:
            nonlocal answered
            if answered:
                return
            answered = True
            self._replies.append((ident, encode_reply(ok, payload)))
            if threading.current_thread() is not self._thread:
                self._wakeup.wake()

        try:
            if len(parts) != 2:
                raise ValueError("a request must be one frame")
            op, args = decode_request(parts[1])
        except Exception as exc:  # noqa: BLE001 - a bad request gets an error, nothing more
            respond(False, {"error": f"bad control request: {exc}"})
            return
        try:
            self._handler(op, args, respond)
        except Exception as exc:  # noqa: BLE001
            log.exception("control request %r failed", op)
            respond(False, {"error": f"{op} failed: {exc!r}"})


# ---------------------------------------------------------------------------------------- client


class ControlClient:
    """Talks to a backend's control socket. One request at a time; not thread-safe.

    Args:
        endpoint: the control endpoint (see :func:`shardpool.security.resolve_endpoints`).
        timeout: default seconds to wait for each answer.
    """

    def __init__(self, endpoint: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        apply_heartbeats(self._sock)
        self._watch = ConnectionWatch(self._sock)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._watch.monitor, zmq.POLLIN)
        self._sock.connect(endpoint)

    def request(
        self, op: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Send one request and wait for its answer (``timeout`` seconds at most).

        Raises:
            NotRunning: no answer within ``timeout``; at once when the ipc socket does not
                exist or is left from a backend that is gone (naming the pid its lock named) or
                the first connection is refused (nothing listens on that tcp port), and as soon
                as the connection closes while waiting (the backend died).
            ControlError: the backend answered with an error.
        """
        timeout = self.timeout if timeout is None else timeout
        path = ipc_path(self.endpoint)
        if path is not None and not path.exists():
            raise NotRunning(
                f"no shardpool backend at {self.endpoint} (is `shardpool run` running?)"
            )
        stale = stale_backend(self.endpoint)
        if stale is not None:
            raise NotRunning(stale)
        self._watch.events()  # a disconnection before this request is not this request's loss
        self._sock.send(encode_request(op, args))
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotRunning(
                    f"no answer from {self.endpoint} within {timeout:g} s "
                    "(is `shardpool run` running?)"
                )
            events = dict(self._poller.poll(math.ceil(min(left, 0.5) * 1000)))
            if self._sock in events:
                break
            if self._watch.events() or self._down_too_long():
                raise NotRunning(
                    f"the shardpool backend at {self.endpoint} went away while answering "
                    f"{op!r} (its connection closed)"
                )
            if self._watch.retried and not self._watch.ever_connected:
                # Refused (the control endpoint is on this host): nothing listens there now.
                raise NotRunning(
                    f"no shardpool backend at {self.endpoint}: nothing accepts connections "
                    "there (is `shardpool run` running?)"
                )
        return decode_reply(self._sock.recv())

    def _down_too_long(self) -> bool:
        # Lost before this request and not re-made within a heartbeat timeout: nobody to answer.
        since = self._watch.down_since
        return since is not None and time.monotonic() - since > HEARTBEAT_TIMEOUT_MS / 1000

    def wait_ready(self, timeout: float, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Ping until the backend answers (it binds its control socket last, so an answer means
        ready), ``timeout`` seconds at most; ``alive()`` false stops waiting early.

        Raises:
            NotRunning: no answer in time, or ``alive()`` turned false.
            ControlError: the backend answered the ping with an error.
        """
        deadline = time.monotonic() + timeout
        self._sock.send(encode_request("ping"))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotRunning(f"backend at {self.endpoint} not ready within {timeout:g} s")
            if alive is not None and not alive():
                raise NotRunning("the backend process ended before it was ready")
            # ZeroMQ queues the ping and keeps re-trying the connection until the socket exists;
            # short polls only let alive() be checked in between.
            if self._sock.poll(math.ceil(min(left, 0.1) * 1000)):
                return dict(decode_reply(self._sock.recv()))

    def close(self) -> None:
        self._watch.close()
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
