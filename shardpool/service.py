"""``shardpool run``: the node backend — pool, ingress, control socket and metrics in one process.

Start-up order (each step cleaned up if a later one fails): check the endpoints' security (before
any socket exists), lock the ipc endpoints, start the pool (workers READY), bind the ingress, start
the metrics server, pin the workers if asked, and bind the control socket *last*, so that a
control ``ping`` answering means the whole backend is ready.

The main thread then only waits: signal handlers record the signal (and ZeroMQ-free wake-up goes
through :func:`signal.set_wakeup_fd`), control requests that need it (drain, undrain, stop)
are queued to it, and once a second it samples the figures that ``status`` turns into rates and
re-pins workers that were restarted or added.

SIGHUP re-reads the config file and applies the keys that can change live (levelling, the move
timeout, the drain deadline: :data:`~shardpool.reload.LIVE_KEYS`), logging every changed key as
applied or as needing a restart; a config that does not validate is logged and changes nothing.
Then the workers are replaced one at a time by fresh processes that import the handler code anew
(a rolling restart through slot moves, :mod:`shardpool.front.roll`: nothing lost or reordered);
a SIGHUP during a roll is logged and starts no second one. SIGUSR1 reopens log files
(none with the ``shardpool`` command, which logs to stderr). Both are recorded by their handler
and carried out by the main loop, like every other signal.

When ``NOTIFY_SOCKET`` is set (systemd ``Type=notify``), the service manager hears ``READY=1``
once the control socket answers, ``STATUS=`` on each change of state or worker count,
``RELOADING=1``/``READY=1`` around a SIGHUP, ``STOPPING=1`` when shutdown begins and
``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from the main loop (:mod:`shardpool.sdnotify`).

The worker count can change while running (``shardpool resize N``, or the gunicorn convention:
SIGTTIN one worker more, SIGTTOU one fewer, never below one; the handler records the signal, the
main loop asks the pool for the resize without waiting for it and logs it; a refused one is
logged, never fatal). Placement operations that take time (``move``, ``pin``, ``unpin``, a
waited ``resize``) run on a thread each, at most :data:`MAX_OPERATIONS` at once, so the control
thread keeps answering ``status`` meanwhile; a request that is wrong in itself (a slot, worker or
channel id that does not exist) is answered at once with a :class:`~shardpool.control.BadRequest`
error naming the value and what is allowed. Shutdown runs in explicit phases:

1. stop intake — the demo load stops and the ingress answers every new message ``shutting_down``;
2. drain — wait for every accepted message, within ``supervisor.stop_timeout_s`` (less the last
   part, kept for the workers to stop);
3. stop the pool — each worker finishes the call it is in and leaves (killed at the deadline);
   producers get ``closed`` for what never reached a handler and ``in_doubt`` for what a handler
   may have run when its worker was stopped; both counts are logged;
4. close the sockets (replies still due go out first) and release the endpoint locks.

``shardpool drain`` stops intake the same way (producers are answered ``draining``, the demo load
stops) and waits for the drain, but leaves the backend up; ``shardpool undrain`` reopens intake
(and restarts the demo load, on fresh channels), calling off a drain still waiting. The state in
``status`` (``service.state``: running, draining, drained; ``service.intake``) says which.

A second signal (or stop request) during shutdown skips what is left of the drain and stops the
workers at once. Exit code 0 after a clean drain, 1 otherwise.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, NamedTuple

import psutil

from . import __version__, deadletters
from . import protocol as P
from .config import DEFAULTS_SOURCE, Config, load_config
from .control import BAD_REQUEST, OPS, BadRequest, ControlServer, Respond
from .deadletters import DeadLetters, open_sink
from .demo.load import DemoLoad
from .errors import (
    ConfigError,
    DrainTimeout,
    HandlerError,
    MoveRefused,
    PoolBroken,
    ShardPoolError,
)
from .exitcodes import EXIT_FAILURE, EXIT_OK
from .front import stop_grace
from .front.moves import Move
from .ingress import Ingress, IngressSettings
from .metrics import MetricsServer
from .pool import ShardPool
from .ratelog import RateLimitedLog
from .reload import plan_reload, reopen_log_files
from .routing import check_channel_id
from .sdnotify import Notifier
from .security import EndpointLock, check_endpoints, claim_endpoints, resolve_endpoints
from .status import Figures
from .wakeup import WakePipe

log = logging.getLogger("shardpool.service")

__all__ = ["Service"]

SAMPLE_INTERVAL_S = 1.0
"""How often the main loop samples the figures (seconds): the base of the rates status shows."""
DRAIN_SLICE_S = 0.2
"""Longest single wait while draining (seconds): how late a signal or stop request is seen."""
MAX_OPERATIONS = 8
"""Placement operations (move, pin, unpin, a waited resize) in progress at once, at most; one more
is refused with an error saying so."""
MAX_WORKERS = 1024
"""The most workers a resize may ask for (as ``pool.workers``)."""
RESIZE_SIGNALS = {signal.SIGTTIN: 1, signal.SIGTTOU: -1}
"""Signal → change of the worker count (gunicorn's convention)."""
ADMIN_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
"""Reload the config (HUP), reopen log files (USR1)."""


class Service:
    """The backend. ``start()`` then ``serve()`` (blocks until signalled or stopped), or, for
    in-process use and tests, ``start()``, then ``stop()`` from the same thread.

    Args:
        config: the validated configuration.
        demo_load: drive the built-in Lightning traffic generator through the ingress at this
            many messages per second (0 = as fast as the pool takes them; None = off).
        env: environment for the default runtime directory and ``NOTIFY_SOCKET`` /
            ``WATCHDOG_USEC`` (default ``os.environ``).
        reload: what SIGHUP calls to read the configuration again (raising
            :class:`ConfigError` for one that does not validate); default: load the file
            ``config.source`` names (with the environment's overrides), as at start.
    """

    def __init__(
        self,
        config: Config,
        *,
        demo_load: float | None = None,
        env: dict[str, str] | None = None,
        reload: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload
        self._env = env
        self._demo_rate = demo_load
        self.state = "starting"
        self.pool: ShardPool | None = None
        self.ingress: Ingress | None = None
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None
        self.ingress_endpoint, self.control_endpoint = resolve_endpoints(config, env)
        self.metrics_url: str | None = None
        self._locks: list[EndpointLock] = []
        self._demo: DemoLoad | None = None
        # Recorded by signal handlers / other threads, acted on by the main loop.
        self._signals: list[int] = []
        self._resize_signals: collections.deque[int] = collections.deque()
        self._admin_signals: collections.deque[int] = collections.deque()
        self._notify = Notifier(env)
        self._next_watchdog = time.monotonic()
        self._stop_requests = 0
        self._exit_lock = threading.Lock()
        self._exit_waiters: list[Respond] = []  # `stop` requests waiting for the exit code
        self._undrain_requests = 0  # control thread: counts undrain requests (calls off a drain)
        self._operations = 0  # placement operations running on threads of their own
        self._operations_lock = threading.Lock()
        self._requests: collections.deque[tuple[str, dict[str, Any], Respond]] = collections.deque()
        self._wakeup = WakePipe()
        self._figures = Figures()
        self._front = psutil.Process()  # the front's own row in `shardpool status`
        self._front.cpu_percent(None)
        self._pinning = _WorkerPinning()
        self._started = time.monotonic()
        self._failure_log = RateLimitedLog(log, 10.0)
        self.exit_code: int | None = None
        self._failed: str | None = None
        self.dead_letters: DeadLetters | None = None

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        """Bring everything up; on failure, tear down what was started and re-raise.

        Raises:
            ConfigError: an endpoint is insecure (non-loopback without CURVE, ...) or unusable.
            EndpointInUse: another ``shardpool run`` holds an ipc endpoint.
            WorkerStartError / PoolBroken: the workers could not start.
            zmq.ZMQError / OSError: a socket or the metrics port cannot be bound.
        """
        cfg = self.config
        keys = check_endpoints(cfg)
        if self._demo_rate is not None and keys is not None:
            raise ConfigError(
                "--demo-load sends through the ingress without a client key; it cannot be used "
                "with CURVE keys configured (run a producer with a client key instead)"
            )
        try:
            endpoints = {"ingress.endpoint": self.ingress_endpoint,
                         "control.endpoint": self.control_endpoint}
            self._locks = claim_endpoints(cfg, endpoints, self._env)
            self.pool = ShardPool(config=cfg, on_failure=self._on_failure)
            self.dead_letters = open_sink(cfg, self._env)
            self.pool.record_dead_letters(self.dead_letters)
            self.ingress = Ingress(
                self.pool,
                IngressSettings(
                    endpoint=self.ingress_endpoint,
                    max_message_bytes=cfg.transport.max_message_bytes,
                    max_producers=cfg.ingress.max_producers,
                    max_pending_per_producer=cfg.ingress.max_pending_per_producer,
                    curve=keys,
                ),
                info={"pid": os.getpid()},
            )
            self.ingress_endpoint = self.ingress.start()
            if cfg.metrics.enabled:
                self.metrics = MetricsServer(self.snapshot, cfg.metrics.host, cfg.metrics.port)
                self.metrics_url = self.metrics.start()
            if cfg.pool.pin_workers:
                self._pinning.apply(self.pool.worker_pids())
            self.control = ControlServer(self.control_endpoint, self._on_control)
            self.control_endpoint = self.control.start()
        except BaseException:
            self._teardown()
            raise
        self.state = "running"
        self._started = time.monotonic()
        log.info(
            "shardpool %s running: pid %d, %d workers (handler %s)",
            __version__,
            os.getpid(),
            self.workers(),
            cfg.pool.handler,
        )
        log.info(
            "ingress (producers connect here): %s%s",
            self.ingress_endpoint,
            "  [CURVE]" if keys is not None else "",
        )
        log.info("control (shardpool status/drain/stop): %s", self.control_endpoint)
        if self.metrics_url:
            log.info("metrics: %s", self.metrics_url)
        if self._demo_rate is not None:
            self._demo = DemoLoad(self.ingress_endpoint, self._demo_rate)
            self._demo.start()
        # The control socket answers: ready for the service manager too.
        self._notify.ready(self._status_text())
        self._watchdog(force=True)

    def _teardown(self) -> None:
        """Release whatever :meth:`start` got to, in reverse order (a failed start)."""
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.pool is not None:
            self.pool.close(0.0)
        if self.dead_letters is not None:
            self.dead_letters.close()
        if self.ingress is not None:
            self.ingress.close(0.0)
        for lock in self._locks:
            lock.release()
        self._locks.clear()
        self._wakeup.close()
        self._notify.close()

    # -- hooks called from other threads -----------------------------------------------------

    def _on_failure(self, err: HandlerError) -> None:
        # Pool I/O thread: every failure is logged, rate-limited per exception type (producers
        # hear of theirs through each message's own on_done, a halt as a HALTED notice).
        if err.policy == "quarantine":
            # Rare and needing an operator: every one is logged, with its cause.
            log.error("%s (shardpool resume|skip %s)", err, err.channel_id.hex())
            return
        self._failure_log.warn(
            err.exc_type,
            "handler failed on channel %s seq %d (%s, policy %s)",
            err.channel_id.hex()[:16],
            err.seq,
            err.exc_type,
            err.policy,
        )

    def _wake(self) -> None:
        self._wakeup.wake()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Only record: the main loop acts (set_wakeup_fd has already woken it).
        self._signals.append(signum)

    def _on_resize_signal(self, signum: int, frame: FrameType | None) -> None:
        # SIGTTIN / SIGTTOU: only record, as above; the main loop resizes.
        self._resize_signals.append(signum)

    def _on_admin_signal(self, signum: int, frame: FrameType | None) -> None:
        # SIGHUP / SIGUSR1: only record, as above; the main loop reloads or reopens.
        self._admin_signals.append(signum)

    def request_stop(self) -> None:
        """Ask the main loop to shut down (thread-safe; a second request forces it)."""
        self._stop_requests += 1
        self._wake()

    def _on_control(self, op: str, args: dict[str, Any], respond: Respond) -> None:
        """Control-socket requests (control thread)."""
        if op == "ping":
            respond(True, self.info())
        elif op == "status":
            respond(True, self.snapshot(timeout=float(args.get("timeout", 2.0))))
        elif op == "placement":
            assert self.pool is not None
            respond(True, self.pool.placement())
        elif op in _PLACEMENT_OPS:
            try:
                self._placement_op(op, args, respond)
            except BadRequest as exc:
                respond(False, {"error": str(exc), "code": BAD_REQUEST})
        elif op in ("drain", "undrain"):
            self._queue_request(op, args, respond)
        elif op == "stop":
            self._stop_request(args, respond)
        elif op in ("resume", "skip"):
            self._channel_decision(op, args, respond)
        elif op == "dead-letters":
            self._dead_letters_op(args, respond)
        else:
            respond(False, {"error": f"unknown control op {op!r} ({', '.join(OPS)})"})

    def _channel_decision(self, op: str, args: dict[str, Any], respond: Respond) -> None:
        """An operator's decision on a channel halted by the halt policy (the pool is
        thread-safe, so the control thread may act directly)."""
        try:
            cid = _channel_arg(args)
            getattr(self.pool, op)(cid)
        except BadRequest as exc:
            respond(False, {"error": str(exc), "code": BAD_REQUEST})
        except (ValueError, ShardPoolError) as exc:
            respond(False, {"error": str(exc)})
        else:
            respond(True, {op: cid.hex()})

    def _dead_letters_op(self, args: dict[str, Any], respond: Respond) -> None:
        """``dead-letters`` (control thread): ``action`` list / purge answered at once, replay
        on an operation thread (it waits for the replayed messages' answers)."""
        sink, pool, action = self.dead_letters, self.pool, args.get("action")
        if sink is None or pool is None:
            respond(False, {"error": "dead letters are off (deadletters.enabled = false)"})
            return
        try:
            if action == "list":
                respond(True, deadletters.list_entries(sink, args))
            elif action == "purge":
                respond(True, deadletters.purge_entries(sink, args))
            elif action == "replay":
                self._run_operation(
                    "dead-letters replay",
                    lambda: deadletters.replay_entries(pool, sink, args, self._stopping),
                    respond,
                )
            else:
                raise BadRequest(f"action must be list, replay or purge, got {action!r}")
        except BadRequest as exc:
            respond(False, {"error": str(exc), "code": BAD_REQUEST})

    def _queue_request(self, op: str, args: dict[str, Any], respond: Respond) -> None:
        """``drain`` / ``undrain`` (control thread): queued for the main loop, which owns the
        intake state; an undrain also calls off a drain still waiting there."""
        if op == "undrain":
            self._undrain_requests += 1
        self._requests.append((op, args, respond))
        self._wake()

    def _stop_request(self, args: dict[str, Any], respond: Respond) -> None:
        """``stop`` (control thread): answered at once, or with ``wait`` (``shardpool stop``)
        once the shutdown knows its exit code, just before the control socket closes."""
        if args.get("wait"):
            with self._exit_lock:
                code = self.exit_code
                if code is None:
                    self._exit_waiters.append(respond)
            if code is not None:
                respond(True, {"stopped": True, "pid": os.getpid(), "exit_code": code})
        else:
            respond(True, {"stopping": True, "pid": os.getpid()})
        self.request_stop()

    # -- placement: move, pin, unpin, resize ---------------------------------------------------

    def workers(self) -> int:
        """How many workers the pool has now (it changes with a resize)."""
        if self.pool is None:
            return self.config.pool.workers
        return int(self.pool.placement()["workers"])

    def _placement_op(self, op: str, args: dict[str, Any], respond: Respond) -> None:
        """Check a placement request's arguments here on the control thread (raising
        :class:`BadRequest`), then carry it out on a thread of its own and answer from there."""
        assert self.pool is not None
        pool = self.pool
        if self.state in ("stopping", "stopped"):
            respond(False, {"error": f"{op}: the backend is shutting down"})
            return
        timeout = _timeout_arg(args)
        if op == "move":
            slots = self._slots_arg(args)
            worker = self._worker_arg(args)
            what = f"move {_slot_list(slots)} to worker {worker}"
            self._run_operation(
                what, lambda: _move_reply(pool.move_slots(slots, worker, timeout=timeout)), respond
            )
        elif op == "pin":
            cid = _channel_arg(args)
            target = None if args.get("worker") is None else self._worker_arg(args)
            what = f"pin channel {cid.hex()}" + ("" if target is None else f" to worker {target}")
            self._run_operation(
                what, lambda: self._pin_reply(cid, pool.pin(cid, target, timeout=timeout)), respond
            )
        elif op == "unpin":
            cid = _channel_arg(args)
            self._run_operation(
                f"unpin channel {cid.hex()}",
                lambda: self._pin_reply(cid, pool.unpin(cid, timeout=timeout)),
                respond,
            )
        elif op == "roll":
            self._roll_op(args, timeout, respond)
        else:
            self._resize_op(args, timeout, respond)

    def _resize_op(self, args: dict[str, Any], timeout: float | None, respond: Respond) -> None:
        assert self.pool is not None
        workers = self._count_arg(args)
        if args.get("wait", True) is False:
            try:
                self.pool.resize(workers, wait=False)
            except MoveRefused as exc:
                respond(False, {"error": _resize_error(workers, exc)})
            else:
                log.info("resize to %d workers requested (control socket)", workers)
                respond(True, {"started": True, **self._resize_reply(workers)})
            return
        self._run_operation(
            f"resize to {workers} workers",
            lambda: self._resize(workers, timeout),
            respond,
        )

    def _roll_op(self, args: dict[str, Any], timeout: float | None, respond: Respond) -> None:
        """``roll``: a rolling restart of every worker (waited on an operation thread)."""
        assert self.pool is not None
        pool = self.pool
        if args.get("wait", True) is False:
            try:
                pool.roll(wait=False)
            except MoveRefused as exc:
                respond(False, {"error": f"rolling restart: {exc}"})
            else:
                log.info("rolling restart requested (control socket)")
                respond(True, {"started": True, "workers": len(pool.worker_pids())})
            return

        def work() -> dict[str, Any]:
            t0 = time.monotonic()
            try:
                pool.roll(timeout=timeout, wait=True)
            except DrainTimeout:
                done = False
            else:
                done = True
            pids = pool.worker_pids()
            return {"done": done, "workers": len(pids), "pids": pids,
                    "seconds": time.monotonic() - t0}

        self._run_operation("rolling restart", work, respond)

    def _run_operation(self, what: str, work: Callable[[], Any], respond: Respond) -> None:
        """Run ``work`` on a daemon thread of its own and answer with what it returns, or with an
        error naming ``what`` failed and why. Refused when :data:`MAX_OPERATIONS` run already."""
        with self._operations_lock:
            if self._operations >= MAX_OPERATIONS:
                respond(False, {"error": f"{what}: {self._operations} placement operations are "
                                         "in progress already; try again once one has ended"})
                return
            self._operations += 1

        def run() -> None:
            try:
                result = work()
            except MoveRefused as exc:
                text = str(exc)
                respond(False, {"error": text if text.startswith(what) else f"{what}: {text}"})
            except ShardPoolError as exc:  # ChannelIdError, PoolBroken, PoolClosed ...
                respond(False, {"error": f"{what}: {exc}"})
            except Exception as exc:  # noqa: BLE001 - the asking client must get an answer
                log.exception("%s failed", what)
                respond(False, {"error": f"{what} failed: {exc!r}"})
            else:
                respond(True, result)
            finally:
                with self._operations_lock:
                    self._operations -= 1

        log.info("%s (control socket)", what)
        threading.Thread(target=run, name="shardpool-placement-op", daemon=True).start()

    def _resize(self, workers: int, timeout: float | None) -> dict[str, Any]:
        """A waited resize (operation thread): ``done`` false when ``timeout`` passed first."""
        assert self.pool is not None
        t0 = time.monotonic()
        try:
            self.pool.resize(workers, timeout=timeout, wait=True)
        except DrainTimeout:
            return {"done": False, **self._resize_reply(workers), "seconds": time.monotonic() - t0}
        except MoveRefused as exc:
            raise MoveRefused(_resize_error(workers, exc)) from exc
        return {"done": True, **self._resize_reply(workers), "seconds": time.monotonic() - t0}

    def _resize_reply(self, workers: int) -> dict[str, Any]:
        assert self.pool is not None
        place = self.pool.placement()
        return {"target": workers, "workers": place["workers"], "resize": place["resize"]}

    def _pin_reply(self, cid: bytes, move: Move | None) -> dict[str, Any]:
        assert self.pool is not None
        if move is not None:
            return {"channel": cid.hex(), "worker": move.dst, "moved": True, **_move_reply(move)}
        return {"channel": cid.hex(), "worker": self.pool.worker_of(cid), "moved": False}

    def _worker_arg(self, args: dict[str, Any]) -> int:
        worker = _int_arg(args, "worker")
        n = self.workers()
        if not 0 <= worker < n:
            raise BadRequest(
                f"no worker {worker}: the pool has {n} worker{'s' if n != 1 else ''} "
                f"(0..{n - 1})"
            )
        return worker

    def _slots_arg(self, args: dict[str, Any]) -> list[int]:
        raw = args.get("slots")
        values = raw if isinstance(raw, list) else [raw]
        if not values:
            raise BadRequest("slots: name at least one slot")
        total = self.config.pool.slots
        slots: list[int] = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, int):
                raise BadRequest(f"slot must be an integer, got {value!r}")
            if not 0 <= value < total:
                raise BadRequest(
                    f"no slot {value}: the pool has {total} slots (0..{total - 1}, pool.slots)"
                )
            if value not in slots:
                slots.append(value)
        return slots

    def _count_arg(self, args: dict[str, Any]) -> int:
        workers = _int_arg(args, "workers")
        most = min(MAX_WORKERS, self.config.pool.slots)
        if not 1 <= workers <= most:
            why = "" if most == MAX_WORKERS else f" (pool.slots = {most}: a worker needs a slot)"
            raise BadRequest(f"workers must be from 1 to {most}{why}, got {workers}")
        return workers

    def _resize_by_signal(self, signum: int) -> None:
        """SIGTTIN / SIGTTOU (main loop): one worker more or fewer than the count the pool is
        heading for, never below 1; the resize goes on without this loop waiting for it."""
        assert self.pool is not None
        name = signal.Signals(signum).name
        place = self.pool.placement()
        resize = place["resize"]
        current = int(resize["target"] if resize["in_progress"] else place["workers"])
        target = current + RESIZE_SIGNALS[signal.Signals(signum)]
        most = min(MAX_WORKERS, self.config.pool.slots)
        if not 1 <= target <= most:
            log.warning(
                "%s: not resizing: %d workers now, and %d is the %s", name, current,
                1 if target < 1 else most, "fewest" if target < 1 else "most"
            )
            return
        try:
            self.pool.resize(target, wait=False)
        except ShardPoolError as exc:  # MoveRefused: not running, ...
            log.warning("%s: resize from %d to %d workers refused: %s", name, current, target, exc)
        else:
            log.info("%s: resizing from %d to %d workers", name, current, target)

    # -- main loop ---------------------------------------------------------------------------

    def serve(self, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT or a stop request, then shut down in phases; return the exit
        code (0 after a clean drain). Signal handlers are installed only in the main thread."""
        restore: list[tuple[signal.Signals, Any]] = []
        old_fd: int | None = None
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore.append((sig, signal.signal(sig, self._on_signal)))
            for sig in RESIZE_SIGNALS:
                restore.append((sig, signal.signal(sig, self._on_resize_signal)))
            for sig in ADMIN_SIGNALS:
                restore.append((sig, signal.signal(sig, self._on_admin_signal)))
            old_fd = signal.set_wakeup_fd(self._wakeup.write_fd, warn_on_full_buffer=False)
        try:
            reason = self._wait_for_stop()
            return self._shutdown(reason)
        finally:
            if old_fd is not None:
                signal.set_wakeup_fd(old_fd)
            for sig, handler in restore:
                signal.signal(sig, handler)
            self._wakeup.close()
            self._notify.close()

    def stop(self) -> int:
        """Shut down from the thread that called :meth:`start` (in-process use); returns the
        exit code."""
        try:
            return self._shutdown("stop()")
        finally:
            self._wakeup.close()
            self._notify.close()

    def _stopping(self) -> bool:
        return bool(self._signals) or self._stop_requests > 0

    def _forced(self) -> bool:
        return len(self._signals) + self._stop_requests >= 2

    def _sleep(self, seconds: float) -> None:
        self._wakeup.wait(seconds)

    def _wait_for_stop(self) -> str:
        assert self.pool is not None
        next_tick = time.monotonic()
        while True:
            if self._signals:
                return signal.Signals(self._signals[0]).name
            if self._stop_requests:
                return "stop request"
            if self.pool.broken:
                return "pool broken"
            if self.ingress is not None and not self.ingress.alive:
                # Producers could get no replies any more: better down than silently deaf.
                self._failed = "the ingress thread failed"
                return self._failed
            self._act_on_requests()
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick = now + SAMPLE_INTERVAL_S
            self._watchdog()
            self._sleep(min(next_tick, self._next_watchdog) - time.monotonic())

    def _act_on_requests(self) -> None:
        """What the main loop was asked to do: drain requests, resize and admin signals."""
        while self._requests:
            op, args, respond = self._requests.popleft()
            if op == "drain":
                self._drain_request(args, respond)
            elif op == "undrain":
                self._undrain_request(respond)
        while self._resize_signals:
            self._resize_by_signal(self._resize_signals.popleft())
        while self._admin_signals:
            if self._admin_signals.popleft() == signal.SIGHUP:
                self._reload()
            else:
                self._reopen_logs()

    def _tick(self) -> None:
        assert self.pool is not None
        try:
            self.snapshot(timeout=1.0)
            if self.config.pool.pin_workers:
                self._pinning.apply(self.pool.worker_pids())
            self._notify.status(self._status_text())
        except Exception:  # noqa: BLE001 - sampling must never take the backend down
            log.exception("periodic sample failed")

    def _watchdog(self, force: bool = False) -> None:
        """``WATCHDOG=1`` when half of ``WATCHDOG_USEC`` has passed since the last one."""
        interval = self._notify.watchdog_interval_s
        if interval is None:
            self._next_watchdog = float("inf")
            return
        now = time.monotonic()
        if force or now >= self._next_watchdog:
            self._notify.watchdog()
            self._next_watchdog = now + interval

    def _status_text(self) -> str:
        """One line for ``systemctl status``: state, workers, a resize in progress."""
        if self.pool is None or self.state in ("stopping", "stopped"):
            return self.state
        place = self.pool.placement()
        n = int(place["workers"])
        text = f"{self.state}: {n} worker{'s' if n != 1 else ''}"
        resize = place["resize"]
        if resize["in_progress"]:
            text += f", resizing to {resize['target']}"
        roll = place["roll"]
        if roll["in_progress"]:
            text += f", rolling restart ({roll['rolled']} of {roll['total']} replaced)"
        if self.state == "draining":
            text += ", intake stopped"
        elif self.state == "drained":
            text += ", intake closed"
        return text

    # -- SIGHUP, SIGUSR1 -----------------------------------------------------------------------

    def _read_config(self) -> Config:
        """The configuration as it reads now (raises ConfigError)."""
        if self._reload_config is not None:
            return self._reload_config()
        source = self.config.source
        if source != DEFAULTS_SOURCE and source.startswith("<"):
            raise ConfigError(f"the configuration came from {source}, not a file: nothing to read")
        return load_config(None if source == DEFAULTS_SOURCE else source, env=self._env)

    def _reload(self) -> None:
        """SIGHUP (main loop): re-read the config, apply the live keys, log every change."""
        assert self.pool is not None
        self._notify.reloading()
        try:
            log.info("SIGHUP: reloading the configuration from %s", self.config.source)
            try:
                new = self._read_config()
            except ConfigError as exc:
                log.error("SIGHUP: configuration not reloaded, nothing changed: %s",
                          str(exc).replace("\n", "; "))
                return
            plan = plan_reload(self.config, new)
            plan.log(log)
            if plan.applied:
                self.pool.apply_live_config(plan.effective)
                self.config = plan.effective
            log.info(
                "SIGHUP: reload done: %d key%s applied, %d need%s a restart",
                len(plan.applied), "" if len(plan.applied) == 1 else "s",
                len(plan.restart), "s" if len(plan.restart) == 1 else "",
            )
            self._roll_by_signal()
        except Exception:  # noqa: BLE001 - a reload must never take the backend down
            log.exception("SIGHUP: reload failed; the running configuration is unchanged")
        finally:
            self._notify.ready(self._status_text())

    def _roll_by_signal(self) -> None:
        """SIGHUP (main loop): replace the workers one at a time onto the handler code as it is
        now (:meth:`ShardPool.roll`, driven by the front: the main loop does not wait). A roll
        already under way is not started again: this SIGHUP is logged and ignored."""
        assert self.pool is not None
        try:
            self.pool.roll(wait=False)
        except MoveRefused as exc:
            log.warning("SIGHUP: workers not restarted: %s", exc)
            return
        log.info("SIGHUP: rolling restart of %d worker(s) onto the handler code as it is now",
                 len(self.pool.worker_pids()))

    def _reopen_logs(self) -> None:
        """SIGUSR1 (main loop): reopen log files (logrotate)."""
        paths = reopen_log_files()
        if paths:
            log.info("SIGUSR1: reopened log file%s %s", "s" if len(paths) > 1 else "",
                     ", ".join(paths))
        else:
            log.info("SIGUSR1: no log file to reopen (logging to stderr only)")

    def _drain(self, deadline: float, interrupted: Callable[[], bool]) -> _DrainOutcome:
        """Wait for every accepted message until ``deadline`` (monotonic seconds), in slices of
        at most :data:`DRAIN_SLICE_S` so that ``interrupted()`` (a signal, a stop request) is
        seen between them. Never raises for a timeout or a broken pool: the outcome says."""
        assert self.pool is not None
        while True:
            if interrupted():
                return _DrainOutcome(False, why="interrupted: the backend is shutting down")
            self._watchdog()
            left = deadline - time.monotonic()
            try:
                self.pool.drain(max(0.0, min(DRAIN_SLICE_S, left)))
                return _DrainOutcome(True)
            except DrainTimeout as exc:
                if left <= DRAIN_SLICE_S:
                    return _DrainOutcome(False, pending=exc.pending)
            except PoolBroken as exc:
                return _DrainOutcome(False, why=f"pool broken: {exc}")

    def _drain_request(self, args: dict[str, Any], respond: Respond) -> None:
        assert self.ingress is not None
        timeout = float(args.get("timeout", self.config.supervisor.stop_timeout_s))
        log.info("drain requested: stopping intake, waiting up to %.1f s", timeout)
        if self._demo is not None:
            # First, so that the demo's own messages are not answered 'draining'.
            self._demo.stop()
        self.ingress.stop_intake(P.E_DRAINING)
        self.state = "draining"
        self._notify.status(self._status_text())
        undrains = self._undrain_requests
        outcome = self._drain(
            time.monotonic() + timeout,
            lambda: self._stopping() or self._undrain_requests != undrains,
        )
        if outcome.why is not None and not self._stopping() and self._undrain_requests != undrains:
            log.info("drain called off: intake is being reopened (shardpool undrain)")
            respond(False, {"error": "drain called off: intake reopened (shardpool undrain)"})
        elif outcome.why is not None:
            respond(False, {"error": outcome.why})
        elif not outcome.drained:
            respond(True, {"drained": False, "pending": outcome.pending})
        else:
            self.state = "drained"
            self._notify.status(self._status_text())
            log.info("drained: every accepted message is finished; intake stays closed")
            respond(True, {"drained": True, "pending": 0})

    def _undrain_request(self, respond: Respond) -> None:
        """Reopen intake after a drain (main loop): producers are accepted again, the demo
        load (if any) starts again, the state goes back to ``running``."""
        assert self.ingress is not None
        if self.state in ("stopping", "stopped") or not self.ingress.resume_intake():
            respond(False, {"error": "undrain: the backend is shutting down"})
            return
        was = self.state
        self.state = "running"
        if was in ("draining", "drained"):
            log.info("undrain: intake reopened (was %s); accepting messages again", was)
        else:
            log.info("undrain: intake was open already")
        if self._demo is not None and not self._demo.running:
            self._demo.start()
        self._notify.status(self._status_text())
        respond(True, {"intake": "open", "was": was})

    def _shutdown(self, reason: str) -> int:
        """Phases: stop intake, drain, stop the pool (hand back), close sockets."""
        assert self.pool is not None and self.ingress is not None
        self.state = "stopping"
        self._notify.stopping(f"stopping ({reason}): draining")
        stop_timeout = self.config.supervisor.stop_timeout_s
        deadline = time.monotonic() + stop_timeout
        log.info("shutting down (%s): phase 1/4 stop intake", reason)
        if self._demo is not None:
            self._demo.stop()
        self.ingress.stop_intake(P.E_SHUTTING_DOWN)
        broken = self.pool.broken
        log.info(
            "phase 2/4 drain: %d messages in flight, up to %.1f s", self._inflight(), stop_timeout
        )
        grace = stop_grace(stop_timeout)
        drained = not broken and self._drain(deadline - grace, self._forced).drained
        forced = self._forced()
        if forced:
            log.warning("second signal: stopping now without waiting for the drain")
        log.info("phase 3/4 stop workers")
        self._notify.status("stopping: stopping workers")
        left = 0.0 if forced else max(grace, deadline - time.monotonic())
        report = self.pool.close(left, drain=False)
        if self.dead_letters is not None:
            self.dead_letters.close()
        unfinished = len(report.unfinished)
        in_doubt = len(report.in_doubt)
        if unfinished or in_doubt:
            log.warning(
                "%d accepted messages were never handed to the handler (their producers get a "
                "'closed' reply: safe to send again) and %d may have been applied when their "
                "worker was stopped (their producers get an 'in_doubt' reply)",
                unfinished,
                in_doubt,
            )
        log.info("phase 4/4 close sockets")
        self.ingress.close(0.5 if forced else 2.0)
        ing = self.ingress.stats()
        clean = (
            drained
            and report.drained
            and not unfinished
            and not in_doubt
            and not broken
            and not forced
            and self._failed is None
        )
        with self._exit_lock:
            self.exit_code = EXIT_OK if clean else EXIT_FAILURE
            waiters, self._exit_waiters = self._exit_waiters, []
        for respond in waiters:
            # Before the control socket closes (it sends the replies already due first).
            respond(True, {"stopped": True, "pid": os.getpid(), "exit_code": self.exit_code})
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        for lock in self._locks:
            lock.release()
        self._locks.clear()
        self.state = "stopped"
        log.info(
            "stopped: %d messages accepted from producers, %d unfinished, %d in doubt%s; exit "
            "code %d",
            ing["accepted"],
            unfinished,
            in_doubt,
            f", pool broken: {broken}" if broken else "",
            self.exit_code,
        )
        return self.exit_code

    def _inflight(self) -> int:
        try:
            assert self.pool is not None
            return int(self.pool.stats(timeout=0.5)["inflight"])
        except Exception:  # noqa: BLE001
            return -1

    # -- figures -----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What a control ``ping`` answers: identity and endpoints."""
        return {
            "pid": os.getpid(),
            "version": __version__,
            "state": self.state,
            "intake": self._intake(),
            "ingress": self.ingress_endpoint,
            "control": self.control_endpoint,
            "metrics": self.metrics_url,
            "config": self.config.source,
            "workers": self.workers(),
        }

    def _intake(self) -> str:
        """``open`` (accepting messages), ``closed (draining)``, ``closed (drained)`` or
        ``closed (shutting down)``."""
        if self.state == "running" and (self.ingress is None or self.ingress.accepting):
            return "open"
        if self.state in ("draining", "drained"):
            return f"closed ({self.state})"
        if self.state in ("stopping", "stopped"):
            return "closed (shutting down)"
        return "closed"

    def _front_figures(self) -> dict[str, Any]:
        """The front process's own row: pid, CPU% since the last snapshot, RSS, threads."""
        try:
            with self._front.oneshot():
                return {
                    "pid": self._front.pid,
                    "cpu_percent": self._front.cpu_percent(None),
                    "rss_bytes": self._front.memory_info().rss,
                    "threads": self._front.num_threads(),
                }
        except psutil.Error:
            return {"pid": self._front.pid}

    def snapshot(self, timeout: float = 2.0) -> dict[str, Any]:
        """Everything ``shardpool status`` shows, as plain values (channel ids in hex; keys as
        :meth:`Figures.snapshot`, ``service`` being :meth:`info` plus ``uptime_s`` and ``front``:
        the front process's pid, cpu_percent, rss_bytes, threads). Waits up to ``timeout`` seconds
        for the workers' figures.

        Raises:
            as :meth:`ShardPool.stats`.
        """
        assert self.pool is not None and self.ingress is not None
        stats = self.pool.stats(timeout)
        snap = self._figures.snapshot(
            {
                **self.info(),
                "uptime_s": time.monotonic() - self._started,
                "front": self._front_figures(),
            },
            stats,
            self.ingress.stats(),
            self._demo.stats() if self._demo is not None else None,
        )
        if self.dead_letters is not None:
            snap["dead_letters"] = self.dead_letters.figures()
        return snap


_PLACEMENT_OPS = ("move", "pin", "unpin", "resize", "roll")


def _int_arg(args: dict[str, Any], key: str) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {value!r}")
    return value


def _timeout_arg(args: dict[str, Any]) -> float | None:
    value = args.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise BadRequest(f"timeout must be a number of seconds above 0, got {value!r}")
    return float(value)


def _channel_arg(args: dict[str, Any]) -> bytes:
    """The channel id of ``args["channel"]`` (hex).

    Raises:
        BadRequest: not a string, not hex, empty or too long.
    """
    text = args.get("channel")
    if not isinstance(text, str):
        raise BadRequest(f"channel must be a channel id in hex, got {text!r}")
    try:
        cid = bytes.fromhex(text)
    except ValueError:
        raise BadRequest(
            f"channel {text!r} is not hex: give the channel id in hex, as status shows it"
        ) from None
    try:
        return check_channel_id(cid)
    except ShardPoolError as exc:  # ChannelIdError
        raise BadRequest(f"channel {text!r}: {exc}") from None


def _slot_list(slots: list[int]) -> str:
    shown = ", ".join(map(str, slots[:8])) + (", …" if len(slots) > 8 else "")
    return f"slot {shown}" if len(slots) == 1 else f"{len(slots)} slots ({shown})"


def _resize_error(workers: int, exc: MoveRefused) -> str:
    text = str(exc)
    return text if text.startswith("resize to") else f"resize to {workers} workers: {text}"


def _move_reply(move: Move) -> dict[str, Any]:
    """What the control socket answers for a move (committed, or still under way)."""
    return move.report(time.monotonic())


class _DrainOutcome(NamedTuple):
    drained: bool
    pending: int = 0  # still unfinished at the deadline
    why: str | None = None  # why it stopped before the deadline without draining


class _WorkerPinning:
    """``pool.pin_workers``: worker i on the i-th CPU this process may use (round-robin)."""

    def __init__(self) -> None:
        self._pinned: dict[int, int] = {}  # worker index -> the pid pinned

    def apply(self, pids: list[int | None]) -> None:
        """Pin every worker not pinned yet, and a restarted one again (a new pid in its slot).
        A worker that cannot be pinned is logged, never raised for."""
        cpus = sorted(psutil.Process().cpu_affinity() or [])
        if not cpus:
            return
        for i, pid in enumerate(pids):
            if pid is None or self._pinned.get(i) == pid:
                continue
            cpu = cpus[i % len(cpus)]
            try:
                psutil.Process(pid).cpu_affinity([cpu])
                self._pinned[i] = pid
                log.info("worker %d (pid %d) pinned to CPU %d", i, pid, cpu)
            except psutil.Error as exc:
                log.warning("could not pin worker %d (pid %d): %s", i, pid, exc)
