"""The worker process: one asyncio event loop serving its channels strictly in order.

Each channel has a FIFO; at most one handler call per channel runs at a time (including its awaits),
so an ``async`` handler waiting on I/O lets *other* channels of this worker proceed while its own
channel waits. A sync handler runs inline, message after message, straight from the decoded frame:
for the common case that is the whole hot path (no task, no queue).

The worker verifies the per-channel sequence numbers the front stamped (gaps, duplicates and
reorders are counted — all zero in a healthy pool), acknowledges what finished, reports failures
with their traceback under the configured policy, sends heartbeats from its event loop, and exits on
its own when the front (its parent) disappears.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from . import codec
from .handler import Channel, HandlerSpec, load_handler, maybe_await

EXIT_OK = 0
"""Clean exit after a STOP from the front."""
EXIT_START_FAILED = 3
"""The handler could not be imported, built or set up; a FATAL frame carried the traceback."""
EXIT_PARENT_GONE = 4
"""The front process disappeared; the worker left rather than run orphaned."""

FINAL_ACTIONS = frozenset({"skip", "skipped"})
"""Failure actions after which the message is finished (acknowledged); ``halt`` is not final."""

HOT_CHANNELS = 10


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


def worker_main(spec: WorkerSpec) -> None:
    """Process entry point (target of the spawned process). Exits with an ``EXIT_*`` code."""
    # The front coordinates shutdown: Ctrl-C in a terminal reaches the whole process group, and a
    # worker that died of it would look like a crash. SIGTERM keeps its default (die), which is
    # what the supervisor uses to stop a worker that does not leave by itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The front blocked these before spawning us so that no signal could hit a half-started child.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(asyncio.run(Worker(spec).run()))


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
        self._flush_scheduled = False
        self._active = 0  # channels with a running call or retry wait
        self._idle: asyncio.Event | None = None
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
            ),
            0,
        )
        self.loop_lag_s = 0.0
        self.push: zmq.Socket[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until STOP, stop. Returns the exit code."""
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
            self._idle = asyncio.Event()
            self._idle.set()
            push.send(codec.dumps([codec.READY, self.index, self.epoch, os.getpid()]))
            beat = asyncio.get_running_loop().create_task(self._heartbeat())
            try:
                await self._serve(pull)
                # STOP: let running calls finish (halted channels stay parked; the front reports
                # their messages as not processed), then say goodbye.
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
                beat.cancel()
                pull.close(linger=0)
            if self.handler.teardown is not None:
                await maybe_await(self.handler.teardown())
            push.send(codec.dumps([codec.BYE, self.index, self.epoch, self.stats()]))
            return EXIT_OK
        finally:
            push.close()
            ctx.term()

    async def _serve(self, pull: zmq.asyncio.Socket) -> None:
        """Receive and dispatch frames until a STOP of our epoch arrives."""
        loads = codec.loads
        counters = self.counters
        while True:
            frame = await pull.recv()
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
                self._on_batch(msg)
            elif kind == codec.STATS:
                self._flush_acks()
                self._send([codec.STATS_REPLY, self.index, self.epoch, msg[2], self.stats()])
            elif kind == codec.CONTROL:
                self._on_control(msg[2], msg[3])
            elif kind == codec.STOP:
                return
            else:
                counters["bad_frames"] += 1

    async def _heartbeat(self) -> None:
        """Beat every interval; the measured oversleep is the event-loop lag."""
        loop = asyncio.get_running_loop()
        interval = self.spec.heartbeat_interval_s
        parent = self.spec.parent_pid
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag_s = max(0.0, loop.time() - due)
            if parent and os.getppid() != parent:
                # Re-parented: the front is gone. Leaving at once is the point; nothing we could
                # still acknowledge has anyone to receive it.
                os._exit(EXIT_PARENT_GONE)
            self._send([codec.HEARTBEAT, self.index, self.epoch, self.loop_lag_s])

    # -- dispatch ----------------------------------------------------------------------------

    def _on_batch(self, msg: list[Any]) -> None:
        # The worker's hot path: the loop body runs once per message, so it does only what every
        # message needs. Messages that do not finish inline with a None result are noted as
        # holes; the acknowledged ranges are the batch minus the holes, computed once at the end.
        first: int = msg[2]
        redelivered: bool = msg[3]
        items = msg[4:]
        channels = self.channels
        handler = self.handler
        assert handler is not None
        handle = handler.handle
        inline = not handler.is_async
        decode = codec.loads if self.decode else _identity
        results = self._results
        results_before = len(results)
        holes: list[int] = []
        if redelivered:
            self.counters["redelivered"] += len(items)
        for wseq, item in enumerate(items, first):
            try:
                cid, cseq, payload = item
                ch = channels[cid]
            except KeyError:
                ch = channels[cid] = Channel(cid)
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
                    result = handle(ch, cseq, decode(payload), redelivered)
                except Exception as exc:  # noqa: BLE001 - handler failures follow the policy
                    holes.append(wseq)
                    self._inline_failure(ch, (wseq, cseq, payload, redelivered), exc)
                    continue
                if result is not None:
                    holes.append(wseq)
                    results.append([wseq, result])
            else:
                holes.append(wseq)
                self._enqueue(ch, (wseq, cseq, payload, redelivered))
        end = first + len(items)
        start = first
        for hole in holes:
            self._ack_range(start, hole)
            start = hole + 1
        self._ack_range(start, end)
        # Finished here: everything but the holes, plus the holes that returned a value.
        self.counters["processed"] += len(items) - len(holes) + len(results) - results_before
        self._flush_acks()

    def _order_check(self, ch: Channel, cseq: int, expected: int) -> bool:
        """``cseq`` is not the expected next one: classify, then move the expectation on.
        False: not a sequence number at all (only a forged frame has that); skip the item."""
        if type(cseq) is not int:  # checked here, off the hot path
            self.counters["bad_frames"] += 1
            return False
        if expected < 0:
            ch._first = cseq  # first message of this incarnation: it sets the baseline
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
        """Run the channel's queued messages one at a time until empty or halted."""
        q = ch._queue
        try:
            while q and not ch._halted:
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

    async def _run_one(self, ch: Channel, item: tuple[int, int, bytes, bool], attempt: int) -> bool:
        """Process one message under the failure policy. False: the channel is now halted."""
        wseq, cseq, payload, redelivered = item
        handler = self.handler
        assert handler is not None
        spec = self.spec
        while True:
            if attempt:
                await asyncio.sleep(spec.retry_backoff_s * (2 ** (attempt - 1)))
            try:
                message = codec.loads(payload) if self.decode else payload
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
                ch = self.channels[cid] = Channel(cid)
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
        if not (self._ranges or self._results or self._failures):
            return
        frame = [codec.ACK, self.index, self.epoch, self._ranges, self._results, self._failures]
        try:
            data = codec.dumps(frame)
        except Exception:  # noqa: BLE001 - one unencodable result must not lose the others
            data = codec.dumps(self._sanitised(frame))
        self._ranges = []
        self._results = []
        self._failures = []
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
