"""``shardpool run``: the node backend — pool, ingress, control socket and metrics in one process.

Start-up order (each step cleaned up if a later one fails): check the endpoints' security (before
any socket exists), lock the ipc endpoints, start the pool (workers READY), bind the ingress, start
the metrics server, pin the workers if asked, and bind the control socket *last*, so that a
control ``ping`` answering means the whole backend is ready.

The main thread then only waits: signal handlers record the signal (and ZeroMQ-free wake-up goes
through :func:`signal.set_wakeup_fd`), control requests that need it (drain, stop) are queued to
it, and once a second it samples the figures that ``status`` turns into rates and re-pins workers
that were restarted. Shutdown runs in explicit phases:

1. stop intake — the demo load stops and the ingress answers every new message ``shutting_down``;
2. drain — wait for every accepted message, within ``supervisor.stop_timeout_s`` (less the last
   part, kept for the workers to stop);
3. stop the pool — each worker finishes the call it is in and leaves (killed at the deadline);
   producers get ``closed`` for what never reached a handler and ``in_doubt`` for what a handler
   may have run when its worker was stopped; both counts are logged;
4. close the sockets (replies still due go out first) and release the endpoint locks.

A second signal (or stop request) during shutdown skips what is left of the drain and stops the
workers at once. Exit code 0 after a clean drain, 1 otherwise.
"""

from __future__ import annotations

import collections
import heapq
import logging
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import psutil

from . import __version__
from . import protocol as P
from .config import Config
from .control import ControlServer, Respond
from .errors import ConfigError, DrainTimeout, HandlerError, PoolBroken, ShardPoolError
from .ingress import Ingress, IngressSettings, _RateLimitedLog
from .metrics import MetricsServer
from .front import stop_grace
from .pool import ShardPool
from .wakeup import WakePipe
from .security import (
    EndpointLock,
    check_endpoints,
    ensure_private_dir,
    lock_endpoint,
    prepare_ipc,
    resolve_endpoints,
    runtime_dir,
)

log = logging.getLogger("shardpool.service")

__all__ = ["DEMO_DEFAULT_RATE", "EXIT_FAILURE", "EXIT_OK", "Service"]

EXIT_OK = 0
EXIT_FAILURE = 1

DEMO_DEFAULT_RATE = 10_000.0
"""Messages per second ``--demo-load`` sends when no rate is given."""

SAMPLE_INTERVAL_S = 1.0
HOT_TOP_K = 10
_RATE_MIN_AGE_S = 0.5  # rates are computed against a sample at least this old (seconds)


class Service:
    """The backend. ``start()`` then ``serve()`` (blocks until signalled or stopped), or, for
    in-process use and tests, ``start()``, then ``stop()`` from the same thread.

    Args:
        config: the validated configuration.
        demo_load: drive the built-in Lightning traffic generator through the ingress at this
            many messages per second (0 = as fast as the pool takes them; None = off).
        env: environment for the default runtime directory (default ``os.environ``).
    """

    def __init__(
        self,
        config: Config,
        *,
        demo_load: float | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
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
        self._demo: _DemoLoad | None = None
        # Recorded by signal handlers / other threads, acted on by the main loop.
        self._signals: list[int] = []
        self._stop_requests = 0
        self._requests: collections.deque[tuple[str, dict[str, Any], Respond]] = collections.deque()
        self._wakeup = WakePipe()
        self._samples: collections.deque[tuple[float, int, int, dict[int, tuple[int, int]]]] = (
            collections.deque(maxlen=32)
        )
        self._sample_lock = threading.Lock()
        self._pinned: dict[int, int] = {}
        self._started = time.monotonic()
        self._failure_log = _RateLimitedLog(log, 10.0)
        self.exit_code: int | None = None
        self._failed: str | None = None

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
            if not cfg.ingress.endpoint or not cfg.control.endpoint:
                ensure_private_dir(runtime_dir(cfg, self._env))
            for endpoint, key in (
                (self.ingress_endpoint, "ingress.endpoint"),
                (self.control_endpoint, "control.endpoint"),
            ):
                prepare_ipc(endpoint, key)
                lock = lock_endpoint(endpoint)
                if lock is not None:
                    self._locks.append(lock)
            self.pool = ShardPool(config=cfg, on_failure=self._on_failure)
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
                self._pin_workers()
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
            cfg.pool.workers,
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
            self._demo = _DemoLoad(self.ingress_endpoint, self._demo_rate)
            self._demo.start()

    def _teardown(self) -> None:
        """Release whatever :meth:`start` got to, in reverse order (a failed start)."""
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.pool is not None:
            self.pool.close(0.0)
        if self.ingress is not None:
            self.ingress.close(0.0)
        for lock in self._locks:
            lock.release()
        self._locks.clear()
        self._wakeup.close()

    # -- hooks called from other threads -----------------------------------------------------

    def _on_failure(self, err: HandlerError) -> None:
        # Pool I/O thread: failures that do not finish their message (halt) reach producers as a
        # HALTED notice through the ingress; all are logged, rate-limited per exception type.
        if self.ingress is not None:
            self.ingress.on_failure(err)
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
        elif op == "drain":
            self._requests.append((op, args, respond))
            self._wake()
        elif op == "stop":
            respond(True, {"stopping": True, "pid": os.getpid()})
            self.request_stop()
        elif op in ("resume", "skip"):
            # An operator's decision on a channel halted by the halt policy (the pool is
            # thread-safe, so the control thread may act directly).
            try:
                cid = bytes.fromhex(str(args.get("channel", "")))
                getattr(self.pool, op)(cid)
            except (ValueError, ShardPoolError) as exc:
                respond(False, {"error": str(exc)})
            else:
                respond(True, {op: cid.hex()})
        else:
            respond(
                False,
                {"error": f"unknown control op {op!r} (ping, status, drain, stop, resume, skip)"},
            )

    # -- main loop ---------------------------------------------------------------------------

    def serve(self, install_signals: bool = True) -> int:
        """Run until SIGTERM/SIGINT or a stop request, then shut down in phases; return the exit
        code (0 after a clean drain). Signal handlers are installed only in the main thread."""
        restore: list[tuple[signal.Signals, Any]] = []
        old_fd: int | None = None
        if install_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                restore.append((sig, signal.signal(sig, self._on_signal)))
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

    def stop(self) -> int:
        """Shut down from the thread that called :meth:`start` (in-process use); returns the
        exit code."""
        try:
            return self._shutdown("stop()")
        finally:
            self._wakeup.close()

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
            while self._requests:
                op, args, respond = self._requests.popleft()
                if op == "drain":
                    self._drain_request(args, respond)
            now = time.monotonic()
            if now >= next_tick:
                self._tick()
                next_tick = now + SAMPLE_INTERVAL_S
            self._sleep(next_tick - time.monotonic())

    def _tick(self) -> None:
        try:
            self.snapshot(timeout=1.0)
            if self.config.pool.pin_workers:
                self._pin_workers()
        except Exception:  # noqa: BLE001 - sampling must never take the backend down
            log.exception("periodic sample failed")

    def _drain_until(self, deadline: float) -> bool:
        """Wait for every accepted message until ``deadline`` (monotonic seconds); False on
        timeout, a broken pool, or a forced stop. Waits in slices so signals are seen."""
        assert self.pool is not None
        while True:
            if self._forced():
                return False
            left = deadline - time.monotonic()
            try:
                self.pool.drain(max(0.0, min(0.2, left)))
                return True
            except DrainTimeout:
                if left <= 0.2:
                    return False
            except PoolBroken:
                return False

    def _drain_request(self, args: dict[str, Any], respond: Respond) -> None:
        assert self.pool is not None and self.ingress is not None
        timeout = float(args.get("timeout", self.config.supervisor.stop_timeout_s))
        log.info("drain requested: stopping intake, waiting up to %.1f s", timeout)
        self.ingress.stop_intake(P.E_DRAINING)
        self.state = "draining"
        if self._demo is not None:
            self._demo.stop()
        deadline = time.monotonic() + timeout
        while True:
            if self._stopping():
                respond(False, {"error": "interrupted: the backend is shutting down"})
                return
            left = deadline - time.monotonic()
            try:
                self.pool.drain(max(0.0, min(0.2, left)))
                break
            except DrainTimeout as exc:
                if left <= 0.2:
                    self.state = "draining"
                    respond(True, {"drained": False, "pending": exc.pending})
                    return
            except PoolBroken as exc:
                respond(False, {"error": f"pool broken: {exc}"})
                return
        self.state = "drained"
        log.info("drained: every accepted message is finished; intake stays closed")
        respond(True, {"drained": True, "pending": 0})

    def _shutdown(self, reason: str) -> int:
        """Phases: stop intake, drain, stop the pool (hand back), close sockets."""
        assert self.pool is not None and self.ingress is not None
        self.state = "stopping"
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
        drained = False if broken else self._drain_until(deadline - grace)
        forced = self._forced()
        if forced:
            log.warning("second signal: stopping now without waiting for the drain")
        log.info("phase 3/4 stop workers")
        left = 0.0 if forced else max(grace, deadline - time.monotonic())
        report = self.pool.close(left, drain=False)
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
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        for lock in self._locks:
            lock.release()
        self._locks.clear()
        clean = (
            drained
            and report.drained
            and not unfinished
            and not in_doubt
            and not broken
            and not forced
            and self._failed is None
        )
        self.exit_code = EXIT_OK if clean else EXIT_FAILURE
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
            "ingress": self.ingress_endpoint,
            "control": self.control_endpoint,
            "metrics": self.metrics_url,
            "config": self.config.source,
            "workers": self.config.pool.workers,
        }

    def snapshot(self, timeout: float = 2.0) -> dict[str, Any]:
        """Everything ``shardpool status`` shows, as plain values (channel ids in hex).

        Keys: ``service`` (:meth:`info` + ``uptime_s``), ``pool`` (front counters; ``halted``
        lists every halted or quarantined channel: hex id, seq, since, error), ``workers``
        (per-worker figures of :meth:`ShardPool.stats` + ``processed_per_s``), ``order`` (summed
        gaps/duplicates/reorders), ``hot_channels`` (``[hex id, messages, worker]``, top
        :data:`HOT_TOP_K`), ``ingress`` (:meth:`Ingress.stats`), ``rates`` (``processed_per_s``,
        ``ingress_per_s``, over the last second or so) and ``demo_load`` (or None).
        """
        assert self.pool is not None and self.ingress is not None
        stats = self.pool.stats(timeout)
        for halt in stats["halted"]:
            halt["channel"] = bytes(halt["channel"]).hex()
        now = time.monotonic()
        ing = self.ingress.stats()
        workers: list[dict[str, Any]] = stats.pop("workers")
        prev = self._sample_before(now - _RATE_MIN_AGE_S)
        cur_workers = {w["index"]: (w.get("epoch", 0), w.get("processed", 0)) for w in workers}
        rates = {"processed_per_s": 0.0, "ingress_per_s": 0.0}
        if prev is not None:
            t0, acked0, accepted0, workers0 = prev
            dt = now - t0
            rates["processed_per_s"] = max(0.0, (stats["acknowledged"] - acked0) / dt)
            rates["ingress_per_s"] = max(0.0, (ing["accepted"] - accepted0) / dt)
            for w in workers:
                epoch, processed = cur_workers[w["index"]]
                old = workers0.get(w["index"])
                base = old[1] if old is not None and old[0] == epoch else 0
                w["processed_per_s"] = max(0.0, (processed - base) / dt)
        else:
            for w in workers:
                w["processed_per_s"] = 0.0
        with self._sample_lock:
            self._samples.append((now, stats["acknowledged"], ing["accepted"], cur_workers))
        order = {
            k: sum(int(w.get(k, 0)) for w in workers) for k in ("gaps", "duplicates", "reorders")
        }
        hot: list[tuple[int, str, int]] = []
        for w in workers:
            for cid, count in w.pop("hot_channels", None) or ():
                hot.append((count, bytes(cid).hex(), w["index"]))
        top = heapq.nlargest(HOT_TOP_K, hot)
        return {
            "service": {**self.info(), "uptime_s": now - self._started},
            "pool": stats,
            "workers": workers,
            "order": order,
            "hot_channels": [[cid, count, worker] for count, cid, worker in top],
            "ingress": ing,
            "rates": rates,
            "demo_load": self._demo.stats() if self._demo is not None else None,
        }

    def _sample_before(self, t: float) -> tuple[float, int, int, dict[int, tuple[int, int]]] | None:
        with self._sample_lock:
            for sample in reversed(self._samples):
                if sample[0] <= t:
                    return sample
        return None

    def _pin_workers(self) -> None:
        """Pin worker i to the i-th CPU this process may use (round-robin); re-pin restarted
        workers (a new pid in the slot)."""
        assert self.pool is not None
        cpus = sorted(psutil.Process().cpu_affinity() or [])
        if not cpus:
            return
        for i, pid in enumerate(self.pool.worker_pids()):
            if pid is None or self._pinned.get(i) == pid:
                continue
            cpu = cpus[i % len(cpus)]
            try:
                psutil.Process(pid).cpu_affinity([cpu])
                self._pinned[i] = pid
                log.info("worker %d (pid %d) pinned to CPU %d", i, pid, cpu)
            except psutil.Error as exc:
                log.warning("could not pin worker %d (pid %d): %s", i, pid, exc)


class _DemoLoad:
    """``--demo-load``: the built-in Lightning traffic generator as one producer on the ingress,
    in its own thread (with its own ZeroMQ context). Counts replies and protocol violations (the
    demo handler reports a violation when a channel's messages arrive out of order)."""

    PEERS = 50
    CHANNELS_PER_PEER = 20
    ROUND = 1_000_000  # messages per generated stream; each round uses fresh channels

    def __init__(self, endpoint: str, rate: float) -> None:
        self.endpoint = endpoint
        self.rate = rate
        self.sent = 0
        self.replies = 0
        self.violations = 0
        self.not_ok = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shardpool-demo-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5.0)

    def stats(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "replies": self.replies,
            "violations": self.violations,
            "not_ok": self.not_ok,
            "rate": self.rate,
        }

    def _run(self) -> None:
        from .client import Client
        from .demo.traffic import iter_encoded

        try:
            client = Client(self.endpoint, timeout=5.0)
        except Exception:  # noqa: BLE001
            log.exception("demo load could not connect to %s", self.endpoint)
            return
        log.info(
            "demo load: %s msg/s of Lightning traffic over %d channels through the ingress",
            f"{self.rate:g}" if self.rate else "as many",
            self.PEERS * self.CHANNELS_PER_PEER,
        )
        t0 = time.monotonic()
        next_log = t0 + 10.0
        seed = 0
        try:
            while not self._stop.is_set():
                for cid, payload in iter_encoded(
                    self.PEERS, self.CHANNELS_PER_PEER, self.ROUND, seed
                ):
                    while not self._stop.is_set():
                        try:
                            client.send_bytes(cid, payload, timeout=0.5)
                            break
                        except TimeoutError:
                            continue  # the pool is behind: flow control; try again
                    if self._stop.is_set():
                        break
                    self.sent += 1
                    if self.sent % 256 == 0:
                        self._count(client.poll())
                        now = time.monotonic()
                        if self.rate:
                            # Pacing, not synchronisation: wake early on stop.
                            ahead = t0 + self.sent / self.rate - now
                            if ahead > 0:
                                self._stop.wait(ahead)
                        if now >= next_log:
                            next_log = now + 10.0
                            log.info(
                                "demo load: %d sent (%.0f/s), %d replies, %d protocol violations",
                                self.sent,
                                self.sent / (now - t0),
                                self.replies,
                                self.violations,
                            )
                seed += 1
        except Exception:  # noqa: BLE001 - the demo must not take the backend down
            if not self._stop.is_set():
                log.exception("demo load stopped")
        finally:
            try:
                self._count(client.poll())
            except Exception:  # noqa: BLE001
                pass
            client.close(0)

    def _count(self, replies: list[Any]) -> None:
        for r in replies:
            self.replies += 1
            if not r.ok:
                self.not_ok += 1
            elif isinstance(r.value, dict) and "violation" in r.value:
                self.violations += 1
