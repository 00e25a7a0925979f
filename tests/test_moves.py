"""Live slot moves: every message of every channel processed once, in order, with its handler
state carried across, while slots and channels change workers under load."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import handlers
import pytest

from shardpool import MoveRefused, ShardPool, WorkerStartError
from shardpool.routing import slot_of

pytestmark = pytest.mark.multiprocess


def cid(c: int) -> bytes:
    return b"mv-%05d" % c


class Traffic:
    """Sends ``rounds`` messages to each of ``channels`` channels (interleaved) and keeps every
    future, so that each channel's results can be checked whole."""

    def __init__(self, pool: ShardPool, channels: int) -> None:
        self.pool = pool
        self.channels = channels
        self.futs: dict[int, list[Any]] = {c: [] for c in range(channels)}

    def send(self, rounds: int) -> None:
        for _ in range(rounds):
            for c in range(self.channels):
                i = len(self.futs[c])
                self.futs[c].append(self.pool.request(cid(c), {"i": i}))

    def check(self) -> None:
        for c, futs in self.futs.items():
            got = [f.result(timeout=60) for f in futs]
            assert got == [[i, i + 1] for i in range(len(futs))], f"channel {c}: {got[:5]}"


def _order_ok(pool: ShardPool) -> None:
    stats = pool.stats()
    for w in stats["workers"]:
        assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0), w


def test_a_slot_moves_under_load_with_its_state() -> None:
    with ShardPool(handlers.counter, workers=2) as pool:
        traffic = Traffic(pool, 300)
        traffic.send(3)
        slots = sorted({slot_of(cid(c), 4096) for c in range(300)})
        mine = [s for s in slots if pool.stats()["placement"] and s % 2 == 0][:40]
        sender = threading.Thread(target=traffic.send, args=(5,))
        sender.start()
        move = pool.move_slots(mine, 1)
        sender.join(60)
        assert move.state == "committed" and move.pause_s is not None
        traffic.send(2)
        traffic.check()
        _order_ok(pool)
        placement = pool.stats()["placement"]
        assert placement["slots_per_worker"] == [2048 - 40, 2048 + 40]
        for s in mine:
            assert pool.worker_of_slot(s) == 1


def test_a_move_to_the_same_worker_or_a_busy_slot_is_refused() -> None:
    with ShardPool(handlers.counter, workers=2) as pool:
        with pytest.raises(MoveRefused, match="already on worker 0"):
            pool.move_slots([0], 0)
        with pytest.raises(MoveRefused, match="several workers"):
            pool.move_slots([0, 1], 0)


def owned_by(pool: ShardPool, worker: int, channels: range) -> tuple[list[int], list[int]]:
    """(slots owned by ``worker`` holding some of ``channels``, those channels)."""
    slots = sorted({slot_of(cid(c), 4096) for c in channels if pool.worker_of(cid(c)) == worker})
    return slots, [c for c in channels if slot_of(cid(c), 4096) in set(slots)]


def move_all(pool: ShardPool, order: list[int], group: int = 64) -> int:
    """Move every slot in ``order`` to the other of two workers, ``group`` slots of one owner at
    a time; returns how many moves committed."""
    done = 0
    by_owner: dict[int, list[int]] = {0: [], 1: []}
    for s in order:
        by_owner[pool.worker_of_slot(s)].append(s)
    for owner, slots in by_owner.items():
        for i in range(0, len(slots), group):
            move = pool.move_slots(slots[i : i + group], 1 - owner)
            assert move.state == "committed"
            done += 1
    return done


def test_every_slot_moves_twice_under_load_with_exact_state() -> None:
    import random

    with ShardPool(handlers.counter, workers=2, max_concurrent_moves=64) as pool:
        traffic = Traffic(pool, 500)
        traffic.send(2)
        stop = threading.Event()

        def keep_sending() -> None:
            while not stop.is_set():
                traffic.send(1)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        try:
            order = list(range(4096))
            random.Random(7).shuffle(order)
            assert move_all(pool, order) == 64
            random.Random(8).shuffle(order)
            assert move_all(pool, order) == 64
        finally:
            stop.set()
            sender.join(60)
        traffic.send(1)
        traffic.check()
        _order_ok(pool)
        assert pool.stats()["placement"]["slots_per_worker"] == [2048, 2048]


def test_a_producer_waiting_for_room_follows_its_channel_when_the_move_commits() -> None:
    # A producer blocked on a full window lets go of the front's lock; if its channel's move
    # commits meanwhile, its message must go to the new worker. (It once went to the window it
    # had waited on, the old worker's, which had handed the channel's state over: out of order.)
    with ShardPool(
        handlers.counter, workers=2, max_inflight=1, batch_size=1, move_buffer_max=2
    ) as pool:  # (a small move buffer: no burst of held messages to wait out at each move)
        slot = slot_of(cid(7), 4096)
        futs: list[Any] = []
        stop = threading.Event()

        def produce() -> None:
            while not stop.is_set():
                futs.append(pool.request(cid(7), {"i": len(futs), "ms": 2}))

        sender = threading.Thread(target=produce)
        sender.start()
        try:
            for _ in range(20):
                pool.move_slots([slot], 1 - pool.worker_of_slot(slot), timeout=30)
        finally:
            stop.set()
            sender.join(30)
        assert not sender.is_alive()
        pool.drain(timeout=30)
        assert pool.halts() == {}  # a message out of order halts the channel (policy: halt)
        for i, f in enumerate(futs):
            assert f.result(timeout=30) == [i, i + 1]
        _order_ok(pool)


def test_a_drain_waits_for_an_awaiting_call_and_a_stuck_one_is_called_off(tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    with ShardPool(handlers.gated_counter, workers=2, move_timeout_s=0.5) as pool:
        slots, chans = owned_by(pool, 0, range(200))
        slow = chans[0]
        stuck = pool.request(cid(slow), {"i": 0, "gate": gate})
        others = [pool.request(cid(c), {"i": 0}) for c in chans[1:]]
        assert [f.result(timeout=30)[1] for f in others] == [1] * len(others)
        # The slot of the awaiting channel cannot drain: the move is called off, naming it.
        with pytest.raises(MoveRefused, match=f"still busy: channel {cid(slow).hex()}"):
            pool.move_slots([slot_of(cid(slow), 4096)], 1)
        behind = pool.request(cid(slow), {"i": 1})  # held during the move, then back to worker 0
        assert pool.worker_of(cid(slow)) == 0
        open(gate, "w").close()
        assert stuck.result(timeout=30) == [0, 1] and behind.result(timeout=30) == [1, 2]
        # With nothing awaiting any more, the same move goes through, state and all.
        move = pool.move_slots([slot_of(cid(slow), 4096)], 1)
        assert move.state == "committed"
        assert pool.call(cid(slow), {"i": 2}, timeout=30) == [2, 3]
        _order_ok(pool)


def test_a_move_while_a_call_awaits_waits_for_it(tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    with ShardPool(handlers.gated_counter, workers=2, move_timeout_s=30) as pool:
        _, chans = owned_by(pool, 0, range(100))
        busy = chans[0]
        first = pool.request(cid(busy), {"i": 0, "gate": gate})
        result: dict[str, Any] = {}
        mover = threading.Thread(
            target=lambda: result.update(move=pool.move_slots([slot_of(cid(busy), 4096)], 1))
        )
        mover.start()
        later = pool.request(cid(busy), {"i": 1})  # held at the front: its slot is fenced
        assert not first.done() and not later.done()
        open(gate, "w").close()
        mover.join(30)
        assert result["move"].state == "committed"
        assert first.result(timeout=30) == [0, 1] and later.result(timeout=30) == [1, 2]
        assert pool.worker_of(cid(busy)) == 1
        _order_ok(pool)


def test_a_channel_that_appears_during_the_fence_goes_to_the_new_worker(tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    with ShardPool(handlers.gated_counter, workers=2, move_timeout_s=30) as pool:
        slots, chans = owned_by(pool, 0, range(2000))
        slot = slot_of(cid(chans[0]), 4096)
        mates = [c for c in chans if slot_of(cid(c), 4096) == slot]
        assert len(mates) >= 2
        first = pool.request(cid(mates[0]), {"i": 0, "gate": gate})
        result: dict[str, Any] = {}
        mover = threading.Thread(
            target=lambda: result.update(move=pool.move_slots([slot], 1))
        )
        mover.start()
        newcomer = pool.request(cid(mates[1]), {"i": 0})  # unknown until now, in the fenced slot
        open(gate, "w").close()
        mover.join(30)
        assert result["move"].state == "committed"
        assert first.result(timeout=30) == [0, 1] and newcomer.result(timeout=30) == [0, 1]
        assert pool.worker_of(cid(mates[1])) == 1
        _order_ok(pool)


def test_a_fenced_slot_blocks_only_its_own_producers(tmp_path: Any) -> None:
    gate = str(tmp_path / "gate")
    with ShardPool(
        handlers.gated_counter, workers=2, move_timeout_s=30, move_buffer_max=5
    ) as pool:
        _, chans = owned_by(pool, 0, range(300))
        busy = chans[0]
        first = pool.request(cid(busy), {"i": 0, "gate": gate})
        mover = threading.Thread(target=pool.move_slots, args=([slot_of(cid(busy), 4096)], 1))
        mover.start()
        held = [pool.request(cid(busy), {"i": i}) for i in range(1, 6)]  # fills the buffer
        with pytest.raises(BlockingIOError):
            pool.submit_bytes(cid(busy), b"\xa1ai\x06", block=False)
        # Every other channel runs on at full rate meanwhile.
        others = [c for c in range(300, 1300) if slot_of(cid(c), 4096) != slot_of(cid(busy), 4096)]
        assert [pool.call(cid(c), {"i": 0}, timeout=30)[1] for c in others[:200]] == [1] * 200
        open(gate, "w").close()
        mover.join(30)
        assert [f.result(timeout=30)[1] for f in [first, *held]] == [1, 2, 3, 4, 5, 6]
        _order_ok(pool)


def test_a_state_that_cannot_move_calls_the_move_off_naming_the_channel() -> None:
    with ShardPool("handlers:Unmovable", workers=2) as pool:
        _, chans = owned_by(pool, 0, range(300))
        opaque = chans[0]
        pool.call(cid(opaque), {"opaque": True}, timeout=30)
        for c in chans[1:20]:
            pool.call(cid(c), {}, timeout=30)
        with pytest.raises(MoveRefused, match=f"channel {cid(opaque).hex()}.*not CBOR-encodable"):
            pool.move_slots([slot_of(cid(opaque), 4096)], 1)
        # Nothing moved, nothing lost: the channels go on where they were.
        assert pool.worker_of(cid(opaque)) == 0
        assert pool.call(cid(opaque), {"opaque": True}, timeout=30) == 1
        _order_ok(pool)


def test_a_state_that_cannot_be_restored_halts_its_channel_with_the_cause() -> None:
    with ShardPool("handlers:Hooked", workers=2, move_state="hooks") as pool:
        slots, chans = owned_by(pool, 0, range(300))
        bad, good = chans[0], chans[1]
        assert pool.call(cid(bad), {"corrupt": True}, timeout=30) == -1
        assert [pool.call(cid(good), {}, timeout=30) for _ in range(3)] == [1, 2, 3]
        moved = sorted({slot_of(cid(bad), 4096), slot_of(cid(good), 4096)})
        assert pool.move_slots(moved, 1).state == "committed"
        failed = pool.request(cid(bad), {})
        assert pool.call(cid(good), {}, timeout=30) == 4  # its state arrived whole
        pool.drain(timeout=30)
        halt = pool.halts()[cid(bad)]
        assert halt.seq == 1 and not failed.done()
        assert "StateNotRestored" in str(halt.error)
        assert "the moved count is corrupt" in str(halt.error)
        pool.resume(cid(bad))  # the operator's call: run it without the moved state
        assert failed.result(timeout=30) == 1
        assert pool.call(cid(bad), {}, timeout=30) == 2
        _order_ok(pool)


def test_hooks_without_the_hooks_are_refused_at_start() -> None:
    with pytest.raises(WorkerStartError, match="move_state = 'hooks'.*no snapshot and no restore"):
        ShardPool(handlers.counter, workers=1, move_state="hooks")


def test_a_slot_moved_away_and_straight_back_keeps_order_and_state() -> None:
    with ShardPool(handlers.counter, workers=2) as pool:
        traffic = Traffic(pool, 400)
        slots, _ = owned_by(pool, 0, range(400))
        for _ in range(3):
            traffic.send(1)
            assert pool.move_slots(slots[:30], 1).state == "committed"
            traffic.send(1)
            assert pool.move_slots(slots[:30], 0).state == "committed"
        traffic.send(1)
        traffic.check()
        _order_ok(pool)


def test_a_halted_channel_moves_still_halted_then_is_resumed_and_skipped_there() -> None:
    with ShardPool(handlers.fail_on, workers=2, failure_policy="halt") as pool:
        _, chans = owned_by(pool, 0, range(300))
        a = chans[0]
        b = next(c for c in chans if slot_of(cid(c), 4096) != slot_of(cid(a), 4096))
        fa = [pool.request(cid(a), {"i": 0, "fail": True}), pool.request(cid(a), {"i": 1})]
        fb = [pool.request(cid(b), {"i": 0, "fail": True}), pool.request(cid(b), {"i": 1})]
        pool.drain(timeout=30)
        assert pool.halted_channels() == {cid(a): 0, cid(b): 0}
        move = pool.move_slots([slot_of(cid(a), 4096), slot_of(cid(b), 4096)], 1)
        assert move.state == "committed"
        assert pool.halted_channels() == {cid(a): 0, cid(b): 0}
        late = pool.request(cid(a), {"i": 2})  # still held: the channel is halted
        assert not any(f.done() for f in [*fa, *fb, late])
        pool.skip(cid(a))
        assert [f.result(timeout=30) for f in fa[1:]] + [late.result(timeout=30)] == [1, 2]
        with pytest.raises(Exception, match="skipped"):
            fa[0].result(timeout=30)
        pool.resume(cid(b))  # it fails again: still halted, wherever it is
        pool.drain(timeout=30)
        assert pool.halted_channels() == {cid(b): 0}
        _order_ok(pool)


def test_a_pinned_channel_stays_put_when_its_slot_moves_and_unpins_back() -> None:
    with ShardPool(handlers.counter, workers=3) as pool:
        traffic = Traffic(pool, 200)
        traffic.send(2)
        hot = 5
        home = pool.worker_of(cid(hot))
        target = (home + 1) % 3
        assert pool.pin(cid(hot), target) is not None
        assert pool.worker_of(cid(hot)) == target
        traffic.send(2)
        slot = slot_of(cid(hot), 4096)
        assert pool.move_slots([slot], (home + 2) % 3).state == "committed"
        assert pool.worker_of(cid(hot)) == target  # the pin holds
        traffic.send(1)
        pool.unpin(cid(hot))
        assert pool.worker_of(cid(hot)) == (home + 2) % 3  # back with its slot
        traffic.send(1)
        traffic.check()
        _order_ok(pool)


# -- moves and deaths: a durable ledger is the ground truth ------------------------------------


def vcid(c: int) -> bytes:
    return c.to_bytes(4, "big") * 8


def value(c: int, i: int) -> int:
    return (c * 7919 + i * 104729 + 1) % 1_000_003


class LedgerRun:
    """A pool of the durable ``Ledger`` handler (its position moves with a channel through the
    hooks), ``channels`` channels and every message's future; :meth:`verify` checks each channel
    against serial application."""

    CHANNELS = 400

    def __init__(self, tmp_path: Any, **options: Any) -> None:
        self.dir = tmp_path / "ledger"
        self.dir.mkdir()
        opts: dict[str, Any] = dict(
            workers=2, heartbeat_interval_s=0.1, restart_backoff_s=0.01, move_state="hooks"
        )
        opts.update(options)
        self.pool = ShardPool("handlers:Ledger", handler_options={"dir": str(self.dir)}, **opts)
        self.sent: dict[int, int] = dict.fromkeys(range(self.CHANNELS), 0)

    def send(self, rounds: int, **extra: Any) -> None:
        for _ in range(rounds):
            for c in range(self.CHANNELS):
                i = self.sent[c]
                self.pool.submit(vcid(c), {"v": value(c, i), **extra})
                self.sent[c] = i + 1

    def slots_of(self, worker: int) -> list[int]:
        return sorted(
            {slot_of(vcid(c), 4096) for c in range(self.CHANNELS)
             if self.pool.worker_of(vcid(c)) == worker}
        )

    def verify(self) -> None:
        ledger = handlers.read_ledgers(str(self.dir))
        for c in range(self.CHANNELS):
            lines = ledger[vcid(c).hex()]
            assert [x for x in lines if x[0] in "VG"] == [], f"channel {c}: {lines}"
            applied = sorted((x for x in lines if x[0] == "A"), key=lambda x: x[1])
            assert [x[1] for x in applied] == list(range(self.sent[c])), f"channel {c}"
            serial = handlers.ledger_digest([value(c, i) for i in range(self.sent[c])])
            assert applied[-1][2] == serial, f"channel {c}: state differs from a serial replay"
            assert all(x[3] == 1 for x in lines if x[0] == "D")
        _order_ok(self.pool)


def _wait_moving(pool: ShardPool) -> None:
    deadline = time.monotonic() + 30
    while not pool.placement()["moves"]["in_progress"]:
        assert time.monotonic() < deadline, "the move never started"


def test_the_old_owner_dying_mid_drain_calls_the_move_off_and_loses_nothing(tmp_path: Any) -> None:
    run = LedgerRun(tmp_path)
    try:
        run.send(2)
        run.pool.drain(timeout=60)
        run.send(1, ms=5)  # ~1 s of slow calls on each worker: the drain waits behind them
        slots = run.slots_of(0)[:20]
        result: dict[str, Any] = {}

        def move() -> None:
            try:
                result["move"] = run.pool.move_slots(slots, 1)
            except MoveRefused as exc:
                result["error"] = str(exc)

        mover = threading.Thread(target=move)
        mover.start()
        _wait_moving(run.pool)
        run.send(1)  # held for the move
        pid = run.pool.worker_pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        mover.join(60)
        assert "died during the move" in result["error"]
        run.send(1)
        run.pool.drain(timeout=60)
        assert all(run.pool.worker_of_slot(s) == 0 for s in slots)
        run.verify()
    finally:
        run.pool.close()


@pytest.mark.parametrize("old_owner_too", [False, True], ids=["new-owner", "both-owners"])
def test_owners_dying_before_the_install_was_read_recover_exactly(
    tmp_path: Any, old_owner_too: bool
) -> None:
    """The new owner is stopped, so INSTALL and the moved channels' messages wait in its pipe;
    then it (and the old owner too) is killed: its successor gets INSTALL first again."""
    run = LedgerRun(tmp_path)
    try:
        run.send(2)
        run.pool.drain(timeout=60)
        slots = run.slots_of(0)[:20]
        src, dst = run.pool.worker_pids()
        assert src is not None and dst is not None
        os.kill(dst, signal.SIGSTOP)
        try:
            assert run.pool.move_slots(slots, 1).state == "committed"
            run.send(1)
        finally:
            if old_owner_too:
                os.kill(src, signal.SIGKILL)
            os.kill(dst, signal.SIGKILL)
        run.send(1)
        run.pool.drain(timeout=60)
        assert all(run.pool.worker_of_slot(s) == 1 for s in slots)
        run.verify()
    finally:
        run.pool.close()


def test_the_new_owner_dying_after_the_install_recovers_from_its_ledger(tmp_path: Any) -> None:
    run = LedgerRun(tmp_path)
    try:
        run.send(2)
        slots = run.slots_of(0)[:20]
        assert run.pool.move_slots(slots, 1).state == "committed"
        run.send(2)
        run.pool.drain(timeout=60)  # the INSTALL and everything after it acknowledged
        run.send(1, ms=2)
        pid = run.pool.worker_pids()[1]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        run.send(1)
        run.pool.drain(timeout=60)
        run.verify()
    finally:
        run.pool.close()


def test_close_during_a_move_hands_back_the_held_messages(tmp_path: Any) -> None:
    run = LedgerRun(tmp_path)
    run.send(1)
    run.pool.drain(timeout=60)
    run.send(1, ms=20)  # ~4 s of slow calls: the drain cannot finish before the close
    slots = run.slots_of(0)[:20]
    mover = threading.Thread(
        target=lambda: pytest.raises(MoveRefused, run.pool.move_slots, slots, 1)
    )
    mover.start()
    _wait_moving(run.pool)
    run.send(1)  # held for the move
    report = run.pool.close(timeout=1.5)
    mover.join(30)
    ledger = handlers.read_ledgers(str(run.dir))
    applied = {
        (bytes.fromhex(k), x[1]) for k, lines in ledger.items() for x in lines if x[0] == "A"
    }
    handed = {(c, s) for c, s, _ in report.unfinished + report.in_doubt}
    everything = {(vcid(c), i) for c in range(run.CHANNELS) for i in range(run.sent[c])}
    assert applied | handed == everything
    assert not applied & {(c, s) for c, s, _ in report.unfinished}
    moved = {vcid(c) for c in range(run.CHANNELS) if slot_of(vcid(c), 4096) in set(slots)}
    held = {(c, 2) for c in moved}
    assert held <= {(c, s) for c, s, _ in report.unfinished}  # held at the front: never sent


def test_a_frame_of_a_move_that_is_over_is_ignored() -> None:
    with ShardPool(handlers.counter, workers=2) as pool:
        traffic = Traffic(pool, 50)
        traffic.send(1)
        slots = sorted({slot_of(cid(c), 4096) for c in range(50) if pool.worker_of(cid(c)) == 0})
        move = pool.move_slots(slots[:3], 1)
        front = pool._front
        with front.lock:
            link = front.links[0]
            # A late SLOT_STATE and CANCELLED of that finished move (and of one never started).
            for gen in (move.gen, 999):
                front.mover.on_slot_state(link, [8, 0, link.epoch, gen, [], None])
                front.mover.on_cancelled(link, [9, 0, link.epoch, gen, []])
        assert all(pool.worker_of_slot(s) == 1 for s in slots[:3])
        traffic.send(1)
        traffic.check()
        _order_ok(pool)
