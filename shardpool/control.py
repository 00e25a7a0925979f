"""The control socket of ``shardpool run`` and its clients: ``status``, ``drain``, ``stop``.

Wire format (one CBOR frame each way, DEALER → ROUTER)::

    request  [1, op, args]            op: "ping" | "status" | "drain" | "stop" | "resume" | "skip";
                                      args: a map ({"channel": hex} for resume and skip)
    reply    [1, ok, payload]         ok: true → payload is the answer; false → {"error": text}

* ``ping``   → ``{"pid", "version", "state", "ingress", "control", "metrics"}``: the readiness
  handshake (the socket is bound only once the pool, the ingress and the metrics are up).
* ``status`` → a snapshot (see :meth:`shardpool.service.Service.snapshot`).
* ``drain``  → stop intake, finish every accepted message (``args["timeout"]`` seconds at most),
  then answer ``{"drained": bool, "pending": n}``; the backend stays up (status keeps working,
  producers are answered ``draining``) until it is stopped.
* ``stop``   → answered at once with ``{"stopping": true, "pid": n}``; the backend then shuts down
  as on SIGTERM.

A request that needs the main thread (drain, stop) is answered later; the server thread keeps
answering others meanwhile, which is why this is a ROUTER and not a REP socket.

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
import fcntl
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import cbor2
import zmq
from zmq.utils.monitor import parse_monitor_message

from .errors import ShardPoolError
from .security import ipc_path, secure_socket_file
from .wakeup import WakePipe

log = logging.getLogger("shardpool.control")

__all__ = [
    "ConnectionWatch",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "NotRunning",
    "render_status",
    "stale_backend",
]

VERSION = 1
HALTED_SHOWN = 10  # halted channels listed in the status table (all of them in --json)

Respond = Callable[[bool, Any], None]
Handler = Callable[[str, dict[str, Any], Respond], None]


class ControlError(ShardPoolError):
    """The backend answered a control request with an error."""


class NotRunning(ShardPoolError):
    """No backend runs at the endpoint (nothing answers, its socket file is missing or stale, or
    it went away while a request waited)."""


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
        | zmq.EVENT_DISCONNECTED
        | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    )
    _REFUSALS = {
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
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
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
            try:
                frame = cbor2.dumps([VERSION, ok, payload])
            except Exception as exc:  # noqa: BLE001
                frame = cbor2.dumps([VERSION, False, {"error": f"unencodable reply: {exc}"}])
            self._replies.append((ident, frame))
            if threading.current_thread() is not self._thread:
                self._wakeup.wake()

        try:
            if len(parts) != 2:
                raise ValueError("a request must be one frame")
            msg = cbor2.loads(parts[1])
            if type(msg) is not list or len(msg) != 3 or msg[0] != VERSION:
                raise ValueError("a request must be [1, op, args]")
            _, op, args = msg
            if not isinstance(op, str) or not isinstance(args, dict):
                raise ValueError("op must be a string and args a map")
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
                exist or is left from a backend that is gone (naming the pid its lock named),
                and as soon as the connection closes while waiting (the backend died).
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
        self._sock.send(cbor2.dumps([VERSION, op, args or {}]))
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
        reply = cbor2.loads(self._sock.recv())
        _, ok, payload = reply
        if not ok:
            raise ControlError(str(payload.get("error", payload)))
        return payload

    def _down_too_long(self) -> bool:
        # Lost before this request and not re-made within a heartbeat timeout: nobody to answer.
        since = self._watch.down_since
        return since is not None and time.monotonic() - since > HEARTBEAT_TIMEOUT_MS / 1000

    def wait_ready(self, timeout: float, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Ping until the backend answers (it binds its control socket last, so an answer means
        ready), ``timeout`` seconds at most; ``alive()`` false stops waiting early.

        Raises:
            NotRunning: no answer in time, or ``alive()`` turned false.
        """
        deadline = time.monotonic() + timeout
        self._sock.send(cbor2.dumps([VERSION, "ping", {}]))
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotRunning(f"backend at {self.endpoint} not ready within {timeout:g} s")
            if alive is not None and not alive():
                raise NotRunning("the backend process ended before it was ready")
            # ZeroMQ queues the ping and keeps re-trying the connection until the socket exists;
            # short polls only let alive() be checked in between.
            if self._sock.poll(math.ceil(min(left, 0.1) * 1000)):
                _, ok, payload = cbor2.loads(self._sock.recv())
                if not ok:
                    raise ControlError(str(payload))
                return dict(payload)

    def close(self) -> None:
        self._watch.close()
        self._sock.close(linger=0)
        self._ctx.term()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------- render


def _si(n: float) -> str:
    """1234567 → '1.23M' (for per-second rates and counts in a narrow column)."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{2 if abs(n) < 10 * div else 1}f}{unit}"
    return f"{n:.0f}" if float(n).is_integer() or abs(n) >= 100 else f"{n:.1f}"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def render_status(snap: dict[str, Any], width: int | None = None) -> str:
    """The ``shardpool status`` table for one snapshot, as text (no terminal control codes)."""
    width = width or shutil.get_terminal_size((120, 40)).columns
    svc, pool, ing = snap["service"], snap["pool"], snap["ingress"]
    order = snap["order"]
    lines = [
        f"shardpool {svc['version']}  pid {svc['pid']}  up {_duration(svc['uptime_s'])}  "
        f"state {svc['state']}  pool {pool['state']}  workers {len(snap['workers'])}",
        f"endpoints: ingress {svc['ingress']}  control {svc['control']}"
        + (f"  metrics {svc['metrics']}" if svc.get("metrics") else ""),
        f"messages:  submitted {pool['submitted']}  acknowledged {pool['acknowledged']}  "
        f"in flight {pool['inflight']}  rate {_si(snap['rates']['processed_per_s'])}/s",
        f"           failures {pool['failures']}  halted channels {pool['halted_channels']}  "
        f"quarantined {pool.get('quarantined', 0)}  restarts {pool['restarts']}  "
        f"replayed {pool['replayed']}",
        f"ingress:   producers {ing['producers']}  accepted {ing['accepted']}  rejected "
        f"{ing['rejected']}  frame errors {ing['frame_errors']}  "
        f"rate {_si(snap['rates']['ingress_per_s'])}/s",
        f"           replies {ing['replies']}  backpressure waits {ing['backpressure_waits']}  "
        f"auth failures {ing['auth_failures']}" + ("" if ing["accepting"] else "  (intake closed)"),
        f"           unread replies held {ing.get('held_replies', 0)} for "
        f"{ing.get('stalled_producers', 0)} producers  frames refused whole "
        f"{ing.get('refused_frames', 0)}  internal errors {ing.get('internal_errors', 0)}",
    ]
    if ing.get("errors"):
        lines.append(
            "  rejections by code: "
            + ", ".join(f"{k} {v}" for k, v in sorted(ing["errors"].items()))
        )
    lines.append(
        f"order violations: gaps {order['gaps']}  duplicates {order['duplicates']}  "
        f"reorders {order['reorders']}"
        + ("" if not any(order.values()) else "   <-- should all be 0")
    )
    if snap.get("demo_load"):
        d = snap["demo_load"]
        lines.append(
            f"demo load: sent {d['sent']}  replies {d['replies']}  protocol violations "
            f"{d['violations']}  target {_si(d['rate'])}/s"
            if d["rate"]
            else f"demo load: sent {d['sent']}  replies {d['replies']}  protocol violations "
            f"{d['violations']}  (unpaced)"
        )
    lines.append("")
    head = (
        f"{'W':>2} {'PID':>7} {'STATE':<8} {'EPOCH':>5} {'RST':>3} {'CHANNELS':>8} {'QUEUED':>7} "
        f"{'INFLIGHT':>8} {'PROC/S':>7} {'PROCESSED':>10} {'FAILED':>6} {'REDELIV':>7} "
        f"{'LAG ms':>7} {'CPU%':>6} {'RSS MB':>7}"
    )
    lines.append(head)
    for w in snap["workers"]:
        rss = w.get("rss_bytes")
        cpu = w.get("cpu_percent")
        lag = w.get("loop_lag_s")
        lines.append(
            f"{w['index']:>2} {w.get('pid') or '-':>7} {w['state']:<8} {w['epoch']:>5} "
            f"{w['restarts']:>3} {w.get('channels', 0):>8} {w.get('queued', 0):>7} "
            f"{w['inflight']:>8} {_si(w.get('processed_per_s', 0.0)):>7} "
            f"{w.get('processed', 0):>10} {w.get('failed', 0):>6} {w.get('redelivered', 0):>7} "
            f"{'-' if lag is None else f'{lag * 1000:.1f}':>7} "
            f"{'-' if cpu is None else f'{cpu:.1f}':>6} "
            f"{'-' if rss is None else f'{rss / 1e6:.1f}':>7}"
        )
    halted = pool.get("halted") or []
    if halted:
        lines.append("")
        lines.append(f"halted channels ({len(halted)}; shardpool resume|skip CHANNEL):")
        for h in halted[:HALTED_SHOWN]:
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["since"]))
            what = "QUARANTINED" if h["quarantined"] else "halted"
            lines.append(f"  {h['channel']}  seq {h['seq']}  {what} since {since}")
            lines.append(f"      {h['error'].splitlines()[0] if h['error'] else h['type']}")
        if len(halted) > HALTED_SHOWN:
            lines.append(f"  … {len(halted) - HALTED_SHOWN} more (shardpool status --json)")
    hot = snap.get("hot_channels") or []
    if hot:
        lines.append("")
        lines.append(f"hottest channels (top {len(hot)}, messages since worker start):")
        for cid, count, worker in hot:
            short = cid if len(cid) <= 16 else cid[:16] + "…"
            lines.append(f"  {short:<17}  {count:>9}  worker {worker}")
    return "\n".join(line[:width] for line in lines)
