"""``shardpool worker --connect tcp://FRONT:PORT``: a worker on another host.

::

    connect (DEALER, CURVE) ─ HELLO(id, nonce, version) ─▶ front
        ◀─ WELCOME(epoch, index, settings) ── serve as a local worker would, on the same socket,
                                              while the lease holds (see :mod:`.lease`)
        ◀─ REFUSED(reason, final) ─────────── final: exit (a wrong id or version will not fix
                                              itself); else try again after a pause
    the incarnation ends (stop request, lost lease, a missing frame, the link closed)
        → a fresh socket, a fresh nonce, HELLO again: it comes back as an empty worker

Each incarnation has its own socket, with reconnection switched off: one tcp connection carries
the whole incarnation in order or not at all, so a frame lost in a broken connection can never be
followed by later frames on a new one. Process lifetime belongs to the host's service manager
(``config/systemd/shardpool-worker@.service``); SIGTERM is the stop request, as for a local
worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import zmq

from .. import __version__, codec
from ..codec import ToFront, ToWorker
from ..exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_START_FAILED
from .lease import Lease
from .process import WorkerSpec
from .serve import Worker

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["SETTINGS", "RemoteOptions", "options_from_config", "run_remote_worker"]

log = logging.getLogger("shardpool.worker")

HELLO_TIMEOUT_S = 2.0
"""How long a worker waits for the front's answer to HELLO before it tries again (seconds)."""
RETRY_S = (0.2, 5.0)
"""First and longest pause between attempts to join (seconds; doubling)."""

SETTINGS = (
    "handler",
    "handler_options",
    "payload",
    "failure_policy",
    "failure_policy_by_type",
    "retry_limit",
    "retry_backoff_s",
    "heartbeat_interval_s",
    "channel_idle_expiry_s",
    "slots",
    "move_state",
    "load_interval_s",
)
"""The :class:`WorkerSpec` fields a WELCOME carries (the front's config decides them)."""


@dataclass(frozen=True)
class RemoteOptions:
    """What ``shardpool worker`` is told: where the front is, who this worker is, its keys
    (Z85; all three or none: none only on a loopback link)."""

    connect: str
    worker_id: str
    front_public_key: bytes | None = None
    public_key: bytes | None = None
    secret_key: bytes | None = None


def options_from_config(cfg: Config) -> RemoteOptions:
    """``shardpool worker``'s options from the ``[remote]`` keys it reads.

    Rules: ``connect`` and ``worker_id`` are required; a non-loopback ``connect`` needs
    ``front_public_key`` and ``worker_secret_key`` (CURVE: the front refuses plain tcp from
    beyond its host, and the worker must know it talks to its front); both key files or neither.

    Raises:
        ConfigError: naming each offending key, its value and what is required.
    """
    from ..errors import ConfigError
    from ..security import is_loopback_endpoint, load_client_keys, load_public_key

    r = cfg.remote
    problems: list[tuple[str, object, str]] = []
    if not r.connect:
        problems.append(
            ("remote.connect", "", 'the front\'s address, "tcp://HOST:PORT" (--connect)')
        )
    if not r.worker_id:
        problems.append(("remote.worker_id", "", "this worker's id as the front lists it (--id)"))
    front_key = public = secret = None
    if bool(r.front_public_key) != bool(r.worker_secret_key):
        missing = (
            "remote.front_public_key" if not r.front_public_key else "remote.worker_secret_key"
        )
        problems.append((missing, "", "both CURVE key files must be set, or neither"))
    elif r.front_public_key:
        try:
            front_key = load_public_key(r.front_public_key)
        except (OSError, ValueError) as exc:
            problems.append(("remote.front_public_key", r.front_public_key,
                             f"a readable CURVE public key file ({exc})"))
        try:
            public, secret = load_client_keys(r.worker_secret_key)
        except (OSError, ValueError) as exc:
            problems.append(("remote.worker_secret_key", r.worker_secret_key,
                             f"a readable CURVE secret key file ({exc})"))
    elif r.connect and not is_loopback_endpoint(r.connect):
        problems.append((
            "remote.connect", r.connect,
            "a loopback address unless CURVE is set up: remote.front_public_key and "
            "remote.worker_secret_key (--front-key, --secret-key; see `shardpool keys --worker "
            "ID DIR`)",
        ))
    if problems:
        raise ConfigError(problems)
    return RemoteOptions(r.connect, r.worker_id, front_key, public, secret)


class _Stop:
    """SIGTERM/SIGINT between incarnations: only recorded; the loop acts on it."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def note(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()


def run_remote_worker(opts: RemoteOptions) -> int:
    """Join the front, serve, and join again, until SIGTERM/SIGINT. Returns the exit code:
    :data:`EXIT_OK` when stopped, :data:`EXIT_CONFIG` when the front refused this worker for
    good (unknown id, another wire protocol), :data:`EXIT_START_FAILED` when the handler it was
    given could not start."""
    stop = _Stop()
    signal.signal(signal.SIGTERM, stop.note)
    signal.signal(signal.SIGINT, stop.note)
    pause = RETRY_S[0]
    while not stop.event.is_set():
        code = _incarnation(opts, stop)
        if code is not None:
            return code
        if stop.event.wait(pause):
            break
        pause = min(RETRY_S[1], pause * 2)
    return EXIT_OK


def _socket(ctx: zmq.Context[Any], opts: RemoteOptions, nonce: bytes) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    sock.linger = 1000  # a BYE or the last ACK may still be leaving when the incarnation ends
    sock.sndhwm = 0  # the front's window bounds what is in flight
    sock.rcvhwm = 0
    sock.routing_id = nonce
    # Never reconnect within an incarnation (see the module docstring); a new one uses a new
    # socket. The ZMTP heartbeat closes a connection whose peer vanished.
    sock.reconnect_ivl = -1
    sock.heartbeat_ivl = 1000
    sock.heartbeat_timeout = 5000
    if opts.secret_key is not None:
        sock.curve_serverkey = opts.front_public_key
        sock.curve_publickey = opts.public_key
        sock.curve_secretkey = opts.secret_key
    sock.connect(opts.connect)
    return sock


def _incarnation(opts: RemoteOptions, stop: _Stop) -> int | None:
    """One attempt: HELLO, then serve if welcomed. Returns an exit code to leave with, or None
    to try again."""
    nonce = os.urandom(16)
    ctx: zmq.Context[Any] = zmq.Context()
    sock = _socket(ctx, opts, nonce)
    try:
        sent_at = time.monotonic()
        try:
            sock.send(
                codec.frame(
                    ToFront.HELLO, opts.worker_id, nonce, __version__, codec.PROTOCOL,
                    os.getpid(), socket.gethostname(),
                ),
                zmq.NOBLOCK,
            )
        except zmq.Again:
            return None  # no connection to queue it on: try again
        reply = _await_reply(sock, stop)
        if reply is None:
            return None
        if reply[0] == ToWorker.REFUSED:
            reason, final = str(reply[2]), bool(reply[3])
            log.log(
                logging.ERROR if final else logging.WARNING,
                "the front at %s refused worker %s: %s", opts.connect, opts.worker_id, reason,
            )
            return EXIT_CONFIG if final else None
        epoch, index, settings = int(reply[1]), int(reply[2]), dict(reply[3])
        spec = WorkerSpec(
            index=index,
            epoch=epoch,
            data_endpoint="",
            front_endpoint=opts.connect,
            **{k: settings[k] for k in SETTINGS},
        )
        lease_s = float(settings["lease_s"])
        lease = Lease(
            lease_s,
            sent_at,
            grace_s=float(settings["lease_margin_s"]) / 2,
            monitor=sock.get_monitor_socket(zmq.EVENT_DISCONNECTED),
        )
        log.info("worker %s joined %s as worker %d (epoch %d)", opts.worker_id, opts.connect,
                 index, epoch)
        worker = Worker(spec, sock, lease)
        signal.signal(signal.SIGTERM, worker.note_stop)
        signal.signal(signal.SIGINT, worker.note_stop)
        if stop.event.is_set():
            worker.stop.append(0)
        try:
            code = asyncio.run(worker.run())
        finally:
            lease.close()
            signal.signal(signal.SIGTERM, stop.note)
            signal.signal(signal.SIGINT, stop.note)
        if worker.stop and worker.stop[0] > 0:
            stop.event.set()  # a signal ended it: leave
        if code == EXIT_START_FAILED:
            return code
        if lease.link_closed:
            log.warning("worker %s: the front at %s closed the connection; joining again",
                        opts.worker_id, opts.connect)
        elif lease.expired:
            log.warning("worker %s: lost its lease to %s; joining again", opts.worker_id,
                        opts.connect)
        return EXIT_OK if stop.event.is_set() else None
    finally:
        with contextlib.suppress(zmq.ZMQError):
            sock.disable_monitor()
        sock.close()
        ctx.term()


def _await_reply(sock: zmq.Socket[bytes], stop: _Stop) -> list[Any] | None:
    """The front's WELCOME or REFUSED, or None (no answer in :data:`HELLO_TIMEOUT_S`, a stop
    request, a frame we cannot read)."""
    deadline = time.monotonic() + HELLO_TIMEOUT_S
    while not stop.event.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or not sock.poll(int(min(left, 0.2) * 1000) + 1):
            if left <= 0:
                return None
            continue
        try:
            msg = codec.loads(sock.recv())
            if msg[0] in (ToWorker.WELCOME, ToWorker.REFUSED):
                return list(msg)
        except Exception:  # noqa: BLE001 - a frame we cannot read is no answer
            return None
    return None
