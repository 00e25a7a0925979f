"""The ingress thread: reads producer frames, checks their items and submits the accepted ones."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

import zmq

from .. import protocol as P
from ..errors import InputError, PoolBroken, PoolClosed
from ..ratelog import RateLimitedLog
from .items import item_corr, read_item
from .outbox import Outbox, Producer
from .records import Outcomes, Record
from .settings import IngressSettings
from .sockets import RouterSocket, open_router

log = logging.getLogger("shardpool.ingress")

__all__ = ["LOG_INTERVAL_S", "Ingress"]

LOG_INTERVAL_S = 10.0
"""Bad-input warnings of one error code are logged at most once per this many seconds."""

_READ_BURST = 64  # frames read per loop turn before replies get their turn again
_ROOM_WAIT_S = 0.05  # backpressure: re-try a full window at least this often (seconds)

_COUNTERS = (
    "frames",
    "bytes",
    "messages",
    "accepted",
    "rejected",
    "frame_errors",
    "replies",
    "reply_frames",
    "ok",
    "failed",
    "closed",
    "in_doubt",
    "halted",
    "undeliverable",
    "backpressure_waits",
    "internal_errors",
    "refused_frames",
    "refused_messages",
    "stalled_sends",
    "connections",
    "disconnections",
    "auth_failures",
)


class _Submitter(Protocol):
    # ShardPool.submit_chunk(pairs, on_done) -> how many were accepted.
    def submit_chunk(
        self, pairs: list[tuple[bytes, bytes]], on_done: list[Any]
    ) -> int: ...


class Ingress:
    """The ingress socket and its thread.

    Args:
        pool: anything with :meth:`~shardpool.ShardPool.submit_chunk` (a
            :class:`~shardpool.ShardPool`) that calls ``on_done`` of one channel's messages in
            the order it accepted them, and ``on_done.halted(error)`` when a message's channel
            halts on it.
        settings: endpoint, limits and CURVE keys.
        info: extra fields for HELLO replies (e.g. the service's pid).
    """

    def __init__(
        self, pool: _Submitter, settings: IngressSettings, info: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self._submit = pool.submit_chunk
        self._info = {
            "version": P.VERSION,
            "max_message_bytes": settings.max_message_bytes,
            "max_items": settings.max_items,
            "max_frame_bytes": settings.max_frame_bytes,
            "max_pending_per_producer": settings.max_pending_per_producer,
            **(info or {}),
        }
        self.counters: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self.errors: dict[str, int] = dict.fromkeys(P.FRAME_ERRORS + P.ITEM_ERRORS, 0)
        self.endpoint = settings.endpoint  # the bound address once started (tcp port resolved)
        self._warn = RateLimitedLog(log, LOG_INTERVAL_S)
        # Cross-thread: the pool's I/O thread posts outcomes and wakes us through its pipe.
        self._outcomes = Outcomes()
        # Owned by the ingress thread.
        self._outbox = Outbox(
            self.counters,
            self.errors,
            self._warn,
            self._internal_failure,
            settings.max_pending_per_producer,
        )
        self._known: set[bytes] = set()
        self._intake_reason: str | None = None
        self._closing = False
        self._close_deadline = 0.0
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="shardpool-ingress", daemon=True)

    # -- life cycle (any thread) -----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> str:
        """Bind the socket (in the ingress thread) and return the bound endpoint.

        Raises:
            zmq.ZMQError: the endpoint cannot be bound (in use, bad address).
            TimeoutError: the thread did not report within ``timeout`` seconds.
        """
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"ingress did not bind {self.settings.endpoint} in {timeout} s")
        if self._start_error is not None:
            self._thread.join(5.0)
            self._outcomes.pipe.close()
            raise self._start_error
        return self.endpoint

    def stop_intake(self, reason: str = P.E_SHUTTING_DOWN) -> None:
        """From now on every message is answered REJECTED with ``reason`` (``shutting_down`` or
        ``draining``) instead of being submitted; replies to accepted ones keep flowing."""
        self._intake_reason = reason
        self._outcomes.pipe.wake()

    def resume_intake(self) -> bool:
        """Accept messages again after :meth:`stop_intake` (``shardpool undrain``); True if
        intake is open now, False once :meth:`close` has begun (intake never reopens then)."""
        if self._closing:
            return False
        self._intake_reason = None
        self._outcomes.pipe.wake()
        return True

    @property
    def accepting(self) -> bool:
        return self._intake_reason is None

    @property
    def alive(self) -> bool:
        """False once the ingress thread has ended (closed, or failed: see the log)."""
        return self._thread.is_alive()

    def close(self, timeout: float = 5.0) -> None:
        """Send every reply still due (waiting up to ``timeout`` seconds for outcomes of accepted
        messages), then close the socket and join the thread. Call after the pool has closed, so
        that every accepted message has had its outcome. Idempotent."""
        if not self._thread.is_alive():
            self._outcomes.pipe.close()
            return
        self._intake_reason = self._intake_reason or P.E_SHUTTING_DOWN
        self._close_deadline = time.monotonic() + timeout
        self._closing = True
        self._outcomes.pipe.wake()
        self._thread.join(timeout + 5.0)
        if self._thread.is_alive():
            log.error("ingress thread did not stop")
        else:
            self._outcomes.pipe.close()

    def stats(self) -> dict[str, Any]:
        """Counters (messages, frames, errors by code) and gauges; safe from any thread."""
        box = self._outbox
        return {
            **self.counters,
            "endpoint": self.endpoint,
            "accepting": self.accepting,
            "producers": max(0, self.counters["connections"] - self.counters["disconnections"]),
            "pending": box.unresolved(),
            "stalled_producers": len(box.stalled),
            "held_replies": box.held_replies,
            "errors": {k: v for k, v in self.errors.items() if v},
        }

    # -- the ingress thread ------------------------------------------------------------------

    def _main(self) -> None:
        router = RouterSocket(zmq.Context())
        try:
            self.endpoint = open_router(self.settings, router)
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._start_error = exc
            self._started.set()
            router.close()
            return
        self._outbox.sock = router.sock
        self._started.set()
        try:
            self._loop(router)
        except BaseException:  # noqa: BLE001 - must never die silently with producers waiting
            log.exception("ingress thread failed")
        finally:
            # Replies still queued in ZeroMQ get a moment to leave.
            router.close(linger_ms=1000)

    def _loop(self, router: RouterSocket) -> None:
        sock, mon = router.sock, router.mon
        assert sock is not None and mon is not None
        box = self._outbox
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(mon, zmq.POLLIN)
        wake = self._outcomes.pipe
        wake_fd = wake.fileno()
        poller.register(wake_fd, zmq.POLLIN)
        recv = sock.recv_multipart
        while True:
            events = dict(poller.poll(box.retry_gap_ms if box.stalled else 100))
            if wake_fd in events:
                wake.drain()
            if mon in events:
                try:
                    router.count_events(self.counters, self._warn)
                except Exception:  # noqa: BLE001 - counting connections is not worth the thread
                    self._internal_failure("monitor", "reading the socket monitor")
            self._safe_pump()
            if self._closing:
                if self._may_leave():
                    return
                continue
            if sock in events:
                for _ in range(_READ_BURST):
                    try:
                        parts = recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self._on_message(parts)
                    except Exception:  # noqa: BLE001 - one frame must not stop the ingress
                        self._frame_failed(parts)
                self._safe_pump()

    def _may_leave(self) -> bool:
        """Closing: True once every accepted message's final reply is out, or at the deadline
        (saying what is left)."""
        box = self._outbox
        if not box.producers:
            return True
        if time.monotonic() < self._close_deadline:
            return False
        log.warning(
            "ingress closing with %d replies never resolved and %d not taken by their producers",
            box.unresolved(),
            box.held_replies,
        )
        return True

    # -- failures of our own -----------------------------------------------------------------

    def _internal_failure(self, key: str, what: str) -> None:
        """Count and log (with the traceback, at most once per key per interval) an exception
        raised while ``what``; call from an ``except`` block."""
        self.counters["internal_errors"] += 1
        self._warn.error("internal:" + key, "ingress: internal error while %s", what)

    def _frame_failed(self, parts: list[bytes]) -> None:
        """Handling a frame raised: answer its sender ``internal_error`` and go on."""
        self._internal_failure("frame", "handling a frame")
        self.counters["frame_errors"] += 1
        self.errors[P.E_INTERNAL_ERROR] += 1
        try:
            self._outbox.send_frame(
                parts[0],
                P.encode_error(
                    P.E_INTERNAL_ERROR,
                    "the backend failed while handling this frame (a bug; logged with its "
                    "traceback); nothing in it was processed",
                ),
            )
        except Exception:  # noqa: BLE001
            self._internal_failure("frame-reply", "answering a frame that failed")

    def _item_failed(self, ident: bytes, item: Any, index: int) -> None:
        """Checking or submitting one item raised (a bug): answer it ``internal_error``."""
        self._internal_failure("item", "handling one item of a frame")
        self._outbox.reject(
            ident,
            item_corr(item),
            P.E_INTERNAL_ERROR,
            f"item {index}: the backend failed while handling this item (a bug; logged with its "
            "traceback); it was not accepted",
            index,
        )

    # -- replies -----------------------------------------------------------------------------

    def _safe_pump(self) -> None:
        """Move reported outcomes to their producers, send what is due and re-try the producers
        whose replies ZeroMQ refused."""
        try:
            outcomes = self._outcomes
            # Cleared before the queue is read: an outcome posted after this wakes us again.
            outcomes.wake_pending = False
            box = self._outbox
            if outcomes.items:
                box.collect(outcomes.items)
            if box.due:
                box.flush()
            if box.stalled:
                box.retry()
        except Exception:  # noqa: BLE001 - replies to others must keep flowing
            self._internal_failure("pump", "sending replies")

    # -- requests ----------------------------------------------------------------------------

    def _on_message(self, parts: list[bytes]) -> None:
        ident = parts[0]
        box = self._outbox
        self.counters["frames"] += 1
        if len(parts) != 2:
            st = box.refusing(ident)
            if st is not None:
                box.refuse(ident, st, 0)
                return
            box.frame_error(
                ident, P.E_BAD_FRAME, f"a message must be one frame, got {len(parts) - 1}"
            )
            return
        frame = parts[1]
        self.counters["bytes"] += len(frame)
        if ident not in self._known and not self._admit(ident):
            return
        try:
            kind, body = P.decode(frame, self.settings.max_items)
        except P.FrameError as exc:
            st = box.refusing(ident)
            if st is not None:
                box.refuse(ident, st, 0)
                return
            box.frame_error(ident, exc.code, exc.message)
            return
        st = box.refusing(ident)
        if st is not None:
            box.refuse(ident, st, len(body) if kind == P.SUBMIT else 0)
            return
        if kind == P.HELLO:
            # A barrier: everything already due goes out first.
            self._safe_pump()
            info = {**self._info, "accepting": self.accepting}
            try:
                reply = P.encode_hello_reply(body, info)
            except Exception:  # noqa: BLE001 - an unencodable token is the sender's problem
                reply = P.encode_hello_reply(None, info)
            box.send_frame(ident, reply)
            return
        st = box.producer(ident)
        box.current = ident
        try:
            self._submit_items(ident, st, body)
        finally:
            box.current = None
            box.forget_if_idle(ident, st)

    def _admit(self, ident: bytes) -> bool:
        """A producer's first frame (since it was last forgotten): admitted unless more than
        ``max_producers`` are connected (then answered ``too_many_producers``)."""
        producers = self.counters["connections"] - self.counters["disconnections"]
        limit = self.settings.max_producers
        if producers > limit:
            self._outbox.frame_error(
                ident,
                P.E_TOO_MANY_PRODUCERS,
                f"{producers} producers connected, at most {limit} (ingress.max_producers)",
            )
            return False
        if len(self._known) > 2 * limit:
            self._known.clear()  # forget departed producers; live ones are re-admitted
        self._known.add(ident)
        return True

    def _submit_items(self, ident: bytes, st: Producer, items: list[Any]) -> None:
        """Check every item of a producer's frame (a rejection is answered at once), then submit
        the accepted ones in order, one lock for as many as the windows take."""
        box = self._outbox
        max_bytes = self.settings.max_message_bytes
        limit = box.max_pending
        # Room at the start of the frame: replies sent while it is submitted only add to it.
        room = limit - st.pending
        outcomes = self._outcomes
        self.counters["messages"] += len(items)
        pairs: list[tuple[bytes, bytes]] = []
        records: list[Record] = []
        indexes: list[int] = []
        for index, item in enumerate(items):
            try:
                bad = read_item(item, index, max_bytes)
                if bad is not None:
                    box.reject(ident, bad.corr, bad.code, bad.message, index)
                    continue
                if len(pairs) >= room:
                    box.reject(
                        ident,
                        item[0],
                        P.E_TOO_MANY_PENDING,
                        f"item {index}: this producer holds {limit} or more unanswered "
                        f"messages and unread replies, at most {limit} "
                        "(ingress.max_pending_per_producer); read replies before sending more",
                        index,
                    )
                    continue
                pairs.append((item[1], item[2]))
                records.append(Record(outcomes, ident, item[0]))
                indexes.append(index)
            except Exception:  # noqa: BLE001 - one item must not stop the ingress or its frame
                self._item_failed(ident, item, index)
        accepted = 0
        try:
            accepted = self._submit_checked(ident, pairs, records, indexes)
        finally:
            # Counted once per frame (cheaper than per item); kept if an item raised.
            st.open += accepted
            self.counters["accepted"] += accepted

    def _submit_checked(
        self,
        ident: bytes,
        pairs: list[tuple[bytes, bytes]],
        records: list[Record],
        indexes: list[int],
    ) -> int:
        """Submit checked items in order without blocking the socket's owner; the ones that
        cannot be accepted are answered with a rejection. Returns how many were accepted."""
        accepted = done = 0
        while done < len(pairs):
            rejection = self._refusal()
            if rejection is None:
                try:
                    n = self._submit(pairs[done:], records[done:])
                except PoolBroken as exc:
                    rejection = (P.E_POOL_BROKEN, f"the pool is broken: {P.exc_text(exc)}")
                except PoolClosed:
                    rejection = (P.E_SHUTTING_DOWN, "the backend is shutting down")
                except InputError as exc:  # checked by read_item already; kept as a safety net
                    text = f"item {indexes[done]}: {P.exc_text(exc)}"
                    self._outbox.reject(
                        ident, records[done].corr, P.E_BAD_ITEM, text, indexes[done]
                    )
                    done += 1
                    continue
                except Exception:  # noqa: BLE001 - one item must not stop the ingress
                    self._item_failed(ident, [records[done].corr], indexes[done])
                    done += 1
                    continue
            if rejection is not None:
                code, text = rejection
                for rec, index in zip(records[done:], indexes[done:], strict=True):
                    self._outbox.reject(ident, rec.corr, code, text, index)
                return accepted
            accepted += n
            done += n
            if done < len(pairs):
                # A worker's window is full: stop reading (the socket's queue then fills and
                # ZeroMQ pushes back on producers) and keep replies flowing until there is room.
                self.counters["backpressure_waits"] += 1
                self._safe_pump()
                self._outcomes.pipe.wait(_ROOM_WAIT_S)
                self._safe_pump()
        return accepted

    def _refusal(self) -> tuple[str, str] | None:
        """Why new items are refused now (draining or shutting down), or None."""
        reason = self._intake_reason
        if reason is None:
            return None
        if reason == P.E_SHUTTING_DOWN:
            return reason, "the backend is shutting down"
        return reason, "the backend is draining and accepts no new messages"
