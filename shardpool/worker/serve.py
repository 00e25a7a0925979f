"""One worker incarnation's life: start, serve frames until asked to stop, finish, say BYE.

The serve loop reads the frames of the front (batches, stats requests, operator controls, the stop
request) on one asyncio event loop and hands batches to the :class:`~.dispatch.Dispatcher`.
Beside it run the heartbeat (whose oversleep is the event-loop lag) and, when configured, the idle
sweep that forgets channels silent for ``channel_idle_expiry_s``.

A stop request (SIGTERM, or a STOP frame) is recorded by the signal handler; the dispatch loops
check it between messages, so a long batch of a sync handler stops after the call in progress.
The worker then reports which calls are running (STOPPING), lets them finish, acknowledges them
and says BYE before it exits.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import heapq
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any

import zmq

from .. import codec
from ..codec import ToFront, ToWorker
from ..exitcodes import EXIT_OK, EXIT_START_FAILED
from ..handler import load_handler, maybe_await, move_state_of
from .acks import Acks
from .dispatch import COUNTERS, Dispatcher
from .lease import Lease
from .process import RunSlot, WorkerSpec

__all__ = ["Worker"]

log = logging.getLogger("shardpool.worker")

HOT_CHANNELS = 10
"""Channels listed in the stats as the hottest (most messages since this incarnation began)."""

SWEEP_CHUNK = 5000
"""Channels examined per event-loop turn by the idle sweep."""

YIELD_S = 0.005
"""A worker kept busy lets its event loop run the other tasks (heartbeat, LOAD report, idle sweep,
async handler calls) at least this often (seconds), one handler call permitting: between frames,
and between the slices of a batch of slow calls."""

MAX_SLICE = 65_536
"""The most messages of one batch handed over at once (more than any batch holds)."""


class Worker:
    """The state of one worker incarnation; :meth:`run` is its whole life."""

    def __init__(
        self, spec: WorkerSpec, sock: zmq.Socket[bytes] | None = None, lease: Lease | None = None
    ) -> None:
        """``sock``: a remote worker's connected DEALER, both ways (None: a local worker, which
        binds its PULL and connects a PUSH); ``lease``: a remote worker's lease to the front."""
        self.spec = spec
        self._sock = sock
        self.lease = lease
        # A remote link must never skip a frame: the next wseq the front will send (None: any).
        self._next_wseq: int | None = None
        # A remote worker's frames read ahead of the one being served (see _recv_remote).
        self._queued: collections.deque[bytes] = collections.deque()
        # Messages of a batch handed over at once: a whole batch while calls are fast, fewer
        # once a batch took longer than YIELD_S (see _sliced_batch).
        self._slice = MAX_SLICE
        self.index = spec.index
        self.epoch = spec.epoch
        # Non-empty once a stop was requested (the signal numbers; 0 for a STOP frame). A list so
        # the hot loops test a local name, and so the signal handler only has to append.
        self.stop: list[int] = []
        self._stop_reported = False
        self._recv: Any = None  # the pending receive of the serve loop, cancelled by a stop
        self.acks = Acks(spec.index, spec.epoch)
        self.dispatch: Dispatcher | None = None
        self.stale_frames = 0
        self.bad_frames = 0
        self.loop_lag_s = 0.0

    def note_stop(self, signum: int, frame: FrameType | None) -> None:
        """SIGTERM handler: only record the request (the loops act on it between messages)."""
        self.stop.append(signum)

    async def run(self) -> int:
        """Start, serve until asked to stop, finish what is running, say BYE. Returns the exit
        code."""
        if self._sock is not None:
            return await self._run(self._sock, self._sock)  # remote: one socket, the caller's
        # Plain sockets: sends never need to wait (HWM 0 below), and the serve loop waits for
        # the PULL socket's FD in the event loop itself (no future per frame).
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        # No high-water mark: the front's in-flight window already bounds what can be queued, and
        # a blocking send here could deadlock against a front that is blocked on us.
        push.sndhwm = 0
        push.linger = 2000  # a FATAL or BYE must get out before the process ends
        push.connect(self.spec.front_endpoint)
        pull = ctx.socket(zmq.PULL)
        pull.rcvhwm = 0
        pull.linger = 0
        try:
            pull.bind(self.spec.data_endpoint)  # the front connects once it has our READY
            return await self._run(push, pull)
        finally:
            pull.close(linger=0)
            push.close()
            ctx.term()

    async def _run(self, push: zmq.Socket[bytes], pull: zmq.Socket[bytes]) -> int:
        # A remote worker's socket has no peer once its connection dropped (it never
        # reconnects), and a send with no peer would block: its sends never wait.
        self.acks.push = push if self.lease is None else _Unblocked(push)
        try:
            handler = load_handler(self.spec.handler, self.spec.handler_options)
            mode = move_state_of(self.spec.move_state, handler, self.spec.handler)
            if mode != self.spec.move_state:
                self.spec = dataclasses.replace(self.spec, move_state=mode)
            if handler.setup is not None:
                await maybe_await(handler.setup(self.index))
            slot = RunSlot(self.spec.run_slot) if self.spec.run_slot else None
        except BaseException as exc:  # noqa: BLE001 - any start failure is reported, then fatal
            self._report_failure(ToFront.FATAL, exc)
            return EXIT_START_FAILED
        self.dispatch = Dispatcher(self.spec, handler, self.acks, self.stop, slot)
        loop = asyncio.get_running_loop()
        if self.lease is not None:
            self.lease.start(lambda: self._fence(loop))
        # The loop callback wakes the serve loop; the plain handler (re-installed, since
        # add_signal_handler replaced it) records the request at once, even mid-call.
        loop.add_signal_handler(signal.SIGTERM, self.on_stop_request)
        signal.signal(signal.SIGTERM, self.note_stop)
        self.acks.send(ToFront.READY, os.getpid())
        tasks = [loop.create_task(self._heartbeat())]
        if self.spec.channel_idle_expiry_s > 0:
            tasks.append(loop.create_task(self._sweep(self.spec.channel_idle_expiry_s)))
        if self.spec.load_interval_s > 0:
            tasks.append(loop.create_task(self._report_load(self.spec.load_interval_s)))
        try:
            await self.serve(pull)
            # Asked to stop: report what is running, let it finish (halted channels stay
            # parked; the front reports their messages), acknowledge, say goodbye.
            self.on_stop_request()
            await self.dispatch.idle.wait()
            self.acks.flush()
        except BaseException as exc:
            # Dying (a bug, or a handler raising SystemExit/KeyboardInterrupt): the front will
            # see the death on the sentinel; this tells it why, traceback included.
            if not isinstance(exc, asyncio.CancelledError):
                self._report_failure(ToFront.CRASH, exc)
            raise
        finally:
            for task in tasks:
                task.cancel()
            if self.lease is not None:
                self.lease.close()
        # BYE before the teardown hook: from here on nothing of ours will run a message.
        self.acks.send(ToFront.BYE, self.stats())
        if handler.teardown is not None:
            await maybe_await(handler.teardown())
        return EXIT_OK

    def _report_failure(self, kind: ToFront, exc: BaseException) -> None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        self.acks.send(kind, type(exc).__qualname__, str(exc), tb)

    def _fence(self, loop: asyncio.AbstractEventLoop) -> None:
        """The lease ran out (the lease's thread): start no call from now on, end this
        incarnation (the front gives its channels to other workers once the lease is surely
        over on its side too)."""
        self.stop.append(-1)
        with contextlib.suppress(RuntimeError):  # the loop already closed: nothing to wake
            loop.call_soon_threadsafe(self.on_stop_request)

    def on_stop_request(self) -> None:
        """Act on a stop request (event-loop callback; idempotent): from now on no handler call
        starts; tell the front which calls are running (the rest of what it sent us will never
        run) and wake the serve loop."""
        if not self.stop:
            self.stop.append(0)
        if self._stop_reported or self.acks.push is None or self.dispatch is None:
            return
        self._stop_reported = True
        self.acks.flush()
        self.acks.send(ToFront.STOPPING, self.dispatch.running())
        recv = self._recv
        if isinstance(recv, asyncio.Future) and not recv.done():
            recv.cancel()

    async def serve(self, pull: zmq.Socket[bytes]) -> None:
        """Receive and dispatch frames until a stop is requested (SIGTERM or a STOP frame)."""
        loads = codec.loads
        stop = self.stop
        dispatch = self.dispatch
        assert dispatch is not None
        loop = asyncio.get_running_loop()
        clock = loop.time
        recv = pull.recv if self.lease is None else self._recv_remote
        yield_due = clock() + YIELD_S
        while not stop:
            try:
                frame = recv(zmq.NOBLOCK)
            except zmq.Again:
                # Nothing waiting: sleep in the event loop until the socket is readable. Its FD
                # signals edges of EVENTS, so EVENTS is read before waiting (that re-arms it).
                if int(pull.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                    continue
                if await self._readable(loop, pull):
                    return  # on_stop_request woke us
                yield_due = clock() + YIELD_S
                continue
            if clock() >= yield_due:
                # Under sustained load a frame is always waiting and the loop never waits: give
                # the heartbeat, the LOAD report and the sweep a turn now and then.
                await asyncio.sleep(0)
                yield_due = clock() + YIELD_S
            try:
                msg = loads(frame)
                kind = msg[0]
                epoch = msg[1]
            except Exception:  # noqa: BLE001 - a malformed frame must not take the worker down
                self.bad_frames += 1
                continue
            if epoch != self.epoch:
                self.stale_frames += 1
                continue
            if self.lease is not None and not self._in_sequence(kind, msg):
                return  # a frame went missing: nothing after it may run here
            if kind == ToWorker.BATCH:
                if msg[3]:
                    await dispatch.careful_batch(msg)
                elif len(msg) - 4 <= self._slice:
                    self._whole_batch(dispatch, msg, clock)
                else:
                    await self._sliced_batch(dispatch, msg, clock)
            else:
                self._cold_frame(dispatch, kind, msg)

    def _whole_batch(
        self, dispatch: Dispatcher, msg: list[Any], clock: Callable[[], float]
    ) -> None:
        """A batch in one go (the common case: calls are fast). If it took longer than
        :data:`YIELD_S`, the next batches are handed over in slices (see :meth:`_sliced_batch`)."""
        start = clock()
        dispatch.on_batch(msg)
        took = clock() - start
        if took > YIELD_S:
            self._slice = max(1, int((len(msg) - 4) * YIELD_S / took))

    async def _sliced_batch(
        self, dispatch: Dispatcher, msg: list[Any], clock: Callable[[], float]
    ) -> None:
        """A batch of slow calls, a slice of about :data:`YIELD_S` at a time: between slices the
        event loop runs (the heartbeat goes out, so a long batch of a sync handler does not read
        as a hung worker), and a remote worker reads what the front sent meanwhile (a LEASE
        renews its lease, a STOP stops it). The slice follows the calls' cost: it halves when a
        slice took too long and doubles when calls are fast again, back to whole batches."""
        first: int = msg[2]
        items = msg[4:]
        count = len(items)
        size = self._slice
        at = 0
        while at < count and not self.stop:
            start = clock()
            end = dispatch.on_batch([msg[0], msg[1], first + at, False, *items[at : at + size]])
            took = clock() - start
            at = end - first
            if took > YIELD_S:
                size = max(1, int(size * YIELD_S / took))
            elif took < YIELD_S / 4:
                size = min(MAX_SLICE, size * 2)
            if at < count:
                await asyncio.sleep(0)
                if self.lease is not None:
                    self._read_ahead()
        self._slice = size

    def _read_ahead(self) -> None:
        """Read everything ZeroMQ holds for a remote worker: LEASE and STOP are taken now, the
        other frames queued to be served in order (see :meth:`_recv_remote`)."""
        queued = self._queued
        sock = self._sock
        assert sock is not None
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            head = frame[:2]
            if head == _LEASE_HEAD:
                self._take_lease(frame)
            elif head == _STOP_HEAD and self._current(frame):
                self.stop.append(0)
            else:
                queued.append(frame)

    def _recv_remote(self, flags: int = 0) -> bytes:
        """A remote worker's next frame (as ``sock.recv(zmq.NOBLOCK)``). Everything ZeroMQ holds
        is read ahead first, so that a LEASE is taken at once, not after the batches sent
        before it have been served (up to a window of work): the lease measures the front, not
        this worker's backlog. A STOP is taken at once too, as a local worker's SIGTERM is: no
        call starts after it. Both are known by their first two bytes, without decoding.

        Raises:
            zmq.Again: nothing to serve.
        """
        self._read_ahead()
        if self._queued:
            return self._queued.popleft()
        raise zmq.Again

    def _current(self, frame: bytes) -> bool:
        """Whether a cold frame belongs to this incarnation."""
        try:
            return bool(codec.loads(frame)[1] == self.epoch)
        except Exception:  # noqa: BLE001 - a malformed frame must not take the worker down
            self.bad_frames += 1
            return False

    def _take_lease(self, frame: bytes) -> None:
        try:
            msg = codec.loads(frame)
            if msg[1] == self.epoch and self.lease is not None:
                self.lease.renew(msg[2])
        except Exception:  # noqa: BLE001 - a malformed frame must not take the worker down
            self.bad_frames += 1

    def _in_sequence(self, kind: int, msg: list[Any]) -> bool:
        """Whether a remote link's window entry (BATCH, INSTALL) follows the last one without a
        gap. One tcp connection delivers in order or not at all, and a remote worker never
        reconnects within an incarnation, so a gap is a bug somewhere: fence rather than run
        messages past a missing one."""
        if kind == ToWorker.BATCH:
            n = len(msg) - 4
        elif kind == ToWorker.INSTALL:
            n = 1
        else:
            return True
        first = msg[2]
        if self._next_wseq is not None and first != self._next_wseq:
            log.error(
                "worker %d: frame %s follows %s: a frame is missing; leaving this incarnation",
                self.index, first, self._next_wseq - 1,
            )
            self.stop.append(-1)
            return False
        self._next_wseq = first + n
        return True

    async def _readable(self, loop: asyncio.AbstractEventLoop, pull: zmq.Socket[bytes]) -> bool:
        """Wait until ``pull``'s FD signals (a bare reader callback: cheaper per wake than a
        ``zmq.asyncio`` receive); True if a stop request cancelled the wait."""
        fd = int(pull.getsockopt(zmq.FD))
        waiter = self._recv = loop.create_future()
        loop.add_reader(fd, _wake, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if self.stop:
                return True
            raise
        finally:
            loop.remove_reader(fd)
            self._recv = None
        return False

    def _cold_frame(self, dispatch: Dispatcher, kind: int, msg: list[Any]) -> None:
        """Every frame but BATCH."""
        if kind == ToWorker.STATS:
            self.acks.flush()
            self.acks.send(ToFront.STATS, msg[2], self.stats())
        elif kind == ToWorker.CONTROL:
            dispatch.on_control(msg[2], msg[3])
        elif kind == ToWorker.INSTALL:
            dispatch.handoff.on_install(msg[2], msg[3], msg[4])
        elif kind == ToWorker.DRAIN:
            dispatch.handoff.on_drain(msg[2], msg[3], msg[4], msg[5])
        elif kind == ToWorker.CANCEL:
            dispatch.handoff.on_cancel(msg[2])
        elif kind == ToWorker.STOP:
            self.stop.append(0)  # the in-band stop request, for a worker that cannot be signalled
        else:
            self.bad_frames += 1

    async def _heartbeat(self) -> None:
        """Beat every interval; the measured oversleep is the event-loop lag."""
        loop = asyncio.get_running_loop()
        interval = self.spec.heartbeat_interval_s
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag_s = max(0.0, loop.time() - due)
            lease = self.lease
            self.acks.send(
                ToFront.HEARTBEAT,
                self.loop_lag_s,
                time.monotonic(),
                0.0 if lease is None else lease.rtt_s,
            )

    async def _report_load(self, interval: float) -> None:
        """Every ``interval`` seconds, tell the front how busy this worker was (CPU seconds) and
        with which slots and channels (messages finished): the front's load levelling divides
        the CPU time among the slots by their messages."""
        dispatch = self.dispatch
        assert dispatch is not None
        loop = asyncio.get_running_loop()
        wall, cpu = loop.time(), time.process_time()
        while True:
            await asyncio.sleep(interval)
            now, now_cpu = loop.time(), time.process_time()
            slots, hot = dispatch.load_since_last(HOT_CHANNELS)
            self.acks.send(ToFront.LOAD, now - wall, now_cpu - cpu, slots, hot)
            wall, cpu = now, now_cpu

    async def _sweep(self, expiry_s: float) -> None:
        """Forget channels idle for ``expiry_s`` seconds: nothing queued or running, not halted,
        ``state`` None. A channel counts as idle from the first sweep that finds it unchanged
        (no new message since the previous sweep), so one is forgotten after ``expiry_s`` to
        ``1.5 * expiry_s`` of silence. The scan yields to the event loop every
        :data:`SWEEP_CHUNK` channels."""
        dispatch = self.dispatch
        assert dispatch is not None
        interval = max(0.01, expiry_s / 2)
        while True:
            await asyncio.sleep(interval)
            chans = list(dispatch.channels.values())
            for i in range(0, len(chans), SWEEP_CHUNK):
                if i:
                    await asyncio.sleep(0)
                dispatch.sweep(chans[i : i + SWEEP_CHUNK])
            if self.acks.forgotten:
                self.acks.flush()

    def stats(self) -> dict[str, Any]:
        """Counters and gauges of this incarnation (plain CBOR-encodable values)."""
        d = self.dispatch
        counters = dict.fromkeys(COUNTERS, 0) if d is None else dict(d.counters)
        counters["failed"] += self.acks.unencodable
        counters["bad_frames"] += self.bad_frames
        channels = [] if d is None else list(d.channels.values())
        queued = sum(len(ch._queue) for ch in channels if ch._queue)
        halted = sum(1 for ch in channels if ch._halted)
        hot = heapq.nlargest(HOT_CHANNELS, channels, key=lambda c: c._expect - c._first)
        return {
            **counters,
            "stale_frames": self.stale_frames,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "channels": len(channels),
            "queued": queued,
            "halted_channels": halted,
            "busy_channels": 0 if d is None else d.active,
            "loop_lag_s": self.loop_lag_s,
            "hot_channels": [[c.id, c._expect - c._first] for c in hot],
        }


class _Unblocked:
    """A remote worker's sends: never blocking. A frame that cannot leave (no connection any
    more) is dropped: the front hears nothing more from this incarnation, whose lease then runs
    out on both sides, and what it had unacknowledged is replayed elsewhere."""

    __slots__ = ("sock", "dropped")

    def __init__(self, sock: zmq.Socket[bytes]) -> None:
        self.sock = sock
        self.dropped = 0

    def send(self, data: bytes) -> None:
        try:
            self.sock.send(data, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1


_LEASE_HEAD = bytes((0x83, ToWorker.LEASE))
"""The first two bytes of every LEASE frame: a 3-element CBOR array, then its kind."""
_STOP_HEAD = bytes((0x82, ToWorker.STOP))
"""The first two bytes of every STOP frame."""


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
