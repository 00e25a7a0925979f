"""One worker's in-flight window: every message sent to it (or about to be) and not yet finished.

::

    pending batch (parts) ──seal──▶ Batch(first wseq, n, frame) ─┐      window = the batches, in
    [header slot, (prefix, head, payload) * k]                   ├──▶   wseq order, each until its
                                                                 │      last message finished
    ACK ranges / results / failures ──finish_range/finish_one────┘      (a whole batch at once in
                                                                         the common case)

The window keeps the frames it sent rather than one record per message: nothing is stored per
message on the producer's path, and a batch finished in order is retired with one dict operation.
Items are decoded from a frame only on the rare paths (out-of-order finishes, replay, close).

What is known about each message that is not finished, for a replay after a death or the report
at close, lives in its batch: ``sent`` (handed to the current incarnation) and ``doubt`` (an
incarnation that had it died without saying what it ran: it may have been applied). Each batch
also keeps ``at``, when it was sealed (one clock read per batch, none per message; a replay keeps
the original time), so the age of the oldest unfinished message (:meth:`Window.oldest_at`) costs
the hot path nothing. When a batch's last message finishes, its time since the seal goes into the
window's latency histogram once, weighted by its message count (``latency``, per
:data:`LATENCY_BOUNDS`): each message is counted at its batch's completion, an upper bound of its
send → result time (the linger before the seal not included), at a cost per batch.

A move's arrival (INSTALL: the moved channels' state) is a window entry too, one wseq long, so that
it is acknowledged, replayed first after a death, and always precedes the moved channels' messages.
It shows as an item with an empty channel id on the rare paths, and is never a message.

Not thread-safe: its owner (the front) calls it with its lock held. The producer hot path
(:meth:`shardpool.front.Front.submit_bytes`) appends to ``parts`` and bumps ``inflight`` itself;
everything else goes through the methods.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import codec
from ..codec import ToWorker

__all__ = ["LATENCY_BOUNDS", "Batch", "DoneCallback", "Replay", "Window"]

LATENCY_BOUNDS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
)
"""Upper bounds (seconds, inclusive) of the latency histogram's buckets; one more for +Inf."""

DoneCallback = Callable[[Any, "BaseException | None"], None]
Item = list[Any]  # [channel_id, cseq, payload] as decoded from a frame
# A message to send again: its item, its waiter, for an INSTALL entry (gen, states), and when its
# batch was first sealed (monotonic seconds).
_Resend = tuple[Item, "DoneCallback | None", "tuple[int, list[Any]] | None", float]
_item_head = codec.ITEM_HEAD
_monotonic = time.monotonic
_bucket = bisect.bisect_left
_CSEQ, _PAYLOAD = codec.CSEQ_HEAD, codec.PAYLOAD_HEAD


class Batch:
    """One batch of a window: its frame as sent (or sealed but not sent while the worker was
    down), which of its messages have finished, and, decoded only when needed, its items."""

    __slots__ = (
        "first", "n", "frame", "sent", "doubt", "remaining", "done", "install", "at", "_items"
    )

    def __init__(
        self,
        first: int,
        n: int,
        frame: bytes,
        sent: bool,
        doubt: bool = False,
        install: tuple[int, list[Any]] | None = None,
        at: float | None = None,
    ) -> None:
        self.first = first  # wseq of its first message; the others follow one by one
        self.n = n
        self.frame = frame
        self.sent = sent  # handed to the current incarnation
        # An incarnation that had it died without saying what it ran: each unfinished message may
        # have been applied (replayed marked redelivered; reported in doubt at close).
        self.doubt = doubt
        self.remaining = n
        self.done: set[int] | None = None  # wseqs finished so far, once any finished alone
        self.install = install  # (gen, states) of an INSTALL entry; None for a batch of messages
        # When it was sealed (monotonic seconds); a replayed message keeps its first batch's time.
        self.at = _monotonic() if at is None else at
        self._items: list[Item] | None = None

    def items(self) -> list[Item]:
        """``[channel_id, cseq, payload]`` of each message, in wseq order (an INSTALL entry: one
        item with an empty channel id)."""
        if self._items is None:
            self._items = [[b"", -1, b""]] if self.install else codec.loads(self.frame)[4:]
        return self._items


class Replay:
    """What a fresh incarnation must be sent: ``batches`` (already in the window, renumbered) and
    how many of their messages a dead incarnation may have run (``redelivered``)."""

    __slots__ = ("batches", "redelivered")

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.redelivered = 0


class Window:
    """The in-flight window of one worker (see the module docstring).

    Attributes used directly by the producer hot path: ``index`` (the worker), ``inflight``
    (messages accepted for this worker and not finished: the window size), ``parked`` (of those,
    messages of halted channels, which do not count against the limit), ``parts`` (the pending
    batch: ``[header placeholder, (prefix, head, payload) * k]``), ``next_wseq`` and ``waiters``
    (wseq → ``on_done`` of that message).
    """

    __slots__ = (
        "index",
        "inflight",
        "parked",
        "batches",
        "starts",
        "parts",
        "next_wseq",
        "batch_t0",
        "waiters",
        "latency",
        "latency_sum",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.inflight = 0
        self.parked = 0
        self.batches: dict[int, Batch] = {}  # first wseq → batch, in wseq order
        self.starts: list[int] = []  # first wseqs, sorted, to find a batch by any of its wseqs
        self.parts: list[bytes] = []
        self.next_wseq = 0
        self.batch_t0 = 0.0  # when the pending batch got its first message (monotonic seconds)
        self.waiters: dict[int, DoneCallback] = {}
        # Messages per latency bucket (LATENCY_BOUNDS, then +Inf; not cumulative) and their sum
        # of seconds, over this window's life (it outlives the worker's incarnations).
        self.latency = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0

    # -- filling -------------------------------------------------------------------------------

    def place(self, prefix: bytes, cseq: int, payload: bytes, on_done: DoneCallback | None) -> bool:
        """Put an already-numbered message into the pending batch: the same steps as the hot
        path of ``Front.submit_bytes``. Returns True when it opened a new batch."""
        self.inflight += 1
        parts = self.parts
        if on_done is not None:
            self.waiters[self.pending_wseq()] = on_done
        head = _item_head(_CSEQ, cseq, _PAYLOAD, len(payload))
        if parts:
            parts += (prefix, head, payload)
            return False
        parts += (b"", prefix, head, payload)
        return True

    def pending(self) -> int:
        """Messages in the pending batch."""
        return (len(self.parts) - 1) // 3 if self.parts else 0

    def pending_wseq(self) -> int:
        """The wseq the next message placed will get."""
        return self.next_wseq + self.pending()

    def add_install(self, epoch: int, gen: int, states: list[Any]) -> Batch:
        """Append a move's INSTALL entry after everything sealed (the caller flushed the pending
        batch first; it sends ``frame`` and sets ``sent``)."""
        assert not self.parts, "flush the pending batch before an INSTALL"
        first = self.next_wseq
        self.next_wseq = first + 1
        frame = codec.frame(ToWorker.INSTALL, epoch, first, gen, states)
        batch = Batch(first, 1, frame, False, install=(gen, states))
        self.batches[first] = batch
        self.starts.append(first)
        self.inflight += 1
        return batch

    def extract(self, channels: set[bytes]) -> list[tuple[Item, DoneCallback | None]]:
        """Take every unfinished message of ``channels`` out of the window, in order, with its
        waiter (a move carries a halted channel's parked messages to its new worker). The pending
        batch is not searched: the caller flushed it before the move began."""
        out: list[tuple[Item, DoneCallback | None]] = []
        for batch, w, item in list(self.entries()):
            if batch is not None and item[0] in channels:
                out.append((item, self.finish_one(batch, w, observe=False)))
        return out

    def seal(self, epoch: int) -> Batch:
        """Number the pending messages, build their frame for ``epoch`` and put it in the window
        (not yet sent: the caller sends ``frame`` and sets ``sent``)."""
        parts = self.parts
        n = (len(parts) - 1) // 3
        first = self.next_wseq
        self.next_wseq = first + n
        parts[0] = codec.batch_header(epoch, first, False, n)
        batch = Batch(first, n, b"".join(parts), False)
        parts.clear()
        self.batches[first] = batch
        self.starts.append(first)
        return batch

    # -- finishing -----------------------------------------------------------------------------

    def find(self, wseq: int) -> Batch | None:
        """The batch holding ``wseq`` (None: not in the window any more)."""
        batch = self.batches.get(wseq)
        if batch is not None:
            return batch
        starts = self.starts
        i = bisect.bisect_right(starts, wseq) - 1
        if i < 0:
            return None
        batch = self.batches.get(starts[i])
        if batch is None or wseq >= batch.first + batch.n:
            return None
        return batch

    def _observe(self, batch: Batch) -> None:
        """A batch's last message finished: count its messages at its age (once per batch)."""
        if batch.install is None:
            n = batch.n
            dt = _monotonic() - batch.at
            self.latency[_bucket(LATENCY_BOUNDS, dt)] += n
            self.latency_sum += dt * n

    def _drop(self, batch: Batch) -> None:
        del self.batches[batch.first]
        # starts keeps retired firsts (bisect skips them); compact it now and then.
        if len(self.starts) > 2 * len(self.batches) + 64:
            self.starts = list(self.batches)

    def finish_range(self, a: int, b: int, done: list[tuple[int, DoneCallback]]) -> int:
        """Retire wseqs ``a``..``b-1`` (finished with a None result); returns how many were still
        unfinished. Their waiters are appended to ``done`` as ``(wseq, on_done)``."""
        n = 0
        waiters = self.waiters
        while a < b:
            batch = self.find(a)
            if batch is None:
                a += 1
                continue
            end = min(b, batch.first + batch.n)
            if batch.done is None and a == batch.first and end == batch.first + batch.n:
                k = batch.n  # the whole batch, in order: the common case
                self._observe(batch)
                self._drop(batch)
            else:
                finished = batch.done if batch.done is not None else set()
                batch.done = finished
                k = 0
                for w in range(a, end):
                    if w not in finished:
                        finished.add(w)
                        k += 1
                batch.remaining -= k
                if batch.remaining == 0:
                    self._observe(batch)
                    self._drop(batch)
            if waiters:
                for w in range(a, end):
                    waiter = waiters.pop(w, None)
                    if waiter is not None:
                        done.append((w, waiter))
            n += k
            a = end
        self.inflight -= n
        return n

    def open(self, wseq: int) -> tuple[Batch, Item] | None:
        """The batch and item of ``wseq`` if it is still unfinished."""
        batch = self.find(wseq)
        if batch is None or (batch.done is not None and wseq in batch.done):
            return None
        return batch, batch.items()[wseq - batch.first]

    def message(self, wseq: int) -> tuple[bytes, int] | None:
        """``(channel_id, cseq)`` of ``wseq`` if it is still unfinished."""
        found = self.open(wseq)
        return None if found is None else (found[1][0], found[1][1])

    def waiter_of(self, channel_id: bytes, cseq: int) -> DoneCallback | None:
        """The ``on_done`` of an unfinished message, found by channel and seq (a scan)."""
        for _, w, item in self.entries():
            if item[0] == channel_id and item[1] == cseq:
                return self.waiters.get(w)
        return None

    def finish_one(self, batch: Batch, wseq: int, observe: bool = True) -> DoneCallback | None:
        """Retire one message found with :meth:`open`; returns its waiter, if it had one.
        ``observe``: it finished (False: it is taken elsewhere, not counted in ``latency``)."""
        if batch.done is None:
            batch.done = set()
        batch.done.add(wseq)
        batch.remaining -= 1
        if batch.remaining == 0:
            if observe:
                self._observe(batch)
            self._drop(batch)
        self.inflight -= 1
        return self.waiters.pop(wseq, None) if self.waiters else None

    # -- the rare paths ------------------------------------------------------------------------

    def entries(self) -> Iterator[tuple[Batch | None, int, Item]]:
        """Every unfinished message as ``(batch, wseq, [cid, cseq, payload])``, in order, the
        pending batch included (``batch`` None). Decodes: for the rare paths only."""
        for batch in self.batches.values():
            done = batch.done
            for i, item in enumerate(batch.items()):
                w = batch.first + i
                if done is None or w not in done:
                    yield batch, w, item
        if self.parts:
            frame = codec.batch_header(0, 0, False, self.pending()) + b"".join(self.parts[1:])
            for w, item in enumerate(codec.loads(frame)[4:], self.next_wseq):
                yield None, w, item

    def open_entries(self) -> list[tuple[int, Item]]:
        """Every unfinished message as ``(wseq, [cid, cseq, payload])``, in order."""
        return [(w, item) for _, w, item in self.entries()]

    def oldest_at(self) -> float | None:
        """When the oldest unfinished message in a batch was sealed (monotonic seconds; None:
        nothing sealed is unfinished). Messages of the pending batch are not counted: they wait at
        most the linger. O(1): batches are kept in wseq order, which is the order they were
        sealed in (a replay keeps the original times and puts the doubtful ones, the earliest,
        first), so the first batch is the oldest."""
        for batch in self.batches.values():
            return batch.at
        return None

    def count_parked(self, halted: Callable[[bytes], bool]) -> None:
        """Recount ``parked``: the unfinished messages of halted channels (a scan: only on halt,
        resume and replay)."""
        self.parked = sum(1 for _, _, item in self.entries() if halted(item[0]))

    def worker_died(self, taken: int, said_bye: bool, reported: bool) -> None:
        """Fold a death into what is known of each batch. ``taken``: the last wseq the worker
        had taken in (its run slot); ``said_bye``: it stopped cleanly, every call it started
        acknowledged; ``reported``: it said which calls were running when asked to stop (that
        finer report is kept by the caller for the close report)."""
        if said_bye:
            for batch in self.batches.values():
                batch.sent = False  # it never reached a handler
        elif not reported:
            for batch in self.batches.values():
                if batch.sent:
                    if batch.first <= taken:
                        batch.doubt = True  # taken in: it may have been applied
                    else:
                        batch.sent = False  # never read

    def take_for_replay(self, epoch: int, batch_size: int) -> Replay:
        """Renumber every unfinished message for a fresh incarnation ``epoch`` and rebuild the
        window as the frames that will send them, in order: the ones a dead incarnation may
        have run first (marked redelivered, so the worker runs them carefully), then the ones
        that never reached a handler (pending, sealed while the worker was down, or left by a
        worker that stopped cleanly). Waiters follow their message. The caller sends each
        returned batch's frame."""
        if self.parts:
            self.seal(epoch)  # never sent: it goes out as fresh, not redelivered
        waiters = self.waiters
        self.waiters = {}
        old = list(self.batches.values())
        self.batches.clear()
        self.starts.clear()
        replay = Replay()
        for flag in (True, False):
            # A whole batch (nothing of it finished, not an INSTALL) goes out as it is under a
            # new head: no decoding. The others are taken apart and sent again in chunks.
            chunk: list[_Resend] = []
            for batch in (b for b in old if b.doubt == flag):
                if batch.done is None and batch.install is None:
                    self._flush_resend(epoch, flag, chunk, replay)
                    replay.batches.append(self._rehead(epoch, flag, batch, waiters))
                    replay.redelivered += batch.n if flag else 0
                elif batch.install is not None:
                    # An INSTALL keeps its place: before the moved channels' messages.
                    self._flush_resend(epoch, flag, chunk, replay)
                    moved = self.add_install(epoch, *batch.install)
                    moved.sent, moved.doubt, moved.at = True, flag, batch.at
                    self.inflight -= 1  # add_install counted it again
                    replay.batches.append(moved)
                else:
                    for i, item in enumerate(batch.items()):
                        w = batch.first + i
                        if batch.done is not None and w in batch.done:
                            continue
                        chunk.append((item, waiters.get(w), None, batch.at))
                        replay.redelivered += flag
                        if len(chunk) == batch_size:
                            self._flush_resend(epoch, flag, chunk, replay)
            self._flush_resend(epoch, flag, chunk, replay)
        return replay

    def _flush_resend(
        self, epoch: int, redelivered: bool, chunk: list[_Resend], replay: Replay
    ) -> None:
        """Send ``chunk`` again as one batch (if it holds anything) and empty it."""
        if chunk:
            replay.batches.append(self._resend(epoch, redelivered, chunk))
            chunk.clear()

    def _rehead(
        self, epoch: int, redelivered: bool, batch: Batch, waiters: dict[int, DoneCallback]
    ) -> Batch:
        """Put an untouched ``batch`` back in the window renumbered for ``epoch``, its frame's
        items as they were; its waiters follow their messages."""
        first = self.next_wseq
        self.next_wseq = first + batch.n
        frame = codec.rehead_batch(batch.frame, batch.n, epoch, first, redelivered)
        again = Batch(first, batch.n, frame, True, redelivered, at=batch.at)
        self.batches[first] = again
        self.starts.append(first)
        if waiters:
            shift = first - batch.first
            for w in range(batch.first, batch.first + batch.n):
                waiter = waiters.get(w)
                if waiter is not None:
                    self.waiters[w + shift] = waiter
        return again

    def _resend(self, epoch: int, redelivered: bool, chunk: list[_Resend]) -> Batch:
        """Put ``chunk`` back in the window as one batch numbered for ``epoch``."""
        first = self.next_wseq
        self.next_wseq = first + len(chunk)
        frame = codec.encode_batch(
            epoch, first, redelivered, [(c, s, p) for (c, s, p), _, _, _ in chunk]
        )
        at = min(entry[3] for entry in chunk)
        batch = Batch(first, len(chunk), frame, True, redelivered, at=at)
        self.batches[first] = batch
        self.starts.append(first)
        for j, (_, waiter, _, _) in enumerate(chunk):
            if waiter is not None:
                self.waiters[first + j] = waiter
        return batch

    def take_all(self) -> list[tuple[Item, DoneCallback | None, bool, float]]:
        """Empty the window (a lost remote worker's, whose channels go to other workers): every
        unfinished message as ``(item, on_done, may_have_run, sealed_at)``, in order. A sent
        message may have run (the worker's word on it is lost with it); a move's INSTALL entry
        is dropped (the state it carried is lost, as in a crash)."""
        out: list[tuple[Item, DoneCallback | None, bool, float]] = []
        waiters = self.waiters
        for batch, w, item in list(self.entries()):
            if batch is not None and batch.install is not None:
                continue
            ran = batch is not None and (batch.sent or batch.doubt)
            at = _monotonic() if batch is None else batch.at
            out.append((item, waiters.pop(w, None), ran, at))
        self.next_wseq += self.pending()
        self.parts.clear()
        self.batches.clear()
        self.starts.clear()
        self.waiters = {}
        self.inflight = 0
        self.parked = 0
        return out

    def add_resent(
        self, epoch: int, redelivered: bool, entries: list[tuple[Item, DoneCallback | None, float]]
    ) -> Batch:
        """Append messages taken from another window as one batch numbered for ``epoch`` (the
        caller flushed the pending batch first; it sends ``frame`` and sets ``sent``)."""
        assert not self.parts, "flush the pending batch before adding a resent batch"
        batch = self._resend(epoch, redelivered, [(i, w, None, at) for i, w, at in entries])
        batch.sent = False
        self.inflight += batch.n
        return batch

    def unsettled(
        self, said_bye: bool, running: set[int] | None
    ) -> Iterator[tuple[Item, DoneCallback | None, bool]]:
        """At close, with the worker gone: every unfinished message as ``(item, on_done,
        in_doubt)``, in order, its waiter removed. ``in_doubt`` is False only when the message
        certainly never reached a handler: pending, never sent, sent to a worker that stopped
        cleanly (``said_bye``), or not among the calls it reported ``running`` when asked to
        stop."""
        waiters = self.waiters
        for batch, w, item in list(self.entries()):
            if batch is not None and batch.install is not None:
                continue  # a move's INSTALL entry, not a message
            if batch is None or (not batch.sent and not batch.doubt):
                doubtful = False
            elif batch.doubt:
                doubtful = True
            elif said_bye:
                doubtful = False
            elif running is not None:
                doubtful = w in running
            else:
                doubtful = True
            yield item, waiters.pop(w, None), doubtful
