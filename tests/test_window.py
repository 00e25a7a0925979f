"""The in-flight window without processes: numbering, out-of-order finishes, compaction, what a
death leaves in doubt, replay renumbering, and the close report's classification."""

from __future__ import annotations

from typing import Any

import cbor2

from shardpool import codec
from shardpool.front import Window
from shardpool.front.window import Batch


def fill(win: Window, items: list[tuple[bytes, int]], waiter: Any = None) -> None:
    """Place messages as the producer path does (payload: the CBOR of ``[cid, cseq]``)."""
    for cid, cseq in items:
        win.place(codec.item_prefix(cid), cseq, cbor2.dumps([cid.decode(), cseq]), waiter)


def frame_items(batch: Batch) -> tuple[list[Any], list[tuple[bytes, int]]]:
    msg = codec.loads(batch.frame)
    return msg[:4], [(item[0], item[1]) for item in msg[4:]]


def sealed(win: Window, items: list[tuple[bytes, int]], epoch: int = 1, sent: bool = True) -> Batch:
    fill(win, items)
    batch = win.seal(epoch)
    batch.sent = sent
    return batch


def test_seal_numbers_the_pending_messages_into_one_frame() -> None:
    win = Window(0)
    assert win.place(codec.item_prefix(b"a"), 0, b"\x01", None) is True  # opened a batch
    assert win.place(codec.item_prefix(b"b"), 0, b"\x02", None) is False
    assert (win.inflight, win.pending(), win.pending_wseq()) == (2, 2, 2)
    batch = win.seal(epoch=7)
    head, items = frame_items(batch)
    assert head == [codec.ToWorker.BATCH, 7, 0, False]
    assert items == [(b"a", 0), (b"b", 0)]
    assert (batch.first, batch.n, win.next_wseq, win.parts) == (0, 2, 2, [])
    second = sealed(win, [(b"a", 1)])
    assert second.first == 2 and win.find(2) is second and win.find(1) is batch


def test_a_batch_finished_in_order_is_retired_at_once_with_its_waiters() -> None:
    win = Window(0)
    calls: list[Any] = []
    fill(win, [(b"a", 0), (b"b", 0), (b"a", 1)], waiter=calls.append)
    win.seal(1)
    done: list[tuple[int, Any]] = []
    assert win.finish_range(0, 3, done) == 3
    assert win.batches == {} and win.inflight == 0
    assert [w for w, _ in done] == [0, 1, 2] and win.waiters == {}
    assert win.finish_range(0, 3, done) == 0  # an acknowledgement seen twice changes nothing


def test_out_of_order_finishes_inside_a_batch_keep_it_until_the_last() -> None:
    win = Window(0)
    batch = sealed(win, [(b"a", 0), (b"b", 0), (b"c", 0), (b"d", 0)])
    found = win.open(2)
    assert found is not None and found[1][:2] == [b"c", 0]
    win.finish_one(found[0], 2)
    assert win.open(2) is None  # finished: not open any more
    assert win.finish_range(0, 2, []) == 2
    assert win.batches == {0: batch} and batch.remaining == 1 and win.inflight == 1
    assert [w for w, _ in win.open_entries()] == [3]
    assert win.finish_range(0, 4, []) == 1  # only 3 was still open
    assert win.batches == {} and win.inflight == 0


def test_retired_batches_are_compacted_out_of_the_search_list() -> None:
    win = Window(0)
    for i in range(500):
        sealed(win, [(b"x", 2 * i), (b"x", 2 * i + 1)])
    assert len(win.starts) == 500
    # Finish all but the last batch, oldest first, one batch per acknowledgement.
    for i in range(499):
        win.finish_range(2 * i, 2 * i + 2, [])
    assert len(win.batches) == 1
    assert len(win.starts) <= 2 * len(win.batches) + 64
    assert win.find(998) is win.batches[998] and win.find(997) is None


def test_a_death_leaves_what_was_taken_in_in_doubt_and_the_rest_unread() -> None:
    win = Window(0)
    first = sealed(win, [(b"a", 0), (b"b", 0)])  # wseq 0-1
    second = sealed(win, [(b"a", 1)])  # wseq 2
    third = sealed(win, [(b"a", 2)])  # wseq 3: still in the socket when the worker died
    win.worker_died(taken=2, said_bye=False, reported=False)
    assert (first.doubt, second.doubt, third.doubt) == (True, True, False)
    assert (first.sent, second.sent, third.sent) == (True, True, False)


def test_a_clean_stop_leaves_nothing_in_doubt() -> None:
    win = Window(0)
    batch = sealed(win, [(b"a", 0)])
    win.worker_died(taken=0, said_bye=True, reported=False)
    assert (batch.sent, batch.doubt) == (False, False)


def test_replay_renumbers_doubtful_first_marked_then_fresh_with_their_waiters() -> None:
    win = Window(0)
    waiters: list[Any] = []
    fill(win, [(b"a", 0), (b"b", 0), (b"a", 1)], waiter=waiters.append)
    win.seal(1).sent = True  # wseq 0-2, taken in by the worker that dies
    win.finish_range(1, 2, [])  # b finished before the death
    fill(win, [(b"c", 0)])
    win.seal(1)  # wseq 3, sealed while the worker was down: never sent
    fill(win, [(b"a", 2)])  # wseq 4, still pending
    win.worker_died(taken=2, said_bye=False, reported=False)
    replay = win.take_for_replay(epoch=2, batch_size=2)
    assert replay.redelivered == 2
    frames = [frame_items(b) for b in replay.batches]
    assert frames == [
        ([codec.ToWorker.BATCH, 2, 5, True], [(b"a", 0), (b"a", 1)]),
        # Batches nothing of which finished go out whole, as they were, under a new head.
        ([codec.ToWorker.BATCH, 2, 7, False], [(b"c", 0)]),
        ([codec.ToWorker.BATCH, 2, 8, False], [(b"a", 2)]),
    ]
    assert win.next_wseq == 9 and win.inflight == 4 and win.parts == []
    assert sorted(win.waiters) == [5, 6]  # a0 and a1 kept their on_done under the new numbers
    assert all(b.sent for b in replay.batches)
    assert [b.doubt for b in replay.batches] == [True, False, False]


def test_an_untouched_batch_is_replayed_whole_with_its_payloads_and_waiters() -> None:
    win = Window(0)
    done: list[Any] = []
    fill(win, [(b"x", 0)])
    win.seal(1).sent = True  # wseq 0, finished below
    fill(win, [(b"a", 0), (b"b", 0), (b"a", 1)], waiter=done.append)
    original = win.seal(1)  # wseq 1-3, taken in by the worker that dies
    original.sent = True
    fill(win, [(b"c", 0)])
    win.seal(1).sent = True  # wseq 4, never read
    win.finish_range(0, 1, [])
    win.worker_died(taken=3, said_bye=False, reported=False)
    replay = win.take_for_replay(epoch=9, batch_size=256)
    assert replay.redelivered == 3
    first, second = replay.batches
    head, items = codec.loads(first.frame)[:4], codec.loads(first.frame)[4:]
    assert head == [codec.ToWorker.BATCH, 9, 5, True] and first.doubt
    # The very items (payloads included) of the original frame, renumbered after the last wseq.
    assert items == codec.loads(original.frame)[4:]
    sent = [cbor2.dumps([c, s]) for c, s in (("a", 0), ("b", 0), ("a", 1))]
    assert [p for _, _, p in items] == sent
    assert (first.first, first.n) == (5, 3) and (second.first, second.n) == (8, 1)
    assert codec.loads(second.frame)[:4] == [codec.ToWorker.BATCH, 9, 8, False]
    assert sorted(win.waiters) == [5, 6, 7] and win.inflight == 4
    # A replay of the replay (the next incarnation dies before reading anything): the batch
    # still in doubt from the first death stays marked, the never-read one stays fresh.
    win.worker_died(taken=4, said_bye=False, reported=False)
    again = win.take_for_replay(epoch=10, batch_size=256)
    assert [frame_items(b) for b in again.batches] == [
        ([codec.ToWorker.BATCH, 10, 9, True], [(b"a", 0), (b"b", 0), (b"a", 1)]),
        ([codec.ToWorker.BATCH, 10, 12, False], [(b"c", 0)]),
    ]
    assert sorted(win.waiters) == [9, 10, 11]


def test_an_operator_skip_while_the_worker_is_down_leaves_the_replay() -> None:
    win = Window(0)
    sealed(win, [(b"h", 0), (b"h", 1)], sent=True)
    win.worker_died(taken=1, said_bye=False, reported=False)
    # The halted message (h 0) is skipped while no worker runs: finished here, never replayed.
    found = win.open(0)
    assert found is not None
    win.finish_one(found[0], 0)
    replay = win.take_for_replay(epoch=2, batch_size=10)
    assert [frame_items(b)[1] for b in replay.batches] == [[(b"h", 1)]]
    assert win.inflight == 1


def test_count_parked_counts_the_messages_of_halted_channels() -> None:
    win = Window(0)
    sealed(win, [(b"h", 0), (b"a", 0), (b"h", 1)])
    fill(win, [(b"h", 2)])
    win.count_parked(lambda cid: cid == b"h")
    assert win.parked == 3


def test_unsettled_tells_in_doubt_from_never_handed_to_a_handler() -> None:
    def classify(**death: Any) -> list[tuple[tuple[bytes, int], bool]]:
        win = Window(0)
        old = sealed(win, [(b"a", 0)])  # wseq 0: an earlier incarnation died holding it
        old.doubt = True
        sealed(win, [(b"b", 0), (b"c", 0)])  # wseq 1-2: sent to the current incarnation
        sealed(win, [(b"d", 0)], sent=False)  # wseq 3: never sent
        fill(win, [(b"e", 0)])  # wseq 4: pending
        return [((i[0], i[1]), doubt) for i, _, doubt in win.unsettled(**death)]

    never = [((b"d", 0), False), ((b"e", 0), False)]
    # Killed without a word: all it was sent may have run.
    assert classify(said_bye=False, running=None) == [
        ((b"a", 0), True), ((b"b", 0), True), ((b"c", 0), True), *never
    ]
    # It said which call was running when asked to stop: only that one (and the old doubt).
    assert classify(said_bye=False, running={2}) == [
        ((b"a", 0), True), ((b"b", 0), False), ((b"c", 0), True), *never
    ]
    # BYE: everything it did not acknowledge never reached a handler.
    assert classify(said_bye=True, running=None) == [
        ((b"a", 0), True), ((b"b", 0), False), ((b"c", 0), False), *never
    ]
