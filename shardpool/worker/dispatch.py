"""Dispatch inside a worker: messages to channels, one handler call per channel at a time.

Each channel has a FIFO; at most one handler call per channel runs at a time (including its
awaits), so an ``async`` handler waiting on I/O lets *other* channels proceed while its own
channel waits. A sync handler runs inline, message after message, straight from the decoded frame:
for the common case that is the whole hot path (no task, no queue).

The per-channel sequence numbers the front stamped are verified on the way (gaps, duplicates and
reorders are counted — all zero in a healthy pool). A batch re-sent after a crash runs
*carefully*: one message at a time, each recorded in the run slot while its handler runs, so a
death during it names its message. Once a stop was requested no new call starts.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from collections.abc import Callable
from typing import Any

from .. import codec
from ..codec import Action
from ..errors import StateNotRestored
from ..handler import Channel, HandlerSpec
from ..routing import slot_of
from .acks import Acks
from .handoff import Handoff
from .process import NO_MESSAGE, RunSlot, WorkerSpec

__all__ = ["COUNTERS", "Dispatcher"]

CAREFUL_YIELD_S = 0.02
"""A careful replay gives the event loop a turn (heartbeats, acknowledgements) this often (s)."""

_Entry = tuple[int, int, bytes, bool]  # (wseq, cseq, payload, redelivered)

COUNTERS = (
    "processed",
    "failed",
    "retried",
    "redelivered",
    "gaps",
    "duplicates",
    "reorders",
    "bad_frames",
    "forgotten",
)
"""What a dispatcher counts (reported in the worker's stats)."""


def _identity(payload: bytes) -> bytes:
    return payload


class Dispatcher:
    """The channels of one worker incarnation and the calls of its handler.

    ``stop`` is the worker's stop list (non-empty once a stop was requested); ``run_slot`` its
    run slot (None outside a real worker). ``idle`` is set whenever no channel has a call running.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        handler: HandlerSpec,
        acks: Acks,
        stop: list[int],
        run_slot: RunSlot | None = None,
    ) -> None:
        self.spec = spec
        self.handler = handler
        self.acks = acks
        self.stop = stop
        self.run_slot = run_slot
        self.decode: Callable[[bytes], Any] = codec.loads if spec.payload == "cbor" else _identity
        self.channels: dict[bytes, Channel] = {}
        self.ended: list[Channel] = []  # channels whose handler called end(), not yet dropped
        self.active = 0  # channels with a running call or retry wait
        self.idle = asyncio.Event()
        self.idle.set()
        self.careful = False  # running a replayed batch: one call at a time, in the run slot
        self.handoff = Handoff(self)  # channels leaving and arriving with slot moves
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # -- batches -------------------------------------------------------------------------------

    def on_batch(self, msg: list[Any]) -> int:  # noqa: C901 - the hot path, one function on purpose
        """A BATCH frame that is not a replay (those go to :meth:`careful_batch`), or a slice of
        one (``[BATCH, epoch, first wseq of the slice, False, items...]``). Returns the wseq after
        the last message handed over: the end, unless a stop request came first."""
        # The worker's hot path: the loop body runs once per message, so it does only what every
        # message needs. Messages that do not finish inline with a None result are noted as
        # holes; the acknowledged ranges are the batch minus the holes, computed once at the end.
        first: int = msg[2]
        items = msg[4:]
        channels = self.channels
        handler = self.handler
        handle = handler.handle
        inline = not handler.is_async
        decode = self.decode
        acks = self.acks
        results = acks.results
        results_before = len(results)
        holes: list[int] = []
        stop = self.stop
        end = first + len(items)
        if self.run_slot is not None:
            self.run_slot.take(end - 1)
        for wseq, item in enumerate(items, first):
            if stop:
                # Asked to stop: the rest of the batch is never handed to the handler (and is not
                # acknowledged; the front reports it as unfinished).
                end = wseq
                break
            # admit() inlined: every message passes here.
            try:
                cid, cseq, payload = item
                ch = channels[cid]
            except KeyError:
                ch = self.new_channel(cid)
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
            acks.add_range(start, hole)
            start = hole + 1
        acks.add_range(start, end)
        # Finished here: everything but the holes, plus the holes that returned a value.
        self.counters["processed"] += end - first - len(holes) + len(results) - results_before
        if self.ended:
            self.release_ended()
        acks.flush()
        return end

    def new_channel(self, cid: bytes) -> Channel:
        """The record of a channel this worker has not seen (or has forgotten)."""
        ch = self.channels[cid] = Channel(cid, self.ended)
        ch._slot = slot_of(cid, self.spec.slots)
        return ch

    def admit(self, item: Any) -> tuple[Channel, int, bytes] | None:
        """An item's channel (created if new), seq and payload, after the order check; None for a
        forged item (counted). The hot path of :meth:`on_batch` has this inlined."""
        try:
            cid, cseq, payload = item
            ch = self.channels.get(cid)
        except (TypeError, ValueError):
            self.counters["bad_frames"] += 1
            return None
        if ch is None:
            ch = self.new_channel(cid)
        exp = ch._expect
        if cseq == exp:
            ch._expect = cseq + 1
        elif not self._order_check(ch, cseq, exp):
            return None
        return ch, cseq, payload

    async def careful_batch(self, msg: list[Any]) -> None:
        """A batch re-sent after a crash: run it one message at a time, each recorded in the run
        slot while its handler runs, so that if this incarnation dies too the front knows which
        message it died on. Nothing else runs meanwhile (the serve loop waits for this)."""
        first: int = msg[2]
        items = msg[4:]
        self.counters["redelivered"] += len(items)
        if self.run_slot is not None:
            self.run_slot.take(first + len(items) - 1)
        loop = asyncio.get_running_loop()
        stop = self.stop
        yield_at = loop.time() + CAREFUL_YIELD_S
        self.careful = True
        try:
            for wseq, item in enumerate(items, first):
                if stop:
                    return
                admitted = self.admit(item)
                if admitted is None:
                    continue
                ch, cseq, payload = admitted
                entry = (wseq, cseq, payload, True)
                if ch._queue is not None:  # halted before the replay: it waits, in order
                    self._enqueue(ch, entry)
                    continue
                ch._queue = collections.deque((entry,))
                ch._busy = True
                self.active += 1
                self.idle.clear()
                await self._drain_channel(ch, 0)
                if loop.time() >= yield_at:
                    # A sync handler never yields: let heartbeats and acknowledgements out.
                    await asyncio.sleep(0)
                    yield_at = loop.time() + CAREFUL_YIELD_S
        finally:
            self.careful = False

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

    # -- queued channels -----------------------------------------------------------------------

    def _enqueue(self, ch: Channel, entry: _Entry) -> None:
        q = ch._queue
        if q is None:
            q = ch._queue = collections.deque()
        q.append(entry)
        if not ch._busy and not ch._halted:
            self._start_channel(ch, first_attempt=0)

    def _start_channel(self, ch: Channel, first_attempt: int) -> None:
        ch._busy = True
        self.active += 1
        self.idle.clear()
        asyncio.get_running_loop().create_task(self._drain_channel(ch, first_attempt))

    async def _drain_channel(self, ch: Channel, attempt: int) -> None:
        """Run the channel's queued messages one at a time until empty, halted or stopped."""
        q = ch._queue
        stop = self.stop
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
            self.active -= 1
            if self.active == 0:
                self.idle.set()
            if self.ended:
                self.release_ended()
                if self.acks.forgotten:
                    self.acks.schedule()
            if self.handoff.leaving:
                self.handoff.check()

    async def _run_one(self, ch: Channel, entry: _Entry, attempt: int) -> bool:
        """Process one message under the failure policy. False: the channel is now halted."""
        wseq, cseq, payload, redelivered = entry
        handler = self.handler
        spec = self.spec
        slot = self.run_slot if self.careful else None
        unrestored = self.handoff.unrestored
        while True:
            if attempt:
                await asyncio.sleep(spec.retry_backoff_s * (2 ** (attempt - 1)))
            try:
                if unrestored and ch.id in unrestored:
                    cause = unrestored[ch.id]
                    raise StateNotRestored(
                        f"channel {ch.id.hex()}: its state could not be restored after a move: "
                        f"{type(cause).__name__}: {cause}"
                    ) from cause
                message = self.decode(payload)
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
                unrestored.pop(ch.id, None)  # reported once; the policy settles it
                if policy == "skip":
                    self._fail(wseq, exc, Action.SKIP)
                    return True
                self._fail(wseq, exc, Action.HALT)
                ch._halted = True
                return False
            finally:
                if slot is not None:
                    slot.run(NO_MESSAGE)
            self.counters["processed"] += 1
            self.acks.complete(wseq, result)
            return True

    def _inline_failure(self, ch: Channel, entry: _Entry, exc: Exception) -> None:
        """A sync handler failed on the fast path: apply the policy without blocking the loop."""
        policy = self._policy(entry[2])
        if policy == "skip":
            self._fail(entry[0], exc, Action.SKIP)
            return
        ch._queue = collections.deque((entry,))
        if policy == "retry" and self.spec.retry_limit > 0:
            self.counters["retried"] += 1
            self._start_channel(ch, first_attempt=1)
        else:
            self._fail(entry[0], exc, Action.HALT)
            ch._halted = True

    def _fail(self, wseq: int, exc: BaseException, action: Action) -> None:
        self.counters["failed"] += 1
        self.acks.fail(wseq, exc, action)

    def _policy(self, payload: bytes) -> str:
        """The failure policy for this message: its type's override, else the pool's (failures
        are rare, so decoding the payload again here costs nothing on the hot path)."""
        by_type = self.spec.failure_policy_by_type
        if by_type and self.spec.payload == "cbor":
            try:
                kind = codec.loads(payload).get("type")
            except Exception:  # noqa: BLE001 - not a map, or not CBOR: no type to go by
                kind = None
            if isinstance(kind, str) and kind in by_type:
                return by_type[kind]
        return self.spec.failure_policy

    def on_control(self, op: str, cid: bytes) -> None:
        """Operator decisions for a halted channel: ``resume`` retries the failed message,
        ``skip`` reports it skipped and continues with the next one. ``halt`` parks a channel
        before a replay reaches it (the front remembers halts across worker restarts)."""
        ch = self.channels.get(cid)
        if op == "halt":
            if ch is None:
                ch = self.new_channel(cid)
            ch._halted = True
            if ch._queue is None:
                ch._queue = collections.deque()
            return
        if ch is None or not ch._halted:
            return
        ch._halted = False
        q = ch._queue
        if op == "skip" and q:
            self.acks.skipped(q.popleft()[0])
        if ch._busy:
            return
        if q:
            self._start_channel(ch, first_attempt=0)
        else:
            ch._queue = None

    def running(self) -> list[int]:
        """The wseqs of the handler calls running now (one per busy channel)."""
        return [ch._queue[0][0] for ch in self.channels.values() if ch._busy and ch._queue]

    # -- load ----------------------------------------------------------------------------------

    def load_since_last(self, hot: int) -> tuple[dict[int, int], list[list[Any]]]:
        """Messages finished per slot since the last call (active slots only) and the ``hot``
        busiest channels as ``[cid, messages]``: what the front levels the load by."""
        per_slot: dict[int, int] = {}
        active: list[tuple[int, bytes]] = []
        for ch in self.channels.values():
            seen = ch._expect - ch._first
            n = seen - ch._reported
            if n > 0:
                ch._reported = seen
                per_slot[ch._slot] = per_slot.get(ch._slot, 0) + n
                active.append((n, ch.id))
        top = heapq.nlargest(hot, active)
        return per_slot, [[cid, n] for n, cid in top]

    # -- forgetting channels -------------------------------------------------------------------

    def forget(self, ch: Channel) -> None:
        """Drop ``ch``'s record; the next ACK tells the front, so that it can drop its own unless
        a newer message of the channel is already on its way."""
        if self.channels.get(ch.id) is not ch:
            return
        del self.channels[ch.id]
        self.acks.forgotten.append([ch.id, ch._expect])
        self.counters["forgotten"] += 1

    def release_ended(self) -> None:
        """Drop the channels whose handler called ``channel.end()`` and that have nothing left to
        run (a halted or busy one waits until its queue is done)."""
        ended = self.ended
        keep = [ch for ch in ended if ch._queue is not None]
        for ch in ended:
            if ch._queue is None:
                self.forget(ch)
        ended[:] = keep  # in place: every Channel holds this list

    def sweep(self, chans: list[Channel]) -> None:
        """One idle sweep over ``chans`` (see ``Worker._sweep``): a channel unchanged since the
        previous sweep, with nothing queued and no state, counts one more idle sweep; at two it is
        forgotten."""
        for ch in chans:
            if ch._expect != ch._mark or ch._queue is not None or ch.state is not None:
                ch._mark = ch._expect
                ch._idle_sweeps = 0
            else:
                ch._idle_sweeps += 1
                if ch._idle_sweeps >= 2:
                    self.forget(ch)
