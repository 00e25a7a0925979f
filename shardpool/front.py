"""The front: routing, batching, in-flight windows, result delivery and supervision.

::

  producer threads ── submit(cid, payload) ──┐
                                             │ route: xxh64(cid) % slots → slot table → worker i
                                             │ stamp: per-channel seq (cseq), per-worker seq (wseq)
                                             ▼
               ┌──── window[i]: every unacknowledged message, kept as the batches sent ─────────┐
               │ pending batch[i] ── flush when full, at i's next ack, on linger, or at once if
               │                     i is idle (Nagle) ───────────────────────────────────▶ PUSH i
               └────────────────────────────────────────────────────────────────────────────────┘
                                                                                   │ BATCH frames
                       worker 0 … worker N-1 (one asyncio loop each, FIFO per channel)
                                                                                   │ ACK / READY /
  I/O thread ◀── one PULL ◀────────────────────────────────────────────────────────┘ HEARTBEAT / …
    ├─ ACK: retire from the window (a whole batch at once when it can), deliver results and
    │  failures in per-channel order, wake blocked producers; drop the records of channels the
    │  worker forgot (ended, or idle past the expiry)
    ├─ sentinel readable: worker died → restart with backoff (crash-loop guard) → READY → replay the
    │  window to the new epoch, marked redelivered, before anything newer; the replay runs one
    │  message at a time, so a further death names its message (run slot) and a message that keeps
    │  killing its worker quarantines its channel instead of breaking the pool
    ├─ heartbeat silence past the timeout: kill the hung worker (then as above)
    └─ linger deadline: flush half-full batches

close(): stop intake → drain → SIGTERM (each worker finishes the call it is in, reports what is
running, acknowledges, says BYE) → kill what is left at the deadline → report every message not
finished as unfinished (never handed to a handler) or in doubt (a handler may have run it).

Producers only take the lock, append and occasionally send a full batch; everything that waits
(acknowledgements, deaths, timers) happens on the one I/O thread, which is also the only thread that
spawns workers (with SIGINT/SIGTERM blocked, so children inherit them blocked).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import itertools
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import zmq

from . import codec
from .config import Config
from .errors import (
    DrainTimeout,
    HandlerError,
    InDoubt,
    NotHalted,
    PayloadTooLarge,
    PoolBroken,
    PoolClosed,
    RemoteTraceback,
    WorkerStartError,
)
from .routing import Router, check_channel_id
from .supervisor import RestartGuard, WorkerProcess, describe_exit
from .wakeup import WakePipe
from .worker import EXIT_OK, FINAL_ACTIONS, NO_MESSAGE, RunSlot, WorkerSpec

log = logging.getLogger("shardpool.front")

ResultCallback = Callable[[bytes, int, Any], None]
DoneCallback = Callable[[Any, "BaseException | None"], None]
FailureCallback = Callable[[HandlerError], None]

# Link states.
STARTING = "starting"
READY = "ready"
DEAD = "dead"  # waiting for its restart
STOPPING = "stopping"
STOPPED = "stopped"
BROKEN = "broken"

# Pool states.
_RUNNING = "running"
_CLOSING = "closing"
_CLOSED = "closed"
_BROKEN = "broken"

_Entry = tuple[bytes, int, bytes]  # (channel_id, cseq, payload)
_item_head = codec.ITEM_HEAD  # (0x1B, cseq, 0x5A, payload length) → bytes

STOP_GRACE_S = 1.0
"""At most this much of a close's deadline is kept for the workers to finish the call they are in
after the drain (seconds); see :func:`stop_grace`."""


def stop_grace(timeout: float) -> float:
    """The part of a ``timeout``-second close that follows the drain: a quarter, at most
    :data:`STOP_GRACE_S` (seconds)."""
    return min(STOP_GRACE_S, timeout / 4)


@dataclass
class CloseReport:
    """What :meth:`Front.close` could not finish. Every accepted message ends in exactly one of:
    finished (its result or failure was delivered; a message its channel is halted on counts as
    failed), ``unfinished`` (never handed to a handler: safe to submit again) or ``in_doubt`` (a
    worker was stopped or died while its handler may have been running it). Both lists hold
    ``(channel_id, seq, payload)`` in per-channel order; ``exitcodes`` maps worker index to exit
    code; ``drained`` is True when both are empty."""

    unfinished: list[_Entry] = field(default_factory=list)
    in_doubt: list[_Entry] = field(default_factory=list)
    exitcodes: dict[int, int | None] = field(default_factory=dict)
    drained: bool = True


@dataclass
class Halt:
    """Why a channel is halted: the seq it is halted on, the failure reported for it, when
    (epoch seconds), and whether it was quarantined (its worker kept dying on that message)."""

    seq: int
    error: HandlerError
    since: float
    quarantined: bool = False


class _Batch:
    """One batch of a link's window: its frame as sent (or sealed but not sent while the worker
    was down), which of its messages have finished, and, decoded only when needed, its items.

    Keeping the frame instead of one record per message is what makes the window cheap: nothing is
    stored per message on the producer's path, and a batch finished in order (the common case) is
    retired with one dict operation.
    """

    __slots__ = ("first", "n", "frame", "sent", "doubt", "remaining", "done", "_items")

    def __init__(self, first: int, n: int, frame: bytes, sent: bool, doubt: bool = False) -> None:
        self.first = first  # wseq of its first message; the others follow one by one
        self.n = n
        self.frame = frame
        self.sent = sent  # handed to the current incarnation
        # An incarnation that had it died without saying what it ran: each unfinished message may
        # have been applied (replayed marked redelivered; reported in doubt at close).
        self.doubt = doubt
        self.remaining = n
        self.done: set[int] | None = None  # wseqs finished so far, once any finished alone
        self._items: list[list[Any]] | None = None

    def items(self) -> list[list[Any]]:
        """``[channel_id, cseq, payload]`` of each message, in wseq order."""
        if self._items is None:
            self._items = codec.loads(self.frame)[4:]
        return self._items


class _Link:
    """The front's view of one worker slot across its incarnations."""

    __slots__ = (
        "index",
        "epoch",
        "state",
        "proc",
        "sock",
        "inflight",
        "batches",
        "starts",
        "parts",
        "next_wseq",
        "batch_t0",
        "last_seen",
        "waiters",
        "parked",
        "deadline",
        "guard",
        "restarts",
        "last_exit",
        "last_error",
        "last_cause",
        "died_at",
        "recovery_s",
        "ps",
        "stats",
        "slot",
        "said_bye",
        "stop_running",
        "last_tb",
    )

    def __init__(self, index: int, guard: RestartGuard) -> None:
        self.index = index
        self.epoch = 0
        self.state = STARTING
        self.proc: WorkerProcess | None = None
        self.sock: zmq.Socket[bytes] | None = None
        self.inflight = 0  # messages accepted for this worker and not finished: the window size
        self.batches: dict[int, _Batch] = {}  # first wseq → batch, in wseq order
        self.starts: list[int] = []  # first wseqs, sorted, to find a batch by any of its wseqs
        self.parts: list[bytes] = []  # pending batch: [header placeholder, (prefix, head, payload)*]
        self.next_wseq = 0
        self.batch_t0 = 0.0
        self.last_seen = 0.0
        self.waiters: dict[int, DoneCallback] = {}  # wseq → on_done of that message
        self.parked = 0  # in-flight messages of halted channels: not counted against the limit
        self.deadline = 0.0  # READY deadline while STARTING, restart time while DEAD
        self.guard = guard
        self.restarts = 0
        self.last_exit: int | None = None
        self.last_error: str = ""  # what the front saw before a death (hang, missed READY)
        self.last_cause: str = ""  # how the last incarnation ended, in words
        self.died_at = 0.0
        self.recovery_s: list[float] = []  # death → successor READY and replay sent, per restart
        self.ps: psutil.Process | None = None
        self.stats: dict[str, Any] = {}
        self.slot: RunSlot | None = None  # what the worker took in / is running (shared memory)
        # This incarnation's word on what it ran: BYE (nothing unacknowledged), or the calls that
        # were running when it was asked to stop (None: no report).
        self.said_bye = False
        self.stop_running: set[int] | None = None
        self.last_tb = ""  # traceback of the last CRASH frame


class Front:
    """The engine behind :class:`~shardpool.pool.ShardPool` (see the module diagram).

    Thread-safe: any number of producer threads may call :meth:`submit` concurrently.
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
        """
        self.cfg = config
        pool, transport, sup = config.pool, config.transport, config.supervisor
        self._handler = pool.handler if handler is None else handler
        self._on_result = on_result
        self._on_failure = on_failure
        self._router = Router(pool.slots, pool.workers)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._state = _RUNNING
        self._broken: PoolBroken | None = None
        self._channels: dict[bytes, list[Any]] = {}  # cid → [worker, next cseq, item prefix]
        self._forgotten_submitted = 0  # messages of channels whose record was dropped
        self._halted: dict[bytes, Halt] = {}
        # (cid, cseq) → deaths of a worker with this message in its handler (careful replays)
        self._suspects: dict[tuple[bytes, int], int] = {}
        self._room_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._stats_replies: dict[int, dict[int, dict[str, Any]]] = {}
        self._stats_ids = itertools.count(1)
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "acknowledged",
                "results",
                "failures",
                "restarts",
                "replayed",
                "batches",
                "acks",
                "quarantined",
                "forgotten",
            ),
            0,
        )
        self._batch_parts = 1 + 3 * transport.batch_size
        self._max_inflight = transport.max_inflight
        self._limit = transport.max_inflight  # 0 when not running: one test on the hot path
        self._max_bytes = transport.max_message_bytes
        self._linger = transport.batch_linger_ms / 1000.0  # seconds

        self._rundir = tempfile.mkdtemp(prefix="shardpool-", dir=transport.runtime_dir or None)
        os.chmod(self._rundir, 0o700)
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.rcvhwm = 0
        self._pull.linger = 0
        self._front_endpoint = f"ipc://{self._rundir}/front"
        self._pull.bind(self._front_endpoint)
        self._wakeup = WakePipe()
        self._links = [
            _Link(
                i,
                RestartGuard(
                    sup.max_restarts,
                    sup.restart_window_s,
                    sup.restart_backoff_s,
                    sup.restart_backoff_max_s,
                ),
            )
            for i in range(pool.workers)
        ]
        for link in self._links:
            link.slot = RunSlot(os.path.join(self._rundir, f"w{link.index}.run"), create=True)
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._io_main, name="shardpool-front", daemon=True)
        self._thread.start()
        try:
            self._await_started()
        except BaseException:
            self._teardown(reap_timeout=0.5)
            raise

    # -- producer side -----------------------------------------------------------------------

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
        :class:`HandlerError` of a final failure, or with a :class:`PoolClosed` error if the pool
        closed first. A halted message calls it only once resumed or skipped.

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
        with self._lock:
            try:
                st = self._channels[channel_id]
            except (KeyError, TypeError):
                st = self._new_channel(channel_id)
            link: _Link = st[0]
            if link.inflight - link.parked >= self._limit:  # full, or not running (limit 0)
                self._wait_room(link, block)
            cseq = st[1]
            st[1] = cseq + 1
            if st[3] is not None:
                # Halted channel: hold the message here, in order, outside the window, so a
                # parked channel cannot fill its worker's window and stall the other channels.
                st[3].append((cseq, payload, on_done))
                return cseq
            link.inflight += 1
            parts = link.parts
            if on_done is not None:
                link.waiters[link.next_wseq + (len(parts) - 1) // 3 if parts else link.next_wseq] = (
                    on_done
                )
            if parts:
                parts += (st[2], _item_head(0x1B, cseq, 0x5A, size), payload)
                if len(parts) >= self._batch_parts:
                    self._flush(link)
            else:
                parts += (b"", st[2], _item_head(0x1B, cseq, 0x5A, size), payload)
                self._batch_started(link)
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
        channels = self._channels
        max_bytes = self._max_bytes
        batch_parts = self._batch_parts
        accepted = 0
        while True:
            pairs = list(itertools.islice(it, chunk))
            if not pairs:
                return accepted
            with self._lock:
                # The loop body is submit_bytes' hot path, inlined: this is the fastest way in.
                for channel_id, payload in pairs:
                    size = len(payload)
                    if size > max_bytes:
                        raise PayloadTooLarge(
                            f"payload is {size} bytes, over transport.max_message_bytes = "
                            f"{max_bytes}"
                        )
                    try:
                        st = channels[channel_id]
                    except (KeyError, TypeError):
                        st = self._new_channel(channel_id)
                    link: _Link = st[0]
                    if link.inflight - link.parked >= self._limit:
                        self._wait_room(link, True)
                    cseq = st[1]
                    st[1] = cseq + 1
                    accepted += 1
                    if st[3] is not None:
                        st[3].append((cseq, payload, None))
                        continue
                    link.inflight += 1
                    parts = link.parts
                    if parts:
                        parts += (st[2], _item_head(0x1B, cseq, 0x5A, size), payload)
                        if len(parts) >= batch_parts:
                            self._flush(link)
                    else:
                        parts += (b"", st[2], _item_head(0x1B, cseq, 0x5A, size), payload)
                        self._batch_started(link)

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

    def _batch_started(self, link: _Link) -> None:
        """A message opened a new batch (lock held): send it now if the worker is idle, else
        let the I/O thread flush it when the linger runs out (unless it fills up first)."""
        if link.inflight == 1 or self._linger <= 0:
            # Nothing in flight: the worker is idle, and holding the message back gains nothing.
            self._flush(link)
        else:
            # Something is in flight, so the I/O thread is polling with the linger as timeout
            # and flushes this batch on the next acknowledgement or when the linger runs out;
            # no wake-up needed (one per batch would cost a GIL round trip each).
            link.batch_t0 = time.monotonic()

    def _new_channel(self, channel_id: Any) -> list[Any]:
        """First message of a channel: check its id, route it, pre-encode its item prefix."""
        channel_id = check_channel_id(channel_id)
        st = self._channels.get(channel_id)
        if st is None:
            link = self._links[self._router.worker_of(channel_id)]
            # [link, next cseq, item prefix, held messages while halted (else None)]
            st = [link, 0, codec.item_prefix(channel_id), None]
            self._channels[channel_id] = st
        return st

    def _wait_room(self, link: _Link, block: bool) -> None:
        """Wait (lock held by caller, released while waiting) until ``link`` has room."""
        while True:
            if self._state != _RUNNING:
                raise self._not_running_error()
            if link.inflight - link.parked < self._max_inflight:
                return
            if not block:
                raise BlockingIOError("in-flight window full")
            if threading.current_thread() is self._thread:
                # A result callback submitting more work: blocking here would stop the very
                # thread that frees the window, so let it overshoot instead.
                return
            self._cv.wait(0.5)

    def _not_running_error(self) -> Exception:
        if self._state == _BROKEN and self._broken is not None:
            return PoolBroken(str(self._broken), exitcodes=self._broken.exitcodes)
        return PoolClosed("the pool is closed")

    def channel_worker(self, channel_id: bytes) -> int:
        """The worker index that serves ``channel_id``."""
        return self._router.worker_of(check_channel_id(channel_id))

    async def wait_room_async(self, channel_id: bytes) -> None:
        """Return once ``channel_id``'s worker has room in its window (or the pool stopped)."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._state is not _RUNNING:
                    raise self._not_running_error()
                st = self._channels.get(channel_id)
                link = st[0] if st is not None else self._links[self.channel_worker(channel_id)]
                if link.inflight - link.parked < self._max_inflight:
                    return
                fut: asyncio.Future[None] = loop.create_future()
                self._room_waiters.append((loop, fut))
            try:
                await asyncio.wait_for(fut, 0.5)
            except asyncio.TimeoutError:
                pass

    # -- batches -----------------------------------------------------------------------------

    def _seal(self, link: _Link) -> _Batch:
        """Number ``link``'s pending messages, build their frame and put it in the window."""
        parts = link.parts
        n = (len(parts) - 1) // 3
        first = link.next_wseq
        link.next_wseq = first + n
        parts[0] = codec.batch_header(link.epoch, first, False, n)
        batch = _Batch(first, n, b"".join(parts), False)
        parts.clear()
        link.batches[first] = batch
        link.starts.append(first)
        return batch

    def _flush(self, link: _Link) -> None:
        """Send ``link``'s pending batch (lock held). While the worker is not READY the batch
        waits in the window unsent; the replay after READY sends it."""
        batch = self._seal(link)
        if link.state == READY:
            assert link.sock is not None
            link.sock.send(batch.frame, copy=False)
            batch.sent = True
            self.counters["batches"] += 1

    def _find(self, link: _Link, wseq: int) -> _Batch | None:
        """The window batch holding ``wseq`` (None: not in the window any more)."""
        batch = link.batches.get(wseq)
        if batch is not None:
            return batch
        starts = link.starts
        i = bisect.bisect_right(starts, wseq) - 1
        if i < 0:
            return None
        batch = link.batches.get(starts[i])
        if batch is None or wseq >= batch.first + batch.n:
            return None
        return batch

    def _drop(self, link: _Link, batch: _Batch) -> None:
        del link.batches[batch.first]
        # starts keeps retired firsts (bisect skips them); compact it now and then.
        if len(link.starts) > 2 * len(link.batches) + 64:
            link.starts = list(link.batches)

    def _finish_range(
        self, link: _Link, a: int, b: int, keyed: list[tuple[int, tuple[Any, ...]]]
    ) -> int:
        """Retire wseqs ``a``..``b-1`` (finished with a None result); returns how many were new."""
        n = 0
        waiters = link.waiters
        while a < b:
            batch = self._find(link, a)
            if batch is None:
                a += 1
                continue
            end = min(b, batch.first + batch.n)
            if batch.done is None and a == batch.first and end == batch.first + batch.n:
                k = batch.n  # the whole batch, in order: the common case
                self._drop(link, batch)
            else:
                done = batch.done if batch.done is not None else set()
                batch.done = done
                k = 0
                for w in range(a, end):
                    if w not in done:
                        done.add(w)
                        k += 1
                batch.remaining -= k
                if batch.remaining == 0:
                    self._drop(link, batch)
            if waiters:
                for w in range(a, end):
                    waiter = waiters.pop(w, None)
                    if waiter is not None:
                        keyed.append((w, ("done", waiter, None, None)))
            n += k
            a = end
        return n

    def _open(self, link: _Link, wseq: int) -> tuple[_Batch, list[Any]] | None:
        """The batch and item of ``wseq`` if it is still unfinished."""
        batch = self._find(link, wseq)
        if batch is None or (batch.done is not None and wseq in batch.done):
            return None
        return batch, batch.items()[wseq - batch.first]

    def _finish_one(self, link: _Link, batch: _Batch, wseq: int) -> None:
        if batch.done is None:
            batch.done = set()
        batch.done.add(wseq)
        batch.remaining -= 1
        if batch.remaining == 0:
            self._drop(link, batch)

    def _window(self, link: _Link) -> Iterator[tuple[_Batch | None, int, list[Any]]]:
        """Every unfinished message of ``link`` as ``(batch, wseq, [cid, cseq, payload])``, in
        order, the pending batch included (``batch`` None). Decodes: for the rare paths only."""
        for batch in link.batches.values():
            done = batch.done
            for i, item in enumerate(batch.items()):
                w = batch.first + i
                if done is None or w not in done:
                    yield batch, w, item
        if link.parts:
            n = (len(link.parts) - 1) // 3
            frame = codec.batch_header(0, 0, False, n) + b"".join(link.parts[1:])
            for w, item in enumerate(codec.loads(frame)[4:], link.next_wseq):
                yield None, w, item

    def _open_entries(self, link: _Link) -> list[tuple[int, list[Any]]]:
        """Every unfinished message of ``link`` as ``(wseq, [cid, cseq, payload])``, in order."""
        return [(w, item) for _, w, item in self._window(link)]

    def _flush_stale(self, now: float) -> float | None:
        """Flush batches older than the linger; return seconds until the next one is due."""
        due: float | None = None
        for link in self._links:
            if link.parts:
                left = link.batch_t0 + self._linger - now
                if left <= 0:
                    self._flush(link)
                elif due is None or left < due:
                    due = left
        return due

    # -- draining, stats, control ------------------------------------------------------------

    def flush(self) -> None:
        """Send every pending batch now."""
        with self._lock:
            for link in self._links:
                if link.parts:
                    self._flush(link)

    def _unfinished(self) -> int:
        """Messages in flight that are not parked behind a halted channel (lock held)."""
        return sum(link.inflight - link.parked for link in self._links)

    def _recount_parked(self, link: _Link) -> None:
        """Count ``link``'s in-flight messages of halted channels (lock held; only on halt,
        resume and replay, so a scan of the window is fine)."""
        halted = self._halted
        link.parked = (
            sum(1 for _, item in self._open_entries(link) if item[0] in halted) if halted else 0
        )

    def _place(
        self, link: _Link, st: list[Any], cseq: int, payload: bytes, on_done: DoneCallback | None
    ) -> None:
        """Put an already-numbered message into ``link``'s pending batch (lock held): the same
        steps as the inlined hot path of :meth:`submit_bytes`."""
        link.inflight += 1
        parts = link.parts
        if on_done is not None:
            link.waiters[link.next_wseq + ((len(parts) - 1) // 3 if parts else 0)] = on_done
        head = _item_head(0x1B, cseq, 0x5A, len(payload))
        if parts:
            parts += (st[2], head, payload)
            if len(parts) >= self._batch_parts:
                self._flush(link)
        else:
            parts += (b"", st[2], head, payload)
            self._batch_started(link)

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every accepted message is processed or failed (halted channels excepted).

        Raises:
            DrainTimeout: ``timeout`` seconds passed first.
            PoolBroken: the pool broke while waiting.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            for link in self._links:
                if link.parts:
                    self._flush(link)
            while True:
                left = self._unfinished()
                if left == 0:
                    return
                if self._state == _BROKEN:
                    raise self._not_running_error()
                wait = 0.5
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DrainTimeout(
                            f"{left} messages still in flight after {timeout} s", pending=left
                        )
                    wait = min(wait, remaining)
                self._cv.wait(wait)

    def control(self, channel_id: bytes, op: str) -> None:
        """Send ``resume`` or ``skip`` for a halted channel to its worker (in band, in order)."""
        with self._lock:
            cid = check_channel_id(channel_id)
            if cid not in self._halted:
                raise NotHalted(f"channel {cid.hex()} is not halted")
            halt = self._halted.pop(cid)
            failed_cseq = halt.seq
            log.info(
                "channel %s: %s by the operator (was %s at seq %d)",
                cid.hex(),
                "resumed" if op == "resume" else "skipped",
                "quarantined" if halt.quarantined else "halted",
                halt.seq,
            )
            st = self._channels[cid]
            link: _Link = st[0]
            if link.parts:
                self._flush(link)
            outcomes: list[tuple[Any, ...]] = []
            if link.state == READY:
                assert link.sock is not None
                link.sock.send(codec.dumps([codec.CONTROL, link.epoch, op, cid]))
            elif op == "skip":
                # The worker is being restarted: the replay will not re-halt the channel, so drop
                # the failed message here instead (a resume needs nothing: the replay runs it).
                found = [w for w, item in self._open_entries(link)
                         if item[0] == cid and item[1] == failed_cseq]
                if found:
                    self._on_ack(
                        link, [], [], [[found[0], "Skipped", "skipped by operator", "", "skipped"]],
                        outcomes,
                    )
            held, st[3] = st[3] or [], None
            self._recount_parked(link)
            for cseq, payload, on_done in held:
                self._place(link, st, cseq, payload, on_done)
            self._cv.notify_all()
        for outcome in outcomes:
            self._deliver(outcome)

    def halted_channels(self) -> dict[bytes, int]:
        """Channels parked by the halt policy → seq of the message they are halted on."""
        with self._lock:
            return {cid: halt.seq for cid, halt in self._halted.items()}

    def halts(self) -> dict[bytes, Halt]:
        """Every halted (or quarantined) channel → why and since when."""
        with self._lock:
            return dict(self._halted)

    def stats(self, timeout: float = 5.0) -> dict[str, Any]:
        """Front counters and a fresh per-worker report (asked in band, so it reflects every
        message sent before the call). A worker that does not answer in ``timeout`` seconds keeps
        its last known figures."""
        with self._lock:
            req = next(self._stats_ids)
            self._stats_replies[req] = {}
            asked = []
            for link in self._links:
                if link.parts:
                    self._flush(link)
                if link.state == READY and link.sock is not None:
                    link.sock.send(codec.dumps([codec.STATS, link.epoch, req]))
                    asked.append(link.index)
            deadline = time.monotonic() + timeout
            replies = self._stats_replies[req]
            while len(replies) < len(asked) and time.monotonic() < deadline:
                self._cv.wait(deadline - time.monotonic())
            del self._stats_replies[req]
            for index, reply in replies.items():
                self._links[index].stats = reply
            workers = [self._link_report(link) for link in self._links]
            return {
                "state": self._state,
                "submitted": self._forgotten_submitted
                + sum(st[1] for st in self._channels.values()),
                **self.counters,
                "inflight": sum(link.inflight for link in self._links),
                "channels": len(self._channels),
                "halted_channels": len(self._halted),
                "halted": [
                    {
                        "channel": cid,
                        "seq": halt.seq,
                        "since": halt.since,
                        "quarantined": halt.quarantined,
                        "error": str(halt.error),
                        "type": halt.error.exc_type,
                    }
                    for cid, halt in self._halted.items()
                ],
                "workers": workers,
            }

    def _link_report(self, link: _Link) -> dict[str, Any]:
        rep: dict[str, Any] = dict(link.stats)
        rep.update(
            index=link.index,
            state=link.state,
            epoch=link.epoch,
            restarts=link.restarts,
            inflight=link.inflight,
            last_exit=link.last_cause or None,
            recovery_s=list(link.recovery_s[-20:]),
        )
        ps = link.ps
        if ps is not None:
            try:
                with ps.oneshot():
                    rep["cpu_percent"] = ps.cpu_percent(None)
                    rep["rss_bytes"] = ps.memory_info().rss
            except psutil.Error:
                pass
        return rep

    def worker_pids(self) -> list[int | None]:
        """Current pid of each worker (None while it is not running)."""
        with self._lock:
            return [
                link.proc.pid if link.proc is not None and link.state != STOPPED else None
                for link in self._links
            ]

    # -- startup -----------------------------------------------------------------------------

    def _await_started(self) -> None:
        deadline = time.monotonic() + self.cfg.supervisor.ready_timeout_s + 5.0
        with self._lock:
            while True:
                if self._start_error is not None:
                    raise self._start_error
                if all(link.state == READY for link in self._links):
                    return
                if time.monotonic() > deadline:  # the I/O thread enforces the real deadline
                    raise WorkerStartError("workers did not report READY in time")
                self._cv.wait(0.2)

    def _spawn(self, link: _Link) -> None:
        """Start the next incarnation of ``link`` (I/O thread)."""
        link.epoch += 1
        pool = self.cfg.pool
        spec = WorkerSpec(
            index=link.index,
            epoch=link.epoch,
            data_endpoint=f"ipc://{self._rundir}/w{link.index}.{link.epoch}",
            front_endpoint=self._front_endpoint,
            handler=self._handler,
            handler_options=pool.handler_options.thaw(),
            payload=pool.payload,
            failure_policy=pool.failure_policy,
            failure_policy_by_type=pool.failure_policy_by_type.thaw(),
            retry_limit=pool.retry_limit,
            retry_backoff_s=pool.retry_backoff_ms / 1000.0,
            heartbeat_interval_s=self.cfg.supervisor.heartbeat_interval_s,
            parent_pid=os.getpid(),
            run_slot=link.slot.path if link.slot is not None else "",
            channel_idle_expiry_s=pool.channel_idle_expiry_s,
        )
        link.said_bye = False
        link.stop_running = None
        link.last_tb = ""
        if link.slot is not None:
            link.slot.reset()
        proc = WorkerProcess(spec)
        # The worker's PR_SET_PDEATHSIG follows the thread that spawns it: this I/O thread, which
        # lives as long as the pool (teardown joins it only once the workers are gone).
        proc.start()
        link.proc = proc
        link.state = STARTING
        link.deadline = time.monotonic() + self.cfg.supervisor.ready_timeout_s
        try:
            link.ps = psutil.Process(proc.pid)
            link.ps.cpu_percent(None)
        except psutil.Error:
            link.ps = None

    def _on_ready(self, link: _Link) -> None:
        """READY from the current epoch: connect and replay whatever the window holds (lock held)."""
        sock = self._ctx.socket(zmq.PUSH)
        # The window bounds what is queued; a blocking send under the lock could deadlock.
        sock.sndhwm = 0
        sock.linger = 0
        sock.connect(f"ipc://{self._rundir}/w{link.index}.{link.epoch}")
        link.sock = sock
        link.state = READY
        link.last_seen = time.monotonic()
        if link.batches or link.parts:
            self._replay(link)
        if link.died_at:
            link.recovery_s.append(time.monotonic() - link.died_at)
            link.died_at = 0.0
        self._cv.notify_all()

    def _replay(self, link: _Link) -> None:
        """Re-send the whole window to a fresh incarnation, in order, renumbered for its epoch.

        Messages a dead incarnation may have run are marked redelivered (and so run carefully,
        one at a time); ones that never reached a handler (pending, sealed while the worker was
        down, or left by a worker that stopped cleanly) are not. Halted channels are re-halted
        first so that the replay does not silently run past a failure an operator has not resolved.
        """
        if link.parts:
            self._seal(link)  # never sent: it goes out as fresh, not redelivered
        waiters = dict(link.waiters)
        link.waiters.clear()
        redelivered: list[tuple[list[Any], DoneCallback | None]] = []
        fresh: list[tuple[list[Any], DoneCallback | None]] = []
        for batch in link.batches.values():
            done = batch.done
            for i, item in enumerate(batch.items()):
                w = batch.first + i
                if done is None or w not in done:
                    (redelivered if batch.doubt else fresh).append((item, waiters.get(w)))
        link.batches.clear()
        link.starts.clear()
        halted = [cid for cid in self._halted if self._channels[cid][0] is link]
        assert link.sock is not None
        for cid in halted:
            link.sock.send(codec.dumps([codec.CONTROL, link.epoch, "halt", cid]))
        size = self.cfg.transport.batch_size
        for flag, entries in ((True, redelivered), (False, fresh)):
            for i in range(0, len(entries), size):
                chunk = entries[i : i + size]
                first = link.next_wseq
                link.next_wseq = first + len(chunk)
                frame = codec.encode_batch(
                    link.epoch, first, flag, [(c, s, p) for (c, s, p), _ in chunk]
                )
                link.batches[first] = _Batch(first, len(chunk), frame, True, flag)
                link.starts.append(first)
                for j, (_, waiter) in enumerate(chunk):
                    if waiter is not None:
                        link.waiters[first + j] = waiter
                link.sock.send(frame)
        self._recount_parked(link)
        self.counters["replayed"] += len(redelivered)

    # -- the I/O thread ----------------------------------------------------------------------

    def _io_main(self) -> None:
        # Signals go to the main thread; blocking them here also makes every worker we spawn
        # start with them blocked (the mask survives fork and exec).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._io_loop()
        except BaseException as exc:  # noqa: BLE001 - a dead I/O thread must not hang producers
            log.exception("front I/O thread failed")
            with self._lock:
                if self._state == _RUNNING:
                    self._break(PoolBroken(f"front I/O thread failed: {exc!r}"))
                if self._start_error is None:
                    self._start_error = WorkerStartError(f"front I/O thread failed: {exc!r}")
                self._cv.notify_all()

    def _io_loop(self) -> None:
        with self._lock:
            for link in self._links:
                try:
                    self._spawn(link)
                except Exception as exc:
                    self._start_error = WorkerStartError(
                        f"worker {link.index} could not be spawned: {exc!r}"
                    )
                    self._start_error.__cause__ = exc
                    self._cv.notify_all()
                    return
        pull = self._pull
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        wake_fd = self._wakeup.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        sentinels: dict[int, _Link] = {}
        while True:
            with self._lock:
                if self._state == _CLOSED:
                    return
                current = {
                    link.proc.sentinel: link
                    for link in self._links
                    if link.proc is not None and link.state in (STARTING, READY, STOPPING)
                }
                now = time.monotonic()
                due = self._flush_stale(now)
                due = self._check_timers(now, due)
                if due is None and any(link.inflight for link in self._links):
                    due = self._linger  # a batch may start any moment: be back within the linger
            for fd in sentinels.keys() - current.keys():
                poller.unregister(fd)
            for fd in current.keys() - sentinels.keys():
                poller.register(fd, zmq.POLLIN)
            sentinels = current
            # zmq polls in whole milliseconds and truncates: round up, or a 0.5 ms linger spins.
            timeout_ms = 100 if due is None else max(0, min(100, math.ceil(due * 1000.0)))
            events = dict(poller.poll(timeout_ms))
            if wake_fd in events:
                self._wakeup.drain()
            if pull in events:
                self._on_frames(self._recv_frames())
            dead = [sentinels[fd] for fd in events if fd in sentinels]
            if dead:
                self._await_last_words(dead)
                outcomes: list[tuple[Any, ...]] = []
                with self._lock:
                    for link in dead:
                        self._on_death(link, outcomes)
                for outcome in outcomes:
                    self._deliver(outcome)

    def _recv_frames(self) -> list[bytes]:
        """Whatever the PULL socket holds, up to 256 frames (I/O thread)."""
        frames: list[bytes] = []
        recv = self._pull.recv
        try:
            while len(frames) < 256:
                frames.append(recv(zmq.NOBLOCK))
        except zmq.Again:
            pass
        return frames

    def _await_last_words(self, dead: list[_Link]) -> None:
        """Read what the dead workers sent before they went (I/O thread, lock not held).

        A worker that exited cleanly sent BYE first, but ZeroMQ may hand it over only after the
        exit is seen; what it finished must be known before anything is decided about the rest,
        so wait for that BYE (1 s at most). For the others, take what has already arrived."""
        waiting = [
            link
            for link in dead
            if link.proc is not None
            and link.proc.join(0) == EXIT_OK
            and not link.said_bye
            and not link.last_tb  # a CRASH (SystemExit(0)) says no BYE is coming
        ]
        deadline = time.monotonic() + 1.0
        while True:
            if self._pull.poll(0):
                self._on_frames(self._recv_frames())
            waiting = [link for link in waiting if not link.said_bye]
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                return
            self._pull.poll(math.ceil(min(left, 0.05) * 1000))

    def _check_timers(self, now: float, due: float | None) -> float | None:
        """READY deadlines, restart times and heartbeat silence (lock held)."""
        hb_timeout = self.cfg.supervisor.heartbeat_timeout_s
        behind: bool | None = None  # frames still unread: the silence may be ours, not theirs

        def caught_up() -> bool:
            nonlocal behind
            if behind is None:
                behind = bool(self._pull.poll(0))
            return not behind

        for link in self._links:
            if link.state == STARTING and now > link.deadline and caught_up():
                link.last_error = f"no READY within {self.cfg.supervisor.ready_timeout_s} s"
                assert link.proc is not None
                link.proc.kill()  # its sentinel then reports the death
            elif link.state == DEAD and now >= link.deadline:
                try:
                    self._spawn(link)
                except Exception as exc:  # noqa: BLE001
                    self._break(PoolBroken(f"worker {link.index} could not be respawned: {exc!r}"))
            elif link.state == READY and now - link.last_seen > hb_timeout and caught_up():
                # (Only once every frame that arrived is read: an I/O thread that fell behind
                # must not take its own delay for a hung worker and kill a healthy one.)
                link.last_error = (
                    f"no heartbeat for {now - link.last_seen:.1f} s "
                    f"(supervisor.heartbeat_timeout_s = {hb_timeout})"
                )
                log.warning("worker %d is hung: %s; killing it", link.index, link.last_error)
                assert link.proc is not None
                link.proc.kill()
                link.last_seen = now  # one kill is enough; the sentinel takes it from here
            if link.state == DEAD:
                left = link.deadline - now
                due = left if due is None else min(due, left)
        return due

    def _on_frames(self, frames: list[bytes]) -> None:
        outcomes: list[tuple[Any, ...]] = []
        now = time.monotonic()
        with self._lock:
            for frame in frames:
                try:
                    msg = codec.loads(frame)
                    kind, index, epoch = msg[0], msg[1], msg[2]
                    link = self._links[index]
                except Exception:  # noqa: BLE001 - never let a bad frame stop the front
                    log.warning("dropped a malformed frame from a worker (%d bytes)", len(frame))
                    continue
                if epoch != link.epoch:
                    continue  # a dead incarnation's last words
                link.last_seen = now
                if kind == codec.ACK:
                    self.counters["acks"] += 1
                    self._on_ack(link, msg[3], msg[4], msg[5], outcomes)
                    if msg[6]:
                        self._forget(link, msg[6])
                elif kind == codec.HEARTBEAT:
                    pass
                elif kind == codec.READY:
                    if link.state == STARTING:
                        self._on_ready(link)
                elif kind == codec.STATS_REPLY:
                    replies = self._stats_replies.get(msg[3])
                    if replies is not None:
                        replies[index] = msg[4]
                        self._cv.notify_all()
                elif kind == codec.FATAL:
                    link.last_error = f"{msg[3]}: {msg[4]}"
                    err = WorkerStartError(
                        f"worker {index} failed to start its handler: {msg[3]}: {msg[4]}"
                    )
                    err.__cause__ = RemoteTraceback(msg[5])
                    if self._start_error is None and self._state == _RUNNING and link.restarts == 0:
                        self._start_error = err
                    # An import or setup error will not fix itself by restarting.
                    self._break(err)
                elif kind == codec.STOPPING:
                    link.stop_running = set(msg[3])
                elif kind == codec.BYE:
                    link.stats = msg[3]
                    link.said_bye = True
                    self._cv.notify_all()
                elif kind == codec.CRASH:
                    link.last_error = f"{msg[3]}: {msg[4]}"
                    link.last_tb = msg[5]
                    log.error("worker %d is dying: %s\n%s", index, link.last_error, msg[5])
            if self._room_waiters:
                for loop, fut in self._room_waiters:
                    loop.call_soon_threadsafe(_set_done, fut)
                self._room_waiters.clear()
        for outcome in outcomes:
            self._deliver(outcome)

    def _on_ack(
        self,
        link: _Link,
        ranges: list[int],
        results: list[list[Any]],
        failures: list[list[Any]],
        outcomes: list[tuple[Any, ...]],
    ) -> None:
        waiters = link.waiters
        n = 0
        # One ACK lists None-result completions, values and failures separately; per channel they
        # happened in wseq order, so outcomes are delivered sorted by wseq to keep that order.
        keyed: list[tuple[int, tuple[Any, ...]]] = []
        if link.parts:
            # Ack-clocked batching (as Nagle's algorithm): the worker just finished work, so hand
            # it the next batch now rather than when the linger runs out.
            self._flush(link)
        for i in range(0, len(ranges), 2):
            n += self._finish_range(link, ranges[i], ranges[i + 1], keyed)
        for wseq, value in results:
            found = self._open(link, wseq)
            if found is None:
                continue
            batch, item = found
            self._finish_one(link, batch, wseq)
            n += 1
            waiter = waiters.pop(wseq, None) if waiters else None
            if waiter is not None:
                keyed.append((wseq, ("done", waiter, value, None)))
            elif self._on_result is not None:
                keyed.append((wseq, ("result", item[0], item[1], value)))
        for wseq, exc_type, message, tb, action in failures:
            found = self._open(link, wseq)
            if found is None:
                continue
            batch, item = found
            cid, cseq = item[0], item[1]
            err = HandlerError(
                f"handler failed on channel {cid.hex()} seq {cseq}: {exc_type}: {message} "
                f"(policy: {action})",
                channel_id=cid,
                seq=cseq,
                exc_type=exc_type,
                policy=action,
                traceback=tb,
            )
            self.counters["failures"] += 1
            if action in FINAL_ACTIONS:
                self._finish_one(link, batch, wseq)
                n += 1
                waiter = waiters.pop(wseq, None) if waiters else None
                if waiter is not None:
                    keyed.append((wseq, ("done", waiter, None, err)))
                    continue
            else:
                self._halt(link, cid, Halt(cseq, err, time.time()))
            keyed.append((wseq, ("failure", err)))
        if keyed:
            keyed.sort(key=_first)
            outcomes.extend(outcome for _, outcome in keyed)
        link.inflight -= n
        self.counters["acknowledged"] += n
        self.counters["results"] += len(results)
        if n or failures:
            self._cv.notify_all()

    def _deliver(self, outcome: tuple[Any, ...]) -> None:
        """Hand one outcome to its future or callback (I/O thread, lock not held)."""
        kind = outcome[0]
        try:
            if kind == "done":
                outcome[1](outcome[2], outcome[3])
            elif kind == "result":
                assert self._on_result is not None
                self._on_result(outcome[1], outcome[2], outcome[3])
            elif kind == "failure":
                if self._on_failure is not None:
                    self._on_failure(outcome[1])
                else:
                    log.error("%s\n%s", outcome[1], outcome[1].traceback)
        except Exception:  # noqa: BLE001 - a failing callback must not stop delivery
            log.exception("result/failure callback raised")

    def _on_death(self, link: _Link, outcomes: list[tuple[Any, ...]]) -> None:
        """A worker process ended (lock held): settle what it was sent, then restart it, give up
        (crash loop), or just record it (stopping). Failures to deliver go to ``outcomes``."""
        proc = link.proc
        assert proc is not None and link.slot is not None
        code = proc.join(1.0)
        link.last_exit = code
        taken, running = link.slot.read()
        link.slot.reset()
        if link.sock is not None:
            link.sock.close(linger=0)
            link.sock = None
        if link.said_bye:
            # It acknowledged every call it started: the rest never reached a handler.
            for batch in link.batches.values():
                batch.sent = False
        elif link.state != STOPPING or link.stop_running is None:
            # Died without saying what it ran: what it had taken in may have been applied; what
            # it never read did not reach a handler. (A stopping worker that reported its
            # running calls keeps that finer report.)
            for batch in link.batches.values():
                if batch.sent:
                    if batch.first <= taken:
                        batch.doubt = True
                    else:
                        batch.sent = False
        if link.state == STOPPING or self._state in (_BROKEN, _CLOSED):
            link.state = STOPPED
            self._cv.notify_all()
            return
        what = describe_exit(code)
        cause = f" ({link.last_error})" if link.last_error else ""
        if link.state == STARTING and link.restarts == 0:
            # Dying before the first READY is a start failure, not something to retry.
            err = WorkerStartError(
                f"worker {link.index} {what} before READY{cause}", exitcodes={link.index: code}
            )
            if self._start_error is None:
                self._start_error = err
            link.state = STOPPED
            self._break(err)
            return
        suspect = None if link.said_bye else self._suspect(link, running)
        if suspect is not None:
            # A message explains this death: it is counted against the message, not the worker.
            delay: float | None = link.guard.backoff_s
            self._suspects[suspect] = n = self._suspects.get(suspect, 0) + 1
            if n >= self.cfg.supervisor.poison_after_crashes:
                outcomes.append(("failure", self._quarantine(link, suspect, f"{what}{cause}", n)))
        else:
            delay = link.guard.next_delay()
        if delay is None:
            link.state = BROKEN
            self._break(
                PoolBroken(
                    f"worker {link.index} keeps dying ({link.guard.max_restarts} restarts within "
                    f"{link.guard.window_s} s); last: {what}{cause}",
                    exitcodes={link.index: code},
                )
            )
            return
        log.warning(
            "worker %d (pid %s, epoch %d) %s%s%s; restarting in %.2f s, %d messages to replay",
            link.index,
            proc.pid,
            link.epoch,
            what,
            cause,
            "" if suspect is None else f" in its handler for channel {suspect[0].hex()} seq "
            f"{suspect[1]}",
            delay,
            link.inflight,
        )
        link.proc = None  # joined; dropping it closes its sentinel
        link.last_cause = f"{what}{cause}"
        link.last_error = ""
        link.died_at = time.monotonic()
        link.state = DEAD
        link.restarts += 1
        self.counters["restarts"] += 1
        link.deadline = time.monotonic() + delay

    def _suspect(self, link: _Link, running: int) -> tuple[bytes, int] | None:
        """The message a careful replay was running when ``link``'s worker died, as ``(cid,
        cseq)``, if it is still unfinished (lock held). Forgets the counts of messages that are
        no longer in this worker's window."""
        if self._suspects:
            open_keys = {(item[0], item[1]) for _, item in self._open_entries(link)}
            for key in [
                k for k in self._suspects if k not in open_keys and self._owner(k[0]) is link
            ]:
                del self._suspects[key]
        if running == NO_MESSAGE:
            return None
        found = self._open(link, running)
        if found is None:
            return None
        item = found[1]
        return item[0], item[1]

    def _owner(self, cid: bytes) -> _Link | None:
        st = self._channels.get(cid)
        return st[0] if st is not None else None

    def _quarantine(self, link: _Link, key: tuple[bytes, int], cause: str, n: int) -> HandlerError:
        """Halt the channel of a message that keeps killing its worker (lock held); returns the
        failure to deliver. The operator resumes (runs it again) or skips it as any halt."""
        cid, cseq = key
        hung = link.last_error.startswith("no heartbeat")
        err = HandlerError(
            f"channel {cid.hex()} quarantined at seq {cseq}: worker {link.index} {cause} with this "
            f"message in its handler, {n} times (supervisor.poison_after_crashes = "
            f"{self.cfg.supervisor.poison_after_crashes}); the channel is halted",
            channel_id=cid,
            seq=cseq,
            exc_type="WorkerHung" if hung else "WorkerDied",
            policy="quarantine",
            traceback=link.last_tb,
        )
        del self._suspects[key]
        self._halt(link, cid, Halt(cseq, err, time.time(), quarantined=True))
        self.counters["quarantined"] += 1
        self.counters["failures"] += 1
        log.error("%s", err)
        return err

    def _halt(self, link: _Link, cid: bytes, halt: Halt) -> None:
        """Park ``cid`` on ``halt.seq`` (lock held): its later messages wait at the front."""
        self._halted[cid] = halt
        st = self._channels[cid]
        if st[3] is None:
            st[3] = []
        self._recount_parked(link)

    def _forget(self, link: _Link, entries: list[list[Any]]) -> None:
        """A worker dropped these channels (lock held): drop their records too, unless a newer
        message was numbered since (it is on its way, and the channel lives on)."""
        channels = self._channels
        n = 0
        for cid, next_cseq in entries:
            st = channels.get(cid)
            if (
                st is not None
                and st[0] is link
                and st[1] == next_cseq
                and st[3] is None
                and cid not in self._halted
            ):
                del channels[cid]
                self._forgotten_submitted += next_cseq
                n += 1
        self.counters["forgotten"] += n

    def _set_state(self, state: str) -> None:
        """Change the pool state (lock held); anything but running shuts the window."""
        self._state = state
        self._limit = self._max_inflight if state == _RUNNING else 0

    def _break(self, err: PoolBroken) -> None:
        """Mark the pool broken (lock held): producers get ``err``, nothing restarts any more."""
        if self._state in (_BROKEN, _CLOSED):
            return
        exitcodes = {link.index: link.last_exit for link in self._links if link.last_exit is not None}
        err.exitcodes.update(exitcodes)
        log.error("pool broken: %s", err)
        self._set_state(_BROKEN)
        self._broken = err
        for link in self._links:
            if link.state == DEAD:
                link.state = BROKEN
        self._cv.notify_all()

    # -- shutdown ----------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._state == _CLOSED

    @property
    def broken(self) -> PoolBroken | None:
        return self._broken

    def close(self, timeout: float | None = None, *, drain: bool = True) -> CloseReport:
        """Shut down in phases: stop intake, drain, stop the workers, report, reap.

        ``timeout`` (seconds, default ``stop_timeout_s``) bounds the whole close. With ``drain``
        it waits for in-flight work until :func:`stop_grace` before the deadline; then each worker
        is asked to stop (SIGTERM): it finishes the handler call it is in, starts nothing more,
        acknowledges and leaves. Whatever still runs at the deadline is killed. Every message not
        finished is returned in the report, as unfinished (never handed to a handler) or in doubt
        (its handler may have run), and its ``on_done`` gets a :class:`PoolClosed` or an
        :class:`InDoubt`; a message its channel is halted on gets its failure. Idempotent.
        """
        if self._state == _CLOSED:
            return CloseReport()
        timeout = self.cfg.supervisor.stop_timeout_s if timeout is None else max(0.0, timeout)
        deadline = time.monotonic() + timeout
        report = CloseReport()
        # Phase 1: stop intake.
        with self._lock:
            was_broken = self._state == _BROKEN
            if not was_broken:
                self._set_state(_CLOSING)
            self._cv.notify_all()
        # Phase 2: drain, keeping the last part of the deadline for the workers to stop.
        if drain and not was_broken:
            try:
                self.drain(max(0.0, deadline - stop_grace(timeout) - time.monotonic()))
            except (DrainTimeout, PoolBroken):
                pass
        with self._lock:
            # Phase 3: ask every worker to stop, and wait for them until the deadline.
            for link in self._links:
                if link.state in (READY, STARTING):
                    assert link.proc is not None
                    link.proc.terminate()
                    link.state = STOPPING
                elif link.state == DEAD:
                    link.state = STOPPED
            self._await_stopped(deadline)
            # Phase 4: kill what is left (its sentinel still has to be seen: a bounded wait).
            for link in self._links:
                if link.state == STOPPING and link.proc is not None:
                    log.warning(
                        "worker %d did not stop within the deadline; killing it", link.index
                    )
                    link.proc.kill()
            self._await_stopped(time.monotonic() + 5.0)
            # Phase 5: settle every message that did not finish.
            outcomes = self._settle(report)
            report.drained = not (report.unfinished or report.in_doubt)
            if not report.drained:
                log.warning(
                    "closing with %d messages unfinished (never handed to a handler) and %d in "
                    "doubt (a handler may have run them)",
                    len(report.unfinished),
                    len(report.in_doubt),
                )
            self._set_state(_CLOSED)
            self._cv.notify_all()
            for loop, fut in self._room_waiters:
                loop.call_soon_threadsafe(_set_done, fut)
            self._room_waiters.clear()
        for outcome in outcomes:
            self._deliver(outcome)
        # Phase 6: reap the processes and release sockets and the runtime directory.
        report.exitcodes = self._teardown(reap_timeout=max(0.5, deadline - time.monotonic()))
        return report

    def _await_stopped(self, deadline: float) -> None:
        """Wait (lock held, released while waiting) until no worker is stopping, or the deadline."""
        while any(link.state == STOPPING for link in self._links):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(min(left, 0.2))

    def _settle(self, report: CloseReport) -> list[tuple[Any, ...]]:
        """Sort every message that did not finish into ``report`` and return the outcomes to
        deliver to its ``on_done`` (lock held; the workers are gone or being killed)."""
        outcomes: list[tuple[Any, ...]] = []
        halted = self._halted

        def hand_back(entry: _Entry, on_done: DoneCallback | None, doubtful: bool) -> None:
            (report.in_doubt if doubtful else report.unfinished).append(entry)
            if on_done is not None:
                err = (
                    InDoubt(
                        f"closed while channel {entry[0].hex()} seq {entry[1]} may have been in "
                        "its handler (its worker stopped or died before acknowledging it); it may "
                        "have been applied"
                    )
                    if doubtful
                    else PoolClosed("closed before this message was handed to its handler")
                )
                outcomes.append(("done", on_done, None, err))

        for link in self._links:
            waiters = link.waiters
            for batch, w, item in self._window(link):
                cid, cseq, payload = item[0], item[1], item[2]
                on_done = waiters.pop(w, None)
                halt = halted.get(cid)
                if halt is not None and halt.seq == cseq:
                    # Handed to its handler and failed: that failure is its outcome.
                    if on_done is not None:
                        outcomes.append(("done", on_done, None, halt.error))
                    continue
                if batch is None or (not batch.sent and not batch.doubt):
                    doubtful = False
                elif batch.doubt:
                    doubtful = True
                elif link.said_bye:
                    doubtful = False
                elif link.stop_running is not None:
                    doubtful = w in link.stop_running
                else:
                    doubtful = True
                hand_back((cid, cseq, payload), on_done, doubtful)
            for on_done in waiters.values():  # not expected: every waiter is in the window
                outcomes.append(("done", on_done, None, PoolClosed("the pool closed")))
            waiters.clear()
        for cid, st in self._channels.items():
            for cseq, payload, on_done in st[3] or ():
                hand_back((cid, cseq, payload), on_done, False)
        return outcomes

    def _teardown(self, reap_timeout: float) -> dict[int, int | None]:
        with self._lock:
            self._set_state(_CLOSED)
            self._cv.notify_all()
        self._wakeup.wake()
        self._thread.join(5.0)
        codes: dict[int, int | None] = {}
        for link in self._links:
            if link.proc is not None:
                codes[link.index] = link.proc.reap(reap_timeout)
                reap_timeout = 0.5
            if link.sock is not None:
                link.sock.close(linger=0)
                link.sock = None
        self._pull.close(linger=0)
        self._ctx.term()
        self._wakeup.close()
        shutil.rmtree(self._rundir, ignore_errors=True)
        return codes


def _first(pair: tuple[int, Any]) -> int:
    return pair[0]


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
