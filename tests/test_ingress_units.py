"""The ingress's parts without a socket or a pool: reading items, the per-message record and its
HALTED notice, and the outbox's per-producer accounting."""

from __future__ import annotations

import collections
import logging
import os
from typing import Any

import cbor2
import pytest
import zmq

from shardpool import protocol as P
from shardpool.errors import HandlerError, InDoubt, PoolBroken, PoolClosed
from shardpool.ingress.items import read_item
from shardpool.ingress.outbox import Outbox
from shardpool.ingress.records import Outcomes, Record
from shardpool.ratelog import RateLimitedLog

GOOD = b"\xa0"


@pytest.mark.parametrize(
    ("item", "corr", "code"),
    [
        ([7, b"c", GOOD], None, None),
        ([7, b"c"], 7, P.E_BAD_ITEM),  # the corr of a short item is still answered to
        ("x", None, P.E_BAD_ITEM),
        ([], None, P.E_BAD_ITEM),
        ([-1, b"c", GOOD], None, P.E_BAD_CORR),
        ([2**64, b"c", GOOD], None, P.E_BAD_CORR),
        ([True, b"c", GOOD], None, P.E_BAD_CORR),
        ([7, "c", GOOD], 7, P.E_BAD_CHANNEL_ID),
        ([7, b"", GOOD], 7, P.E_EMPTY_CHANNEL_ID),
        ([7, b"x" * 65, GOOD], 7, P.E_CHANNEL_ID_TOO_LONG),
        ([7, b"c", [1]], 7, P.E_BAD_PAYLOAD),
        ([7, b"c", b"x" * 11], 7, P.E_PAYLOAD_TOO_LARGE),
    ],
)
def test_read_item_names_the_problem_and_keeps_a_readable_corr(
    item: Any, corr: int | None, code: str | None
) -> None:
    bad = read_item(item, 3, 10)
    if code is None:
        assert bad is None
        return
    assert bad is not None and (bad.corr, bad.code) == (corr, code)
    assert bad.message.startswith("item 3")


def _failure(policy: str = "halt") -> HandlerError:
    return HandlerError(
        "ValueError: boom",
        channel_id=b"c",
        seq=4,
        exc_type="ValueError",
        policy=policy,
        traceback="tb",
    )


def test_a_record_turns_each_outcome_into_its_reply_and_wakes_once_per_batch() -> None:
    outcomes = Outcomes()
    try:
        cases = [
            (5, None, P.OK),
            (None, _failure("skip"), P.FAILED),
            (None, InDoubt("stopped"), P.IN_DOUBT),
            (None, PoolClosed("closed"), P.CLOSED),
            (None, PoolBroken("broken"), P.CLOSED),
            (None, RuntimeError("odd"), P.FAILED),
        ]
        for corr, (value, error, _) in enumerate(cases):
            Record(outcomes, b"p", corr)(value, error)
        assert [(r.corr, r.status) for r in outcomes.items] == [
            (corr, status) for corr, (_, _, status) in enumerate(cases)
        ]
        assert outcomes.items[0].value == 5
        failed = outcomes.items[1].value
        assert failed["error"] == P.E_HANDLER_FAILED
        assert (failed["type"], failed["seq"], failed["policy"]) == ("ValueError", 4, "skip")
        assert outcomes.items[2].value["error"] == P.E_IN_DOUBT
        assert outcomes.items[3].value["error"] == P.E_CLOSED
        # Six outcomes, one wake-up: the ingress clears wake_pending when it reads the queue.
        assert outcomes.wake_pending
        assert len(_drain_pipe(outcomes)) == 1
    finally:
        outcomes.pipe.close()


def _drain_pipe(outcomes: Outcomes) -> bytes:
    return os.read(outcomes.pipe.fileno(), 64)


class _Sock:
    """A ROUTER stand-in: takes frames until ``full``, then refuses them (EAGAIN)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []
        self.full = False

    def send_multipart(self, parts: tuple[bytes, bytes], flags: int = 0, copy: bool = True) -> None:
        if self.full:
            raise zmq.Again()
        self.sent.append((parts[0], cbor2.loads(parts[1])))


def _outbox(max_pending: int = 100) -> tuple[Outbox, _Sock, dict[str, int]]:
    counters: dict[str, int] = collections.defaultdict(int)
    errors = dict.fromkeys(P.FRAME_ERRORS + P.ITEM_ERRORS, 0)

    def bug(key: str, what: str) -> None:
        raise AssertionError(f"internal failure while {what}")

    box = Outbox(
        counters, errors, RateLimitedLog(logging.getLogger("test"), 10.0), bug, max_pending
    )
    sock = _Sock()
    box.sock = sock  # type: ignore[assignment]
    return box, sock, counters


def test_the_halted_notice_travels_with_its_message_in_order() -> None:
    """A message halts its channel: its producer hears HALTED at once, between the replies
    reported before and after it, and its final reply later; only the final one closes it."""
    outcomes = Outcomes()
    box, sock, counters = _outbox()
    try:
        st = box.producer(b"p")
        earlier, halting, other = (Record(outcomes, b"p", corr) for corr in (1, 2, 3))
        st.open += 3
        earlier("done", None)
        halting.halted(_failure())
        other("fine", None)
        box.collect(outcomes.items)
        box.flush()
        [(ident, frame)] = sock.sent
        assert ident == b"p" and frame[1] == P.REPLIES
        assert [(corr, status) for corr, status, _ in frame[2]] == [
            (1, P.OK),
            (2, P.HALTED),
            (3, P.OK),
        ]
        notice = frame[2][1][2]
        assert notice["error"] == P.E_HALTED and notice["policy"] == "halt"
        assert (notice["type"], notice["seq"]) == ("ValueError", 4)
        assert counters["halted"] == 1 and counters["ok"] == 2
        assert box.producers[b"p"].open == 1  # the halted message is still open
        halting(None, _failure("skipped"))
        box.collect(outcomes.items)
        box.flush()
        assert [(c, s) for c, s, _ in sock.sent[-1][1][2]] == [(2, P.FAILED)]
        assert b"p" not in box.producers  # nothing open: forgotten
    finally:
        outcomes.pipe.close()


def test_refused_replies_wait_in_the_backlog_and_count_towards_the_bound() -> None:
    outcomes = Outcomes()
    box, sock, _ = _outbox(max_pending=3)
    try:
        st = box.producer(b"p")
        st.open = 2
        sock.full = True
        box.reject(b"p", 9, P.E_BAD_ITEM, "item 0: bad", 0)
        for corr in (1, 2):
            Record(outcomes, b"p", corr)(corr, None)
        box.collect(outcomes.items)
        box.flush()
        assert b"p" in box.stalled and box.held_replies == 3
        assert st.pending == 3  # two accepted messages + one rejection held back
        assert box.refusing(b"p") is st
        assert box.unresolved() == 0  # both outcomes are known, only not yet taken
        sock.full = False
        box.retry()
        assert [c for c, _, _ in sock.sent[0][1][2]] == [9, 1, 2]
        assert not box.stalled and box.held_replies == 0 and b"p" not in box.producers
    finally:
        outcomes.pipe.close()
