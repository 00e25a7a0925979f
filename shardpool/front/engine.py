"""The front's producer side and its operations: intake, drain, operator decisions, stats, close.

:class:`Front` is the engine behind :class:`~shardpool.pool.ShardPool`; its I/O thread
(:class:`~.iothread.FrontIO`) does everything that waits on workers. They share the state below
under one lock (the attributes without a leading underscore).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from typing import Any

import zmq

from .. import codec, launch
from ..config import Config
from ..deadletters import DeadLetters
from ..errors import (
    ConfigError,
    DrainTimeout,
    MoveRefused,
    PayloadTooLarge,
    PoolBroken,
    PoolClosed,
    WorkerStartError,
)
from ..routing import Router, check_channel_id
from ..security import load_remote_keys
from ..supervisor import Supervisor
from ..wakeup import WakePipe
from . import operations, shutdown
from .balance import Balancer
from .channels import Channels, Halt, Route
from .iothread import FrontIO
from .link import Link
from .moves import Move, Mover
from .outcomes import FailureCallback, ResultCallback
from .remote import Remote
from .resize import Resizer
from .roll import Roller
from .shutdown import CloseReport
from .state import PoolState
from .window import DoneCallback, Window

__all__ = ["Front"]

log = logging.getLogger("shardpool.front")

_item_head = codec.ITEM_HEAD
_CSEQ, _PAYLOAD = codec.CSEQ_HEAD, codec.PAYLOAD_HEAD


class _Stopped(Exception):
    """:meth:`Front._submit_locked` stopped on ``error`` after accepting ``accepted`` messages."""

    def __init__(self, accepted: int, error: Exception) -> None:
        super().__init__(accepted, error)
        self.accepted = accepted
        self.error = error

class Front:
    """Routing, batching, in-flight windows and result delivery over a supervised set of workers.

    Thread-safe: any number of producer threads may call :meth:`submit_bytes` concurrently.
    """

    def __init__(
        self,
        config: Config,
        handler: Any = None,
        *,
        on_result: ResultCallback | None = None,
        on_failure: FailureCallback | None = None,
    ) -> None:
        """Start the workers of ``config`` and wait for every READY. ``handler`` (an object or
        ``"module:attr"``) replaces ``config.pool.handler`` when given.

        Raises:
            WorkerStartError: a worker failed to import/set up its handler (the worker's traceback
                is the ``__cause__``), died before READY, or missed the READY deadline.
            ConfigError: ``[remote]`` is insecure or incomplete (see
                :func:`~shardpool.security.load_remote_keys`), or remote workers are configured
                with a handler object.
            zmq.ZMQError: ``remote.bind`` cannot be bound.
        """
        self.cfg = config
        pool, transport = config.pool, config.transport
        self.handler = pool.handler if handler is None else handler
        self.on_result = on_result
        self.on_failure = on_failure
        # Messages that end failed under skip / skipped are recorded here when set (see
        # :mod:`shardpool.deadletters`; the I/O thread only queues, a thread of its own writes).
        self.dead_letters: DeadLetters | None = None
        self.lock = threading.Lock()
        self.cv = threading.Condition(self.lock)
        self.state = PoolState.RUNNING
        self.broken: PoolBroken | None = None
        self.start_error: BaseException | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            ("acknowledged", "results", "failures", "restarts", "replayed", "acks", "quarantined"),
            0,
        )
        self.room_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.stats_replies: dict[int, dict[int, dict[str, Any]]] = {}
        self.stats_ids = itertools.count(1)
        self.batch_parts = 1 + 3 * transport.batch_size
        self._max_inflight = transport.max_inflight
        self._limit = transport.max_inflight  # 0 when not running: one test on the hot path
        self._max_bytes = transport.max_message_bytes
        self._hold_max = pool.move_buffer_max
        self.linger = transport.batch_linger_ms / 1000.0  # seconds

        self.rundir = tempfile.mkdtemp(prefix="shardpool-", dir=transport.runtime_dir or None)
        os.chmod(self.rundir, 0o700)
        self.ctx = zmq.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.rcvhwm = 0
        self.pull.linger = 0
        self.front_endpoint = f"ipc://{self.rundir}/front"
        self.pull.bind(self.front_endpoint)
        self.wakeup = WakePipe()
        remote_ids = list(config.remote.workers) if config.remote.bind else []
        self.links = [
            Link(i, os.path.join(self.rundir, f"w{i}.run"))
            for i in range(pool.workers + len(remote_ids))
        ]
        # Remote workers (after the local ones) own no slot until they join.
        self.channels = Channels(Router(pool.slots, pool.workers), [k.window for k in self.links])
        self._routes = self.channels.routes
        self.io = FrontIO(self)
        self.mover = Mover(self)
        self.resizer = Resizer(self)
        self.roller = Roller(self)
        self.balancer = Balancer(self)
        self.remote: Remote | None = None
        if remote_ids:
            try:
                if not isinstance(self.handler, str):
                    raise ConfigError([(
                        "pool.handler", type(self.handler).__name__,
                        'a "module:attribute" reference when remote.workers is set: a remote '
                        "worker imports the handler on its own host (an object cannot be sent)",
                    )])
                self.remote = Remote(self, load_remote_keys(config), pool.workers)
            except BaseException:
                self._release_early()
                raise
        self.sup = Supervisor(
            pool.workers, config.supervisor, self.io.make_process, stop_remote=self._stop_remote
        )
        for _ in remote_ids:
            self.sup.add(remote=True)
        self._thread = threading.Thread(target=self.io.main, name="shardpool-front", daemon=True)
        launch.hold()  # released by teardown, once
        self._holds_launch = True
        self._thread.start()
        try:
            self._await_started()
        except BaseException:
            self.teardown(reap_timeout=0.5)
            raise

    # -- producer side -------------------------------------------------------------------------

    def submit_bytes(
        self,
        channel_id: bytes,
        payload: bytes,
        *,
        block: bool = True,
        on_done: DoneCallback | None = None,
    ) -> int:
        """Queue pre-encoded ``payload`` for ``channel_id``; returns its per-channel seq.

        Blocks while the worker's in-flight window is full (backpressure, never a drop).
        ``on_done(value, error)``, if given, is called once for this message (on the I/O thread)
        instead of ``on_result``/``on_failure``: with the handler's return value, or with the
        :class:`HandlerError` of a final failure, or with a :class:`PoolClosed` (or
        :class:`InDoubt`) error if the pool closed first. A halted message calls it only once
        resumed or skipped (and ``on_done.halted(error)``, if it has one, when it halts). The
        ``on_done`` calls (and ``halted`` notices) of one channel come in the order its messages
        were accepted; the ingress relies on it.

        Raises:
            ChannelIdError: ``channel_id`` is not bytes of 1..64 bytes.
            PayloadTooLarge: ``payload`` is longer than ``max_message_bytes``.
            PoolClosed / PoolBroken: the pool does not accept work any more.
            BlockingIOError: ``block=False`` and the window is full.
        """
        # The hot path of the whole pool: every line here runs once per message.
        size = len(payload)
        if size > self._max_bytes:
            raise PayloadTooLarge(
                f"payload is {size} bytes, over transport.max_message_bytes = {self._max_bytes}"
            )
        with self.lock:
            try:
                route = self._routes[channel_id]
            except (KeyError, TypeError):
                route = self.channels.route(channel_id)
            win = route.window
            if win.inflight - win.parked >= self._limit:  # full, or not running (limit 0)
                win = self._room_for(route, block)
            if route.held is not None:
                # Halted or moving: held here, in order, outside the window, so a parked channel
                # cannot fill its worker's window and stall the other channels.
                return self._hold(route, payload, on_done, block)
            cseq = route.next_seq
            route.next_seq = cseq + 1
            win.inflight += 1
            parts = win.parts
            if on_done is not None:
                win.waiters[win.next_wseq + (len(parts) - 1) // 3 if parts else win.next_wseq] = (
                    on_done
                )
            if parts:
                parts += (route.prefix, _item_head(_CSEQ, cseq, _PAYLOAD, size), payload)
                if len(parts) >= self.batch_parts:
                    self.links[win.index].flush()
            else:
                parts += (b"", route.prefix, _item_head(_CSEQ, cseq, _PAYLOAD, size), payload)
                self.batch_started(win)
            return cseq

    def submit_many_bytes(self, items: Iterable[tuple[bytes, bytes]]) -> int:
        """Submit ``(channel_id, payload)`` pairs in order; returns how many were accepted.

        The same semantics as calling :meth:`submit_bytes` for each pair (blocking while a window
        is full), at a lower cost per message: the lock is taken once per chunk of
        ``batch_size`` messages and released between chunks so acknowledgements keep flowing.
        On an error the pairs before the bad one are accepted, the rest are not.

        Raises: as :meth:`submit_bytes`.
        """
        it = iter(items)
        chunk = self.cfg.transport.batch_size
        accepted = 0
        while True:
            pairs = list(itertools.islice(it, chunk))
            if not pairs:
                return accepted
            with self.lock:
                accepted += self._submit_locked(pairs, None, True)

    def submit_chunk(
        self, pairs: list[tuple[bytes, bytes]], on_done: list[DoneCallback]
    ) -> int:
        """Submit ``pairs`` in order under one lock, ``on_done[i]`` for ``pairs[i]`` (as
        :meth:`submit_bytes` with ``block=False``), up to the first whose window is full: returns
        how many were accepted (``len(pairs)``: all). The ingress submits a producer's frame so.

        Raises: as :meth:`submit_bytes` for the first pair (for a later one, the pairs before it
        are accepted and their count is returned; the next call raises).
        """
        with self.lock:
            try:
                return self._submit_locked(pairs, on_done, False)
            except _Stopped as stop:
                if stop.accepted == 0:
                    raise stop.error from None
                return stop.accepted

    def _submit_locked(  # noqa: C901 - the hot path, one function on purpose
        self,
        pairs: list[tuple[bytes, bytes]],
        on_done: list[DoneCallback] | None,
        block: bool,
    ) -> int:
        """The hot path of :meth:`submit_bytes` for many messages (lock held). Returns how many
        were accepted: all, or with ``block=False`` those before the first full window.

        Raises: as :meth:`submit_bytes`; with ``on_done`` given, wrapped in :class:`_Stopped`
        (which says how many were accepted before).
        """
        routes = self._routes
        max_bytes = self._max_bytes
        batch_parts = self.batch_parts
        links = self.links
        accepted = 0
        try:
            for channel_id, payload in pairs:
                size = len(payload)
                if size > max_bytes:
                    raise PayloadTooLarge(
                        f"payload is {size} bytes, over transport.max_message_bytes = "
                        f"{max_bytes}"
                    )
                try:
                    route = routes[channel_id]
                except (KeyError, TypeError):
                    route = self.channels.route(channel_id)
                win = route.window
                if win.inflight - win.parked >= self._limit:
                    try:
                        win = self._room_for(route, block)
                    except BlockingIOError:
                        return accepted
                done = None if on_done is None else on_done[accepted]
                if route.held is not None:
                    try:
                        self._hold(route, payload, done, block)
                    except BlockingIOError:
                        return accepted
                    accepted += 1
                    continue
                accepted += 1
                cseq = route.next_seq
                route.next_seq = cseq + 1
                win.inflight += 1
                parts = win.parts
                if done is not None:
                    win.waiters[
                        win.next_wseq + (len(parts) - 1) // 3 if parts else win.next_wseq
                    ] = done
                if parts:
                    parts += (route.prefix, _item_head(_CSEQ, cseq, _PAYLOAD, size), payload)
                    if len(parts) >= batch_parts:
                        links[win.index].flush()
                else:
                    parts += (b"", route.prefix, _item_head(_CSEQ, cseq, _PAYLOAD, size), payload)
                    self.batch_started(win)
        except Exception as exc:
            if on_done is None:
                raise
            raise _Stopped(accepted, exc) from exc
        return accepted

    def request_bytes(self, channel_id: bytes, payload: bytes) -> concurrent.futures.Future[Any]:
        """Like :meth:`submit_bytes`, but returns a future of the handler's result.

        The future raises :class:`HandlerError` if the handler failed on this message.
        """
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def done(value: Any, error: BaseException | None) -> None:
            if not fut.set_running_or_notify_cancel():
                return
            if error is None:
                fut.set_result(value)
            else:
                fut.set_exception(error)

        self.submit_bytes(channel_id, payload, on_done=done)
        return fut

    def _hold(
        self, route: Route, payload: bytes, on_done: DoneCallback | None, block: bool
    ) -> int:
        """Number a message of a halted or moving channel and hold it at the front (lock held).
        A move holds at most ``pool.move_buffer_max`` messages: past that, only producers of
        its channels wait (before their message is numbered, so the order stays the arrival
        order); if the move ends meanwhile, the message goes out the normal way.

        Raises:
            BlockingIOError: ``block=False`` and the move's buffer is full.
            PoolClosed / PoolBroken: the pool stopped while waiting.
        """
        while (move := route.move) is not None and move.held >= self._hold_max:
            if not block:
                raise BlockingIOError("the channel is moving and its buffer is full")
            if self.state != PoolState.RUNNING:
                raise self.not_running_error()
            self.cv.wait(0.5)
        cseq = route.next_seq
        route.next_seq = cseq + 1
        if route.held is None:  # the move ended while we waited
            self.place(route, cseq, payload, on_done, route.window)
            return cseq
        route.held.append((cseq, payload, on_done))
        if move is not None:
            move.held += 1
        return cseq

    def place(
        self,
        route: Route,
        cseq: int,
        payload: bytes,
        on_done: DoneCallback | None,
        win: Window,
    ) -> None:
        """Put an already-numbered message of ``route``'s channel into ``win`` (lock held): the
        slow-path twin of the hot path in :meth:`submit_bytes`."""
        if win.place(route.prefix, cseq, payload, on_done):
            self.batch_started(win)
        elif len(win.parts) >= self.batch_parts:
            self.links[win.index].flush()

    def batch_started(self, win: Window) -> None:
        """A message opened a new batch (lock held): send it now if the worker is idle, else
        let the I/O thread flush it when the linger runs out (unless it fills up first)."""
        if win.inflight == 1 or self.linger <= 0:
            # Nothing in flight: the worker is idle, and holding the message back gains nothing.
            self.links[win.index].flush()
        else:
            # Something is in flight, so the I/O thread is polling with the linger as timeout
            # and flushes this batch on the next acknowledgement or when the linger runs out;
            # no wake-up needed (one per batch would cost a GIL round trip each).
            win.batch_t0 = time.monotonic()

    def _room_for(self, route: Route, block: bool) -> Window:
        """Wait (lock held by caller, released while waiting) until the window of ``route``'s
        channel has room, and return that window: a move may commit while the lock is released,
        and then the channel's messages go to its new worker, never to the window waited on."""
        while True:
            win = route.window
            self._wait_room(win, block)
            if route.window is win:
                return win

    def _wait_room(self, win: Window, block: bool) -> None:
        """Wait (lock held by caller, released while waiting) until ``win`` has room."""
        while True:
            if self.state != PoolState.RUNNING:
                raise self.not_running_error()
            if win.inflight - win.parked < self._max_inflight:
                return
            if not block:
                raise BlockingIOError("in-flight window full")
            if threading.current_thread() is self._thread:
                # A result callback submitting more work: blocking here would stop the very
                # thread that frees the window, so let it overshoot instead.
                return
            self.cv.wait(0.5)

    def not_running_error(self) -> Exception:
        """The error a producer gets once the pool stopped taking work: the one that broke it
        (with its cause), or :class:`PoolClosed`."""
        if self.state == PoolState.BROKEN and self.broken is not None:
            return self.broken
        return PoolClosed("the pool is closed")

    def channel_worker(self, channel_id: bytes) -> int:
        """The worker index that serves ``channel_id`` now (its pin, else its slot's owner)."""
        return self.channels.worker_of(check_channel_id(channel_id))

    async def wait_room_async(self, channel_id: bytes) -> None:
        """Return once ``channel_id``'s worker has room in its window (or the pool stopped)."""
        loop = asyncio.get_running_loop()
        while True:
            with self.lock:
                if self.state != PoolState.RUNNING:
                    raise self.not_running_error()
                route = self._routes.get(channel_id)
                win = route.window if route is not None else self.links[
                    self.channel_worker(channel_id)
                ].window
                if win.inflight - win.parked < self._max_inflight:
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self.room_waiters.append((loop, fut))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, 0.5)

    # -- draining, operating, stats ------------------------------------------------------------

    def flush(self) -> None:
        """Send every pending batch now."""
        with self.lock:
            self.flush_pending()

    def flush_pending(self) -> None:
        """Send every pending batch (lock held)."""
        for link in self.links:
            if link.window.parts:
                link.flush()

    def unfinished(self) -> int:
        """Messages in flight that are not parked behind a halted channel (lock held)."""
        return sum(k.window.inflight - k.window.parked for k in self.links)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every accepted message is processed or failed (halted channels excepted).

        Raises:
            DrainTimeout: ``timeout`` seconds passed first.
            PoolBroken: the pool broke while waiting.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self.flush_pending()
            while True:
                left = self.unfinished()
                if left == 0:
                    return
                if self.state == PoolState.BROKEN:
                    raise self.not_running_error()
                wait = 0.5
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DrainTimeout(
                            f"{left} messages still in flight after {timeout} s", pending=left
                        )
                    wait = min(wait, remaining)
                self.cv.wait(wait)

    def control(self, channel_id: bytes, op: str) -> None:
        """An operator's ``resume`` or ``skip`` of a halted channel (see
        :func:`.operations.control`).

        Raises:
            NotHalted: the channel is not halted.
        """
        operations.control(self, channel_id, op)

    def move(
        self, slots: list[int], worker: int, *, timeout: float | None = None
    ) -> Move:
        """Move ``slots`` to ``worker`` without losing or reordering anything (see
        :mod:`.moves` and :func:`.operations.move`).

        Raises:
            MoveRefused: it could not start, or it was called off.
        """
        return operations.move(self, tuple(slots), (), worker, "operator", timeout)

    def pin(
        self, channel_id: bytes, worker: int | None = None, *, timeout: float | None = None
    ) -> Move | None:
        """Place ``channel_id`` on ``worker`` ahead of the slot table (:func:`.operations.pin`)."""
        return operations.pin(self, channel_id, worker, timeout)

    def unpin(self, channel_id: bytes, *, timeout: float | None = None) -> Move | None:
        """Send a pinned channel back to its slot's worker (:func:`.operations.unpin`)."""
        return operations.unpin(self, channel_id, timeout)

    def resize(self, workers: int, *, timeout: float | None = None, wait: bool = True) -> None:
        """Change the worker count to ``workers`` while running (see :mod:`.resize`); with
        ``wait``, return once it is done (``timeout`` seconds at most; None: no limit).

        Raises:
            MoveRefused: a bad count, the pool is not running, or the resize was called off.
            DrainTimeout: ``timeout`` passed first (the resize goes on).
        """
        with self.lock:
            if self.roller.busy():
                raise MoveRefused("a rolling restart is under way")
            gen = self.resizer.request(workers)
            if not wait:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self.resizer.finished(gen):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DrainTimeout(
                        f"resize to {workers} workers not done within {timeout} s "
                        f"({len(self.links)} workers now; it goes on)",
                        pending=len(self.mover.moves),
                    )
                self.cv.wait(left)
            if self.resizer.generation == gen and self.resizer.error is not None:
                raise MoveRefused(f"resize to {workers} workers called off: {self.resizer.error}")

    def roll(self, *, timeout: float | None = None, wait: bool = True) -> None:
        """Replace every worker process by a fresh one, one at a time, through slot moves (see
        :mod:`.roll`); with ``wait``, return once done (``timeout`` seconds at most; None: no
        limit).

        Raises:
            MoveRefused: the pool is not running, a roll or resize is under way, or the roll was
                called off.
            DrainTimeout: ``timeout`` passed first (the roll goes on).
        """
        with self.lock:
            gen = self.roller.request()
            if not wait:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self.roller.finished(gen):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DrainTimeout(
                        f"rolling restart not done within {timeout} s ({self.roller.rolled} "
                        f"of {self.roller.total} workers replaced; it goes on)",
                        pending=self.roller.total - self.roller.rolled,
                    )
                self.cv.wait(left)
            if self.roller.generation == gen and self.roller.error is not None:
                raise MoveRefused(f"rolling restart called off: {self.roller.error}")

    def halted_channels(self) -> dict[bytes, int]:
        """Channels parked by the halt policy (or quarantined) → seq they are halted on."""
        with self.lock:
            return {cid: halt.seq for cid, halt in self.channels.halts.items()}

    def halts(self) -> dict[bytes, Halt]:
        """Every halted (or quarantined) channel → why and since when."""
        with self.lock:
            return dict(self.channels.halts)

    def placement(self) -> dict[str, Any]:
        """Slots per worker, pins and moves, from the front alone (see
        :func:`.operations.placement`): answers at once, even while workers are busy."""
        with self.lock:
            return operations.placement(self)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Front counters and a fresh per-worker report (see :func:`.operations.stats`)."""
        return operations.stats(self, timeout)

    def worker_pids(self) -> list[int | None]:
        """Current pid of each worker (None while it is not running)."""
        with self.lock:
            return self.sup.pids()

    def _await_started(self) -> None:
        deadline = time.monotonic() + self.cfg.supervisor.ready_timeout_s + 5.0
        with self.lock:
            while True:
                if self.start_error is not None:
                    raise self.start_error
                if self.sup.all_ready():
                    return
                if time.monotonic() > deadline:  # the I/O thread enforces the real deadline
                    raise WorkerStartError("workers did not report READY in time")
                self.cv.wait(0.2)

    def _stop_remote(self, index: int) -> None:
        assert self.remote is not None
        self.remote.stop(index)

    def _release_early(self) -> None:
        """Undo what ``__init__`` made before a failure that comes before the I/O thread."""
        for link in self.links:
            link.run_slot.close()
        self.pull.close(linger=0)
        self.ctx.term()
        self.wakeup.close()
        shutil.rmtree(self.rundir, ignore_errors=True)

    def set_state(self, state: PoolState) -> None:
        """Change the pool state (lock held); anything but running shuts the window."""
        self.state = state
        self._limit = self._max_inflight if state == PoolState.RUNNING else 0

    def break_pool(self, err: PoolBroken) -> None:
        """Mark the pool broken (lock held): producers get ``err``, nothing restarts any more."""
        if self.state in (PoolState.BROKEN, PoolState.CLOSED):
            return
        err.exitcodes.update(self.sup.exitcodes())
        log.error("pool broken: %s", err)
        self.set_state(PoolState.BROKEN)
        self.mover.halt()
        self.resizer.halt()
        self.roller.halt()
        self.broken = err
        self.sup.halt()
        self.cv.notify_all()

    # -- shutdown ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state == PoolState.CLOSED

    def close(self, timeout: float | None = None, *, drain: bool = True) -> CloseReport:
        """Shut down in phases (see :func:`.shutdown.close`): stop intake, drain (unless
        ``drain`` is false), stop the workers, report every message that did not finish, reap,
        all within ``timeout`` seconds (default ``stop_timeout_s``). Idempotent."""
        return shutdown.close(self, timeout, drain=drain)

    def release_room_waiters(self) -> None:
        """Wake every ``wait_room_async`` (lock held): room may have opened, or the pool
        stopped."""
        if self.room_waiters:
            for loop, fut in self.room_waiters:
                loop.call_soon_threadsafe(_set_done, fut)
            self.room_waiters.clear()

    def teardown(self, reap_timeout: float) -> dict[int, int | None]:
        """Stop the I/O thread, reap the workers (waiting up to ``reap_timeout`` seconds, then
        SIGTERM, then SIGKILL), release sockets and the runtime directory; the exit codes."""
        with self.lock:
            self.set_state(PoolState.CLOSED)
            self.sup.halt()
            self.cv.notify_all()
        self.wakeup.wake()
        self._thread.join(5.0)
        codes = self.sup.reap_all(reap_timeout)
        for link in self.links:
            link.disconnect()
            link.run_slot.close()
        if self.remote is not None:
            self.remote.close()
        self.pull.close(linger=0)
        self.ctx.term()
        self.wakeup.close()
        shutil.rmtree(self.rundir, ignore_errors=True)
        if self._holds_launch:  # the last pool to go stops the fork server
            self._holds_launch = False
            launch.release()
        return codes


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
