"""Replies on their way to producers, and what each producer holds in the ingress.

Replies leave without blocking: the ROUTER has a small send high-water mark and
``router_mandatory``, so a producer that does not read makes ZeroMQ refuse its replies (EAGAIN)
instead of queueing them without bound. Refused reply frames wait in that producer's backlog and
are re-tried after 1 ms, then less and less often (up to every 50 ms) while none of them takes any,
as everyone else's replies flow. What a producer holds — accepted messages not yet answered plus
replies in its backlog — is bounded by ``max_pending_per_producer``: past it, its items are
answered ``too_many_pending``, and while it still does not read, its frames are refused whole and
counted into one ERROR. Per-producer state is freed when it reaches zero or the producer is gone.

Everything here runs on the ingress thread.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any

import zmq

from .. import protocol as P
from ..ratelog import RateLimitedLog
from .records import Notice, Record

__all__ = ["REPLY_ENTRIES", "REPLY_HWM", "Outbox", "Producer"]

# ZeroMQ's own reply queue per producer is at most REPLY_HWM frames of REPLY_ENTRIES replies;
# past that, replies wait in the producer's backlog where they count towards its bound.
REPLY_HWM = 64
REPLY_ENTRIES = 64
# Producers whose replies ZeroMQ refused are tried again after _RETRY_MIN_MS: a producer that
# reads is usually ready by then (ZeroMQ frees its pipe in steps). While none takes anything the
# gap doubles up to _RETRY_MAX_MS, so one that never reads costs almost nothing.
_RETRY_MIN_MS = 1
_RETRY_MAX_MS = 50

_FINALS = frozenset({P.OK, P.FAILED, P.CLOSED, P.IN_DOUBT})  # final replies to accepted messages

# A reply frame waiting in a backlog: (frame, finals, others). The frame is None for the place of
# the coalesced ERROR about refused frames; ``finals`` counts its final replies to accepted
# messages, ``others`` its other replies (rejections, HALTED notices, a HELLO answer or an ERROR).
Piece = tuple[bytes | None, int, int]


class Producer:
    """What one producer (ZeroMQ routing id) holds in the ingress.

    ``open`` counts its accepted messages whose final reply has not yet been handed to ZeroMQ;
    ``backlog`` holds the reply frames ZeroMQ refused (its pipe to the producer was full), in
    order. ``queued`` sums the ``others`` in the backlog, so ``open + queued`` is what counts
    towards the bound; ``held`` counts every reply in the backlog.
    """

    __slots__ = ("backlog", "held", "open", "queued", "refused_frames", "refused_messages")

    def __init__(self) -> None:
        self.open = 0
        self.backlog: collections.deque[Piece] = collections.deque()
        self.queued = 0
        self.held = 0
        self.refused_frames = 0  # frames refused whole since the last ERROR about them
        self.refused_messages = 0

    @property
    def pending(self) -> int:
        return self.open + self.queued


class Outbox:
    """Reply entries due per producer, the producers' accounting, and the sending.

    Args:
        counters / errors: the ingress's counters and per-code error counts (updated here).
        warn: the rate-limited log for bad input and producers gone.
        internal_failure: ``(key, what)`` counts and logs a bug of ours (call in an ``except``).
        max_pending: ``max_pending_per_producer``.

    ``sock`` is set by the ingress thread once the socket is bound.
    """

    def __init__(
        self,
        counters: dict[str, int],
        errors: dict[str, int],
        warn: RateLimitedLog,
        internal_failure: Callable[[str, str], None],
        max_pending: int,
    ) -> None:
        self.sock: zmq.Socket[bytes] | None = None
        self.counters = counters
        self.errors = errors
        self._warn = warn
        self._internal_failure = internal_failure
        self.max_pending = max_pending
        self.due: dict[bytes, list[list[Any]]] = {}  # entries to send at the next flush
        self.producers: dict[bytes, Producer] = {}
        self.stalled: set[bytes] = set()  # producers with a backlog
        self.held_replies = 0  # replies in all backlogs (read by stats() from any thread)
        # The producer whose frame is being submitted: its state must outlive replies sent
        # meanwhile (backpressure waits send them), since the frame is still adding to it.
        self.current: bytes | None = None
        self._next_retry = 0.0
        self.retry_gap_ms = _RETRY_MIN_MS

    # -- accounting -------------------------------------------------------------------------

    def producer(self, ident: bytes) -> Producer:
        """``ident``'s state, created if it has none."""
        st = self.producers.get(ident)
        if st is None:
            st = self.producers[ident] = Producer()
        return st

    def forget_if_idle(self, ident: bytes, st: Producer) -> None:
        if st.open <= 0 and not st.backlog and ident != self.current:
            self.producers.pop(ident, None)

    def unresolved(self) -> int:
        """Accepted messages whose final reply has not been handed to ZeroMQ nor is waiting in a
        backlog (safe from any thread)."""
        return sum(st.open - (st.held - st.queued) for st in list(self.producers.values()))

    def refusing(self, ident: bytes) -> Producer | None:
        """The producer's state if its frames are to be refused whole: it is at its bound and
        does not even take its replies (ZeroMQ refused some), so answering each item would only
        grow its backlog."""
        st = self.producers.get(ident)
        if st is not None and st.backlog and st.pending >= self.max_pending:
            return st
        return None

    def refuse(self, ident: bytes, st: Producer, messages: int) -> None:
        """Refuse one frame whole: counted into the one ERROR that waits in the backlog."""
        if st.refused_frames == 0:
            st.backlog.append((None, 0, 0))  # where the coalesced ERROR goes out
        st.refused_frames += 1
        st.refused_messages += messages
        c = self.counters
        c["frame_errors"] += 1
        c["refused_frames"] += 1
        c["refused_messages"] += messages
        self._warn.warn(
            "refused",
            "ingress: refused a frame of %d messages whole: its producer holds %d unanswered "
            "messages and unread replies (ingress.max_pending_per_producer = %d) and reads none",
            messages,
            st.pending,
            self.max_pending,
        )

    # -- replies due --------------------------------------------------------------------------

    def collect(self, outcomes: collections.deque[Record | Notice]) -> None:
        """Move the reported outcomes into the replies due, in the order they were reported."""
        due = self.due
        while outcomes:
            r = outcomes.popleft()
            entry = [r.corr, r.status, r.value]
            lst = due.get(r.ident)
            if lst is None:
                due[r.ident] = [entry]
            else:
                lst.append(entry)

    def reject(self, ident: bytes, corr: Any, code: str, message: str, index: int) -> None:
        """Answer one item REJECTED (it never took a place in its channel's order)."""
        self.counters["rejected"] += 1
        self.errors[code] += 1
        if code not in (P.E_SHUTTING_DOWN, P.E_DRAINING):
            self._warn.warn(code, "ingress: rejected a message: %s", message)
        entry = [corr, P.REJECTED, {"error": code, "message": message, "index": index}]
        lst = self.due.get(ident)
        if lst is None:
            self.due[ident] = [entry]
        else:
            lst.append(entry)

    def frame_error(self, ident: bytes, code: str, message: str) -> None:
        """Answer a frame that could not be read with one ERROR."""
        self.counters["frame_errors"] += 1
        self.errors[code] += 1
        self._warn.warn(code, "ingress: rejected a frame: %s", message)
        # Order: replies already due to this producer go out before the error.
        lst = self.due.pop(ident, None)
        if lst:
            self._emit(ident, self._encode(lst))
        self.send_frame(ident, P.encode_error(code, message))

    def send_frame(self, ident: bytes, frame: bytes) -> None:
        """Send one HELLO answer or ERROR to ``ident`` (after its backlog)."""
        self._emit(ident, [(frame, 0, 1)])

    # -- sending ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Send every producer the replies due to it."""
        due = self.due
        self.due = {}
        for ident, entries in due.items():
            try:
                pieces = self._encode(entries)
            except Exception:  # noqa: BLE001 - one producer's failure must not lose the others'
                self._internal_failure("encode", "encoding a producer's replies")
                self.counters["undeliverable"] += 1
                st = self.producers.get(ident)
                if st is not None:
                    st.open -= sum(1 for e in entries if e[1] in _FINALS)
                    self.forget_if_idle(ident, st)
                continue
            self._emit(ident, pieces)

    def retry(self) -> None:
        """Re-try the stalled producers' backlogs if their time has come."""
        now = time.monotonic()
        if now < self._next_retry:
            return
        held = self.held_replies
        for ident in list(self.stalled):
            self._drain_backlog(ident)
        if self.held_replies < held:
            self.retry_gap_ms = _RETRY_MIN_MS
        else:
            self.retry_gap_ms = min(2 * self.retry_gap_ms, _RETRY_MAX_MS)
        self._next_retry = now + self.retry_gap_ms / 1000

    def _encode(self, entries: list[list[Any]]) -> list[Piece]:
        """Reply frames of at most :data:`REPLY_ENTRIES` entries, as backlog pieces."""
        c = self.counters
        pieces: list[Piece] = []
        for i in range(0, len(entries), REPLY_ENTRIES):
            chunk = entries[i : i + REPLY_ENTRIES]
            finals = 0
            for e in chunk:
                st = e[1]
                if st == P.OK:
                    c["ok"] += 1
                elif st == P.FAILED:
                    c["failed"] += 1
                elif st == P.CLOSED:
                    c["closed"] += 1
                elif st == P.IN_DOUBT:
                    c["in_doubt"] += 1
                else:
                    if st == P.HALTED:
                        c["halted"] += 1
                    continue
                finals += 1
            try:
                frame = P.encode_replies(chunk)
            except Exception:  # noqa: BLE001 - one unencodable value must not lose the others
                frame = P.encode_replies([_encodable(e) for e in chunk])
            pieces.append((frame, finals, len(chunk) - finals))
            c["replies"] += len(chunk)
            c["reply_frames"] += 1
        return pieces

    def _emit(self, ident: bytes, pieces: list[Piece]) -> None:
        st = self.producers.get(ident)
        if st is not None and st.backlog:
            self._enqueue(ident, st, pieces, 0)
            self._drain_backlog(ident)
            return
        for k, (frame, finals, _others) in enumerate(pieces):
            assert frame is not None  # only a backlog holds the coalesced ERROR's place
            sent = self._try_send(ident, frame)
            if sent is None:
                if st is None:
                    st = self.producers[ident] = Producer()
                self._enqueue(ident, st, pieces, k)
                return
            if st is not None:
                st.open -= finals
            if not sent:
                self._gone(ident, pieces[k + 1 :])
                break
        if st is not None:
            self.forget_if_idle(ident, st)

    def _enqueue(self, ident: bytes, st: Producer, pieces: list[Piece], start: int) -> None:
        if not st.backlog and start < len(pieces):
            # Newly stalled: try again soon, whatever producers that never read made the gap.
            self.retry_gap_ms = _RETRY_MIN_MS
            self._next_retry = min(self._next_retry, time.monotonic() + _RETRY_MIN_MS / 1000)
        for k in range(start, len(pieces)):
            piece = pieces[k]
            st.backlog.append(piece)
            st.queued += piece[2]
            st.held += piece[1] + piece[2]
            self.held_replies += piece[1] + piece[2]
        if st.backlog:
            self.stalled.add(ident)

    def _drain_backlog(self, ident: bytes) -> None:
        """Send what ZeroMQ takes of ``ident``'s backlog, in order."""
        st = self.producers.get(ident)
        if st is None:
            self.stalled.discard(ident)
            return
        backlog = st.backlog
        while backlog:
            frame, finals, others = backlog[0]
            marker = frame is None
            if frame is None:
                frame = P.encode_error(
                    P.E_TOO_MANY_PENDING,
                    f"{st.refused_frames} frames ({st.refused_messages} messages) were refused "
                    f"whole: this producer held more than {self.max_pending} unanswered messages "
                    "and unread replies (ingress.max_pending_per_producer) and did not read its "
                    "replies",
                    frames=st.refused_frames,
                    messages=st.refused_messages,
                )
            sent = self._try_send(ident, frame)
            if sent is None:
                return
            backlog.popleft()
            if marker:
                st.refused_frames = st.refused_messages = 0  # the coalesced ERROR went out
            st.open -= finals
            st.queued -= others
            st.held -= finals + others
            self.held_replies -= finals + others
            if not sent:
                self._gone(ident, [])
                return
        self.stalled.discard(ident)
        self.forget_if_idle(ident, st)

    def _try_send(self, ident: bytes, frame: bytes) -> bool | None:
        """True: ZeroMQ took the frame. None: the producer's pipe is full (it does not read).
        False: the producer is gone (nobody to tell; counted)."""
        assert self.sock is not None
        try:
            self.sock.send_multipart((ident, frame), zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            self.counters["stalled_sends"] += 1
            return None
        except zmq.ZMQError as exc:
            self.counters["undeliverable"] += 1
            if exc.errno == zmq.EHOSTUNREACH:
                self._warn.warn("gone", "ingress: a producer left before its replies were sent")
            else:
                self._internal_failure("send", "sending a reply frame (dropped)")
            return False

    def _gone(self, ident: bytes, rest: list[Piece]) -> None:
        """``ident`` disconnected: drop its backlog and ``rest``; its state lives on only while
        messages of it are still being processed (their replies are dropped as they come)."""
        st = self.producers.get(ident)
        if st is None:
            return
        for _frame, finals, _others in list(st.backlog) + rest:
            st.open -= finals
            self.counters["undeliverable"] += 1
        self.held_replies -= st.held
        st.backlog.clear()
        st.queued = st.held = st.refused_frames = st.refused_messages = 0
        self.stalled.discard(ident)
        self.forget_if_idle(ident, st)


def _encodable(entry: list[Any]) -> list[Any]:
    try:
        P.encode_replies([entry])
        return entry
    except Exception as exc:  # noqa: BLE001
        return [
            entry[0],
            P.FAILED,
            {"error": P.E_HANDLER_FAILED, "message": f"result not encodable: {P.exc_text(exc)}"},
        ]
