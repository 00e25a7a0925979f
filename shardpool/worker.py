"""The worker process: one asyncio event loop serving its channels strictly in order.

Each channel has a FIFO; at most one handler call per channel runs at a time (including its awaits),
so an ``async`` handler waiting on I/O lets *other* channels of this worker proceed while its own
channel waits. A sync handler runs inline, message after message, straight from the decoded frame:
for the common case that is the whole hot path (no task, no queue).

The worker verifies the per-channel sequence numbers the front stamped (gaps, duplicates and
reorders are counted — all zero in a healthy pool), acknowledges what finished, reports failures
with their traceback under the configured policy and sends heartbeats from its event loop.

Around that:

* **Stop request** (SIGTERM, or a STOP frame): the worker starts no new handler call, reports which
  calls are running (STOPPING), lets them finish, acknowledges them and says BYE before it exits.
  The signal handler only records the request; the dispatch loops check it between messages, so a
  long batch of a sync handler stops after the call in progress, not at the end of the batch.
* **Careful replay**: a batch re-sent after a crash runs one message at a time, each recorded in
  the :class:`RunSlot` shared with the front while its handler runs. If this incarnation dies too,
  the front knows exactly which message it died on (and quarantines a message that keeps killing
  its worker) — even after a segfault, when the worker could send nothing.
* **Forgetting channels**: a channel whose handler called ``channel.end()``, or one idle for
  ``channel_idle_expiry_s`` with nothing queued and no state, is dropped and reported with the
  acknowledgements, so that the front can drop its record too.
* **Parent guard**: the worker leaves within about a second of the front's death whatever its
  handler is doing (:func:`guard_parent`).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import heapq
import mmap
import os
import signal
import sys
import threading
import time
import traceback
from types import FrameType
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from . import codec
from .handler import Channel, HandlerSpec, load_handler, maybe_await

EXIT_OK = 0
"""Clean exit after a stop request: every call it started finished and was acknowledged (BYE)."""
EXIT_START_FAILED = 3
"""The handler could not be imported, built or set up; a FATAL frame carried the traceback."""
EXIT_PARENT_GONE = 4
"""The front process disappeared; the worker left rather than run orphaned."""

FINAL_ACTIONS = frozenset({"skip", "skipped"})
"""Failure actions after which the message is finished (acknowledged); ``halt`` is not final."""

HOT_CHANNELS = 10

NO_MESSAGE = -1
"""The run slot's value while no careful call is running."""

PARENT_POLL_S = 0.2
"""How often the parent watchdog thread looks for its parent (seconds)."""

CAREFUL_YIELD_S = 0.02
"""A careful replay gives the event loop a turn (heartbeats, acknowledgements) this often (seconds)."""

SWEEP_CHUNK = 5000
"""Channels examined per event-loop turn by the idle sweep."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs; pickled to the child at spawn."""

    index: int
    epoch: int
    data_endpoint: str  # the worker binds its PULL here
    front_endpoint: str  # the worker connects its PUSH here
    handler: Any  # "module:attr" or a (dill-picklable) object
    handler_options: dict[str, Any] = field(default_factory=dict)
    payload: str = "cbor"  # "cbor": decode each payload; "raw": hand the bytes over
    failure_policy: str = "halt"
    failure_policy_by_type: dict[str, str] = field(default_factory=dict)  # message["type"] → policy
    retry_limit: int = 3
    retry_backoff_s: float = 0.05
    heartbeat_interval_s: float = 0.5
    parent_pid: int = 0
    run_slot: str = ""  # path of this worker's RunSlot file ("" = none)
    channel_idle_expiry_s: float = 0.0  # 0 = never forget an idle channel


class RunSlot:
    """Sixteen bytes shared by the front and one worker incarnation, read by the front once the
    worker has died or been killed:

    * ``taken``: the last wseq the worker has taken in. Every message up to it may have reached a
      handler; none after it has (it was never read). Set once per batch, before its first call.
    * ``running``: the wseq a careful replay is running, or :data:`NO_MESSAGE`; set just before and
      after each careful call, so a death during a replay names its message exactly.

    Shared memory, unlike a frame, survives a segfault or SIGKILL that lands before anything could
    be sent. It is a file in the front's private runtime directory mapped by both, since spawned
    processes share no anonymous memory.
    """

    SIZE = 16

    def __init__(self, path: str, *, create: bool = False) -> None:
        """Map ``path`` (created and reset when ``create``).

        Raises:
            OSError: the file cannot be created, opened or mapped.
        """
        self.path = path
        if create:
            with open(path, "wb") as f:
                f.write(bytes(self.SIZE))
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self.SIZE)
        self._view = memoryview(self._map).cast("q")
        if create:
            self.reset()

    def reset(self) -> None:
        """Nothing taken in, nothing running (before each incarnation starts)."""
        self._view[0] = -1
        self._view[1] = NO_MESSAGE

    def take(self, wseq: int) -> None:
        self._view[0] = wseq

    def run(self, wseq: int) -> None:
        self._view[1] = wseq

    def read(self) -> tuple[int, int]:
        """``(taken, running)``."""
        return int(self._view[0]), int(self._view[1])

    def close(self) -> None:
        self._view.release()
        self._map.close()


def guard_parent(parent_pid: int, *, pdeathsig: bool = True, poll_s: float = PARENT_POLL_S) -> None:
    """Make this process leave within about a second of its parent's death, whatever its main
    thread is doing (a handler may be deep in a long synchronous call).

    On Linux the kernel kills it the moment its parent ends (``prctl(PR_SET_PDEATHSIG, SIGKILL)``;
    note that the "parent" is the thread that spawned it). Everywhere, a daemon thread checks every
    ``poll_s`` seconds whether the process was re-parented and exits with
    :data:`EXIT_PARENT_GONE`; it needs the GIL only for a moment, which a pure-Python handler
    gives up every switch interval. ``pdeathsig=False`` leaves the kernel out (to test the thread).
    """
    if pdeathsig and sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # the watchdog thread below still covers it
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)  # the parent died before the guard was in place
    threading.Thread(
        target=_watch_parent, args=(parent_pid, poll_s), name="shardpool-parent-watch", daemon=True
    ).start()


def _watch_parent(parent_pid: int, poll_s: float) -> None:
    while True:
        time.sleep(poll_s)  # noqa: sleep-ok - a watchdog's period, not synchronisation
        if os.getppid() != parent_pid:
            # Re-parented: the front is gone and nothing we could still send has a reader.
            os._exit(EXIT_PARENT_GONE)


def worker_main(spec: WorkerSpec) -> None:
    """Process entry point (target of the spawned process). Exits with an ``EXIT_*`` code."""
    # The front coordinates shutdown: Ctrl-C in a terminal reaches the whole process group, and a
    # worker that died of it would look like a crash. SIGTERM is the stop request.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    worker = Worker(spec)
    signal.signal(signal.SIGTERM, worker.note_stop)
    if spec.parent_pid:
        # Before unblocking: the watchdog thread keeps SIGINT/SIGTERM blocked, so they reach us.
        guard_parent(spec.parent_pid)
    # The front blocked these before spawning us so that no signal could hit a half-started child.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(asyncio.run(worker.run()))


def _identity(payload: bytes) -> bytes:
    return payload


def _failure_entry(wseq: int, exc: BaseException, action: str) -> list[Any]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return [wseq, type(exc).__qualname__, str(exc), tb, action]


class Worker:
    """The state of one worker incarnation; :meth:`run` is its whole life."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.index = spec.index
        self.epoch = spec.epoch
        self.channels: dict[bytes, Channel] = {}
        self.handler: HandlerSpec | None = None
        self.decode = spec.payload == "cbor"
        self._ranges: list[int] = []
        self._results: list[list[Any]] = []
        self._failures: list[list[Any]] = []
        self._forgotten: list[list[Any]] = []  # [cid, next cseq] of channels dropped, to report
        self._ended: list[Channel] = []  # channels whose handler called end(), not yet dropped
        self._flush_scheduled = False
        self._active = 0  # channels with a running call or retry wait
        self._idle: asyncio.Event | None = None
        # Non-empty once a stop was requested (the signal numbers; 0 for a STOP frame). A list so
        # the hot loops test a local name, and so the signal handler only has to append.
        self._stop: list[int] = []
        self._stop_reported = False
        self._recv: Any = None  # the pending receive of the serve loop, cancelled by a stop
        self._careful = False  # running a replayed batch: one call at a time, in the run slot
        self._slot: RunSlot | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "processed",
                "failed",
                "retried",
                "redelivered",
                "gaps",
                "duplicates",
                "reorders",
                "stale_frames",
                "bad_frames",
                "forgotten",
            ),
            0,
        )
        self.loop_lag_s = 0.0
        self.push: zmq.Socket[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------------

    def note_stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM handler: only record the request (the loops act on it between messages)."""
        self._stop.append(signum)

    async def run(self) -> int:
        """Start, serve until asked to stop, finish what is running, say BYE. Returns the exit
        code."""
        ctx = zmq.asyncio.Context()
        # Sends never need to wait (HWM 0 below), so a plain socket avoids a future per frame.
        push: zmq.Socket[bytes] = zmq.Socket(ctx, zmq.PUSH)
        # No high-water mark: the front's in-flight window already bounds what can be queued, and
        # a blocking send here could deadlock against a front that is blocked on us.
        push.sndhwm = 0
        push.linger = 2000  # a FATAL or BYE must get out before the process ends
        push.connect(self.spec.front_endpoint)
        self.push = push
        try:
            try:
                self.handler = load_handler(self.spec.handler, self.spec.handler_options)
                if self.handler.setup is not None:
                    await maybe_await(self.handler.setup(self.index))
                if self.spec.run_slot:
                    self._slot = RunSlot(self.spec.run_slot)
            except BaseException as exc:  # noqa: BLE001 - any start failure is reported, then fatal
                tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                push.send(
                    codec.dumps(
                        [codec.FATAL, self.index, self.epoch, type(exc).__qualname__, str(exc), tb]
                    )
                )
                return EXIT_START_FAILED
            pull = ctx.socket(zmq.PULL)
            pull.rcvhwm = 0
            pull.linger = 0
            pull.bind(self.spec.data_endpoint)
            loop = asyncio.get_running_loop()
            # The loop callback wakes the serve loop; the plain handler (re-installed, since
            # add_signal_handler replaced it) records the request at once, even mid-call.
            loop.add_signal_handler(signal.SIGTERM, self._on_stop_request)
            signal.signal(signal.SIGTERM, self.note_stop)
            self._idle = asyncio.Event()
            self._idle.set()
            push.send(codec.dumps([codec.READY, self.index, self.epoch, os.getpid()]))
            tasks = [loop.create_task(self._heartbeat())]
            if self.spec.channel_idle_expiry_s > 0:
                tasks.append(loop.create_task(self._sweep(self.spec.channel_idle_expiry_s)))
            try:
                await self._serve(pull)
                # Asked to stop: report what is running, let it finish (halted channels stay
                # parked; the front reports their messages), acknowledge, say goodbye.
                self._on_stop_request()
                await self._idle.wait()
                self._flush_acks()
            except BaseException as exc:
                # Dying (a bug, or a handler raising SystemExit/KeyboardInterrupt): the front
                # will see the death on the sentinel; this tells it why, traceback included.
                if not isinstance(exc, asyncio.CancelledError):
                    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                    self._send(
                        [codec.CRASH, self.index, self.epoch, type(exc).__qualname__, str(exc), tb]
                    )
                raise
            finally:
                for task in tasks:
                    task.cancel()
                pull.close(linger=0)
            # BYE before the teardown hook: from here on nothing of ours will run a message.
            push.send(codec.dumps([codec.BYE, self.index, self.epoch, self.stats()]))
            if self.handler.teardown is not None:
                await maybe_await(self.handler.teardown())
            return EXIT_OK
        finally:
            push.close()
            ctx.term()

    def _on_stop_request(self) -> None:
        """Act on a stop request (event-loop callback; idempotent): from now on no handler call
        starts; tell the front which calls are running (the rest of what it sent us will never
        run) and wake the serve loop."""
        if not self._stop:
            self._stop.append(0)
        if self._stop_reported or self.push is None:
            return
        self._stop_reported = True
        self._flush_acks()
        running = [ch._queue[0][0] for ch in self.channels.values() if ch._busy and ch._queue]
        self._send([codec.STOPPING, self.index, self.epoch, running])
        recv = self._recv
        if isinstance(recv, asyncio.Future) and not recv.done():
            recv.cancel()

    async def _serve(self, pull: zmq.asyncio.Socket) -> None:
        """Receive and dispatch frames until a stop is requested (SIGTERM or a STOP frame)."""
        loads = codec.loads
        counters = self.counters
        stop = self._stop
        while not stop:
            self._recv = pull.recv()
            try:
                frame = await self._recv
            except asyncio.CancelledError:
                if stop:
                    return  # _on_stop_request cancelled the receive
                raise
            finally:
                self._recv = None
            try:
                msg = loads(frame)
                kind = msg[0]
                epoch = msg[1]
            except Exception:  # noqa: BLE001 - a malformed frame must not take the worker down
                counters["bad_frames"] += 1
                continue
            if epoch != self.epoch:
                counters["stale_frames"] += 1
                continue
            if kind == codec.BATCH:
                if msg[3]:
                    await self._careful_batch(msg)
                else:
                    self._on_batch(msg)
            elif kind == codec.STATS:
                self._flush_acks()
                self._send([codec.STATS_REPLY, self.index, self.epoch, msg[2], self.stats()])
            elif kind == codec.CONTROL:
                self._on_control(msg[2], msg[3])
            elif kind == codec.STOP:
                stop.append(0)  # the in-band stop request, for a worker that cannot be signalled
            else:
                counters["bad_frames"] += 1

    async def _heartbeat(self) -> None:
        """Beat every interval; the measured oversleep is the event-loop lag."""
        loop = asyncio.get_running_loop()
        interval = self.spec.heartbeat_interval_s
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag_s = max(0.0, loop.time() - due)
            self._send([codec.HEARTBEAT, self.index, self.epoch, self.loop_lag_s])

    # -- dispatch ----------------------------------------------------------------------------

    def _on_batch(self, msg: list[Any]) -> None:
        # The worker's hot path: the loop body runs once per message, so it does only what every
        # message needs. Messages that do not finish inline with a None result are noted as
        # holes; the acknowledged ranges are the batch minus the holes, computed once at the end.
        # (Replayed batches take the careful path instead.)
        first: int = msg[2]
        items = msg[4:]
        channels = self.channels
        ended = self._ended
        handler = self.handler
        assert handler is not None
        handle = handler.handle
        inline = not handler.is_async
        decode = codec.loads if self.decode else _identity
        results = self._results
        results_before = len(results)
        holes: list[int] = []
        stop = self._stop
        end = first + len(items)
        if self._slot is not None:
            self._slot.take(end - 1)
        for wseq, item in enumerate(items, first):
            if stop:
                # Asked to stop: the rest of the batch is never handed to the handler (and is not
                # acknowledged; the front reports it as unfinished).
                end = wseq
                break
            # _admit inlined: every message passes here.
            try:
                cid, cseq, payload = item
                ch = channels[cid]
            except KeyError:
                ch = channels[cid] = Channel(cid, ended)
            except (TypeError, ValueError):  # only a forged frame gets here; skip the item
                self.counters["bad_frames"] += 1
                holes.append(wseq)
                continue
            exp = ch._expect
            if cseq == exp:
                ch._expect = cseq + 1
            elif not self._order_check(ch, cseq, exp):
                holes.append(wseq)
                continue
            if inline and ch._queue is None:  # idle, not halted: run it right here
                try:
                    result = handle(ch, cseq, decode(payload), False)
                except Exception as exc:  # noqa: BLE001 - handler failures follow the policy
                    holes.append(wseq)
                    self._inline_failure(ch, (wseq, cseq, payload, False), exc)
                    continue
                if result is not None:
                    holes.append(wseq)
                    results.append([wseq, result])
            else:
                holes.append(wseq)
                self._enqueue(ch, (wseq, cseq, payload, False))
        start = first
        for hole in holes:
            self._ack_range(start, hole)
            start = hole + 1
        self._ack_range(start, end)
        # Finished here: everything but the holes, plus the holes that returned a value.
        self.counters["processed"] += end - first - len(holes) + len(results) - results_before
        if ended:
            self._release_ended()
        self._flush_acks()

    def _admit(self, item: Any) -> tuple[Channel, int, bytes] | None:
        """An item's channel (created if new), seq and payload, after the order check; None for a
        forged item (counted). The hot path of :meth:`_on_batch` has this inlined."""
        try:
            cid, cseq, payload = item
            ch = self.channels.get(cid)
        except (TypeError, ValueError):
            self.counters["bad_frames"] += 1
            return None
        if ch is None:
            ch = self.channels[cid] = Channel(cid, self._ended)
        exp = ch._expect
        if cseq == exp:
            ch._expect = cseq + 1
        elif not self._order_check(ch, cseq, exp):
            return None
        return ch, cseq, payload

    async def _careful_batch(self, msg: list[Any]) -> None:
        """A batch re-sent after a crash: run it one message at a time, each recorded in the run
        slot while its handler runs, so that if this incarnation dies too the front knows which
        message it died on. Nothing else runs meanwhile (the serve loop waits for this)."""
        first: int = msg[2]
        items = msg[4:]
        self.counters["redelivered"] += len(items)
        if self._slot is not None:
            self._slot.take(first + len(items) - 1)
        loop = asyncio.get_running_loop()
        stop = self._stop
        assert self._idle is not None
        yield_at = loop.time() + CAREFUL_YIELD_S
        self._careful = True
        try:
            for wseq, item in enumerate(items, first):
                if stop:
                    return
                admitted = self._admit(item)
                if admitted is None:
                    continue
                ch, cseq, payload = admitted
                entry = (wseq, cseq, payload, True)
                if ch._queue is not None:  # halted before the replay: it waits, in order
                    self._enqueue(ch, entry)
                    continue
                ch._queue = collections.deque((entry,))
                ch._busy = True
                self._active += 1
                self._idle.clear()
                await self._drain_channel(ch, 0)
                if loop.time() >= yield_at:
                    # A sync handler never yields: let heartbeats and acknowledgements out.
                    await asyncio.sleep(0)
                    yield_at = loop.time() + CAREFUL_YIELD_S
        finally:
            self._careful = False

    def _order_check(self, ch: Channel, cseq: int, expected: int) -> bool:
        """``cseq`` is not the expected next one: classify, then move the expectation on.
        False: not a sequence number at all (only a forged frame has that); skip the item."""
        if type(cseq) is not int:  # checked here, off the hot path
            self.counters["bad_frames"] += 1
            return False
        if expected < 0:
            ch._first = cseq  # first message of this record: it sets the baseline
        elif cseq > expected:
            self.counters["gaps"] += 1
        elif cseq == expected - 1:
            self.counters["duplicates"] += 1
        else:
            self.counters["reorders"] += 1
        if cseq >= expected:
            ch._expect = cseq + 1
        return True

    def _ack_range(self, a: int, b: int) -> None:
        if a == b:
            return
        ranges = self._ranges
        if ranges and ranges[-1] == a:
            ranges[-1] = b
        else:
            ranges.append(a)
            ranges.append(b)

    def _enqueue(self, ch: Channel, item: tuple[int, int, bytes, bool]) -> None:
        q = ch._queue
        if q is None:
            q = ch._queue = collections.deque()
        q.append(item)
        if not ch._busy and not ch._halted:
            self._start_channel(ch, first_attempt=0)

    def _start_channel(self, ch: Channel, first_attempt: int) -> None:
        ch._busy = True
        self._active += 1
        assert self._idle is not None
        self._idle.clear()
        asyncio.get_running_loop().create_task(self._drain_channel(ch, first_attempt))

    async def _drain_channel(self, ch: Channel, attempt: int) -> None:
        """Run the channel's queued messages one at a time until empty, halted or stopped."""
        q = ch._queue
        stop = self._stop
        try:
            while q and not ch._halted:
                if stop and not attempt:
                    break  # start nothing new; a retry in progress is the current call
                if await self._run_one(ch, q[0], attempt):
                    q.popleft()
                attempt = 0
        finally:
            ch._busy = False
            if not q and not ch._halted:
                ch._queue = None  # idle again: back to the inline fast path
            self._active -= 1
            if self._active == 0 and self._idle is not None:
                self._idle.set()
            if self._ended:
                self._release_ended()
                if self._forgotten:
                    self._schedule_flush()

    async def _run_one(self, ch: Channel, item: tuple[int, int, bytes, bool], attempt: int) -> bool:
        """Process one message under the failure policy. False: the channel is now halted."""
        wseq, cseq, payload, redelivered = item
        handler = self.handler
        assert handler is not None
        spec = self.spec
        slot = self._slot if self._careful else None
        while True:
            if attempt:
                await asyncio.sleep(spec.retry_backoff_s * (2 ** (attempt - 1)))
            try:
                message = codec.loads(payload) if self.decode else payload
                if slot is not None:
                    slot.run(wseq)
                result = handler.handle(ch, cseq, message, redelivered)
                if handler.is_async:
                    result = await result
            except Exception as exc:  # noqa: BLE001 - handler failures follow the policy
                policy = self._policy(payload)
                if policy == "retry" and attempt < spec.retry_limit:
                    attempt += 1
                    self.counters["retried"] += 1
                    continue
                if policy == "skip":
                    self._fail(wseq, exc, "skip")
                    return True
                self._fail(wseq, exc, "halt")
                ch._halted = True
                return False
            finally:
                if slot is not None:
                    slot.run(NO_MESSAGE)
            self.counters["processed"] += 1
            self._complete(wseq, result)
            return True

    def _inline_failure(
        self, ch: Channel, item: tuple[int, int, bytes, bool], exc: Exception
    ) -> None:
        """A sync handler failed on the fast path: apply the policy without blocking the loop."""
        policy = self._policy(item[2])
        if policy == "skip":
            self._fail(item[0], exc, "skip")
            return
        ch._queue = collections.deque((item,))
        if policy == "retry" and self.spec.retry_limit > 0:
            self.counters["retried"] += 1
            self._start_channel(ch, first_attempt=1)
        else:
            self._fail(item[0], exc, "halt")
            ch._halted = True

    def _policy(self, payload: bytes) -> str:
        """The failure policy for this message: its type's override, else the pool's (failures
        are rare, so decoding the payload again here costs nothing on the hot path)."""
        by_type = self.spec.failure_policy_by_type
        if by_type and self.decode:
            try:
                kind = codec.loads(payload).get("type")
            except Exception:  # noqa: BLE001 - not a map, or not CBOR: no type to go by
                kind = None
            if isinstance(kind, str) and kind in by_type:
                return by_type[kind]
        return self.spec.failure_policy

    def _on_control(self, op: str, cid: bytes) -> None:
        """Operator decisions for a halted channel: ``resume`` retries the failed message,
        ``skip`` reports it skipped and continues with the next one. ``halt`` parks a channel
        before a replay reaches it (the front remembers halts across worker restarts)."""
        ch = self.channels.get(cid)
        if op == "halt":
            if ch is None:
                ch = self.channels[cid] = Channel(cid, self._ended)
            ch._halted = True
            if ch._queue is None:
                ch._queue = collections.deque()
            return
        if ch is None or not ch._halted:
            return
        ch._halted = False
        q = ch._queue
        if op == "skip" and q:
            wseq = q.popleft()[0]
            self._failures.append([wseq, "Skipped", "skipped by operator", "", "skipped"])
            self._schedule_flush()
        if ch._busy:
            return
        if q:
            self._start_channel(ch, first_attempt=0)
        else:
            ch._queue = None

    # -- forgetting channels -----------------------------------------------------------------

    def _forget(self, ch: Channel) -> None:
        """Drop ``ch``'s record; the next :meth:`_flush_acks` tells the front, so that it can drop
        its own unless a newer message of the channel is already on its way."""
        if self.channels.get(ch.id) is not ch:
            return
        del self.channels[ch.id]
        self._forgotten.append([ch.id, ch._expect])
        self.counters["forgotten"] += 1

    def _release_ended(self) -> None:
        """Drop the channels whose handler called ``channel.end()`` and that have nothing left to
        run (a halted or busy one waits until its queue is done)."""
        ended = self._ended
        keep = [ch for ch in ended if ch._queue is not None]
        for ch in ended:
            if ch._queue is None:
                self._forget(ch)
        ended[:] = keep  # in place: every Channel holds this list

    async def _sweep(self, expiry_s: float) -> None:
        """Forget channels idle for ``expiry_s`` seconds: nothing queued or running, not halted,
        ``state`` None. A channel counts as idle from the first sweep that finds it unchanged
        (no new message since the previous sweep), so one is forgotten after ``expiry_s`` to
        ``1.5 * expiry_s`` of silence. The scan yields to the event loop every
        :data:`SWEEP_CHUNK` channels."""
        interval = max(0.01, expiry_s / 2)
        while True:
            await asyncio.sleep(interval)
            chans = list(self.channels.values())
            for i in range(0, len(chans), SWEEP_CHUNK):
                if i:
                    await asyncio.sleep(0)
                for ch in chans[i : i + SWEEP_CHUNK]:
                    if ch._expect != ch._mark or ch._queue is not None or ch.state is not None:
                        ch._mark = ch._expect
                        ch._idle_sweeps = 0
                    else:
                        ch._idle_sweeps += 1
                        if ch._idle_sweeps >= 2:
                            self._forget(ch)
            if self._forgotten:
                self._flush_acks()

    # -- acknowledgements --------------------------------------------------------------------

    def _complete(self, wseq: int, result: Any) -> None:
        if result is None:
            ranges = self._ranges
            if ranges and ranges[-1] == wseq:
                ranges[-1] = wseq + 1
            else:
                ranges.append(wseq)
                ranges.append(wseq + 1)
        else:
            self._results.append([wseq, result])
        self._schedule_flush()

    def _fail(self, wseq: int, exc: BaseException, action: str) -> None:
        self.counters["failed"] += 1
        self._failures.append(_failure_entry(wseq, exc, action))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        # Completions of many channels in one loop iteration share one ACK frame.
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_acks)

    def _flush_acks(self) -> None:
        self._flush_scheduled = False
        if not (self._ranges or self._results or self._failures or self._forgotten):
            return
        frame = [
            codec.ACK,
            self.index,
            self.epoch,
            self._ranges,
            self._results,
            self._failures,
            self._forgotten,
        ]
        try:
            data = codec.dumps(frame)
        except Exception:  # noqa: BLE001 - one unencodable result must not lose the others
            data = codec.dumps(self._sanitised(frame))
        self._ranges = []
        self._results = []
        self._failures = []
        self._forgotten = []
        assert self.push is not None
        self.push.send(data)

    def _sanitised(self, frame: list[Any]) -> list[Any]:
        """Turn results that CBOR cannot encode into failures of their own message."""
        results = []
        for wseq, value in frame[4]:
            try:
                codec.dumps(value)
            except Exception as exc:  # noqa: BLE001
                self.counters["failed"] += 1
                frame[5].append(
                    _failure_entry(
                        wseq, TypeError(f"handler result is not CBOR-encodable: {exc}"), "skip"
                    )
                )
            else:
                results.append([wseq, value])
        frame[4] = results
        return frame

    def _send(self, obj: list[Any]) -> None:
        assert self.push is not None
        self.push.send(codec.dumps(obj))

    # -- introspection -----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters and gauges of this incarnation (plain CBOR-encodable values)."""
        queued = 0
        halted = 0
        for ch in self.channels.values():
            if ch._queue:
                queued += len(ch._queue)
            if ch._halted:
                halted += 1
        hot = heapq.nlargest(
            HOT_CHANNELS, self.channels.values(), key=lambda c: c._expect - c._first
        )
        return {
            **self.counters,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "channels": len(self.channels),
            "queued": queued,
            "halted_channels": halted,
            "busy_channels": self._active,
            "loop_lag_s": self.loop_lag_s,
            "hot_channels": [[c.id, c._expect - c._first] for c in hot],
        }
