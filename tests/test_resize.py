"""Resizing a running pool: workers added and retired through slot moves, every message of every
channel processed once and in order, handler state exact, halted and pinned channels carried."""

from __future__ import annotations

import threading
import time
from typing import Any

import handlers
import pytest
from test_moves import Traffic, _order_ok, cid

from shardpool import MoveRefused, ShardPool
from shardpool.errors import DrainTimeout

pytestmark = pytest.mark.multiprocess


class Background:
    """Keeps ``traffic`` flowing (one round after another) until stopped."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                self.traffic.send(1)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            self.error = exc

    def end(self) -> None:
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def test_resize_2_3_1_2_under_load_keeps_order_and_state() -> None:
    # No LOAD report in this test (rebalance_interval_s): a resize places slots by measured load,
    # so only unmeasured slots come out even in count, as asserted below.
    with ShardPool(
        handlers.counter, workers=2, heartbeat_interval_s=0.1, rebalance_interval_s=3600.0
    ) as pool:
        traffic = Traffic(pool, 300)
        load = Background(traffic)
        try:
            for n in (3, 1, 2):
                pool.resize(n, timeout=60)
                placement = pool.placement()
                assert placement["workers"] == n and len(pool.worker_pids()) == n
                per = placement["slots_per_worker"]
                assert sum(per) == 4096 and max(per) - min(per) <= 1, per
        finally:
            load.end()
        traffic.send(1)
        traffic.check()
        _order_ok(pool)
        assert sum(len(f) for f in traffic.futs.values()) > 600  # it ran during the resizes


def test_retiring_a_worker_carries_its_halted_and_pinned_channels() -> None:
    with ShardPool(
        handlers.counter, workers=3, failure_policy="halt", heartbeat_interval_s=0.1
    ) as pool:
        spare = range(1000, 2000)  # not among the traffic's channels
        halted = next(c for c in spare if pool.worker_of(cid(c)) == 2)
        pinned = next(c for c in spare if pool.worker_of(cid(c)) == 0)
        assert pool.call(cid(halted), {"i": 0}, timeout=30) == [0, 1]
        failed = pool.request(cid(halted), {"i": 1, "fail": True})
        late = pool.request(cid(halted), {"i": 1})  # held behind the halt
        pool.pin(cid(pinned), 2)
        assert [pool.call(cid(pinned), {"i": i}, timeout=30) for i in range(2)] == [[0, 1], [1, 2]]
        traffic = Traffic(pool, 200)
        traffic.send(2)
        pool.drain(timeout=30)
        assert pool.halted_channels() == {cid(halted): 1}

        pool.resize(2, timeout=60)
        assert pool.halted_channels() == {cid(halted): 1}
        assert pool.worker_of(cid(halted)) in (0, 1) and pool.worker_of(cid(pinned)) in (0, 1)
        assert cid(pinned).hex() in pool.placement()["pins"]
        assert not late.done()
        pool.skip(cid(halted))
        with pytest.raises(Exception, match="skipped"):
            failed.result(timeout=30)
        assert late.result(timeout=30) == [2, 2]  # the state moved: count 1 → 2
        assert pool.call(cid(pinned), {"i": 2}, timeout=30) == [2, 3]
        traffic.send(1)
        pool.resize(1, timeout=60)
        traffic.send(1)
        traffic.check()
        _order_ok(pool)


def test_a_new_worker_that_cannot_start_calls_the_resize_off() -> None:
    with ShardPool(
        "handlers:FailsToStartFrom", handler_options={"index": 2}, workers=2
    ) as pool:
        traffic = Traffic(pool, 100)
        traffic.send(1)
        refused = r"called off: worker [23] could not start.*no database connection"
        with pytest.raises(MoveRefused, match=refused):
            pool.resize(4, timeout=60)
        assert pool.placement()["workers"] == 2 and len(pool.worker_pids()) == 2
        assert not pool.broken
        traffic.send(1)
        traffic.check()
        pool.resize(1, timeout=60)  # the pool still resizes as usual
        traffic.send(1)
        traffic.check()


def test_a_slot_that_keeps_failing_to_move_calls_the_resize_off_and_keeps_its_worker() -> None:
    """A channel state that cannot move (not CBOR-encodable) on a retiring worker: its slot's
    move is tried a few times, then the resize is called off naming the channel; the worker
    stays with the slots it still owns and every channel goes on, in order."""
    with ShardPool("handlers:Unmovable", workers=2, heartbeat_interval_s=0.1) as pool:
        opaque = next(c for c in range(1000) if pool.worker_of(cid(c)) == 1)
        assert pool.call(cid(opaque), {"opaque": True}, timeout=30) == 0
        others = [c for c in range(1000, 1100)]
        assert [pool.call(cid(c), {}, timeout=30) for c in others] == [0] * 100
        with pytest.raises(
            MoveRefused,
            match=f"called off: a move was called off 3 times: .*{cid(opaque).hex()}.*CBOR",
        ):
            pool.resize(1, timeout=60)
        place = pool.placement()
        assert place["workers"] == 2 and len(pool.worker_pids()) == 2
        assert not place["resize"]["in_progress"] and place["resize"]["target"] == 2
        assert "CBOR" in place["resize"]["error"]
        assert place["moves"]["aborted"] <= 6  # tried again after a pause, not in a tight loop
        assert pool.worker_of(cid(opaque)) == 1
        assert pool.call(cid(opaque), {"opaque": True}, timeout=30) == 1
        assert [pool.call(cid(c), {}, timeout=30) for c in others] == [1] * 100
        _order_ok(pool)


def test_a_grow_gives_every_new_worker_its_share_of_slots_when_one_slot_is_hot() -> None:
    """All the measured load in one slot: it cannot be split, so the load levels no further —
    the new workers still get their share of the other slots by count, none is left empty."""
    with ShardPool(
        handlers.spin, workers=1, rebalance="off", rebalance_interval_s=0.1,
        heartbeat_interval_s=0.1,
    ) as pool:
        hot = cid(0)
        futs = [pool.request(hot, {"i": i, "us": 2000}) for i in range(600)]  # ~1.2 s of CPU
        deadline = time.monotonic() + 30
        polls = 0
        while pool.placement()["levelling"]["load"][0] < 0.3:  # measured (LOAD reports)
            assert time.monotonic() < deadline, pool.placement()["levelling"]
            # A round trip on a channel of its own paces the polling (no sleep).
            assert pool.call(cid(1), {"i": polls, "us": 0}, timeout=30) == [polls, polls + 1]
            polls += 1
        pool.resize(3, timeout=60)
        per = pool.placement()["slots_per_worker"]
        assert sum(per) == 4096 and min(per) >= 4096 // 3 - 1, per
        assert [f.result(timeout=60) for f in futs] == [[i, i + 1] for i in range(600)]
        _order_ok(pool)


@pytest.mark.parametrize("grow_after", [0, 1, 3])
def test_a_grow_asked_while_a_shrink_runs_ends_at_the_new_count(grow_after: int) -> None:
    """Shrink 4 → 1, then — whatever the shrink has done by then (nothing, some workers asked to
    stop, most of it) — grow to 3: workers are removed from the end only, the resize ends at 3
    and no message is lost or reordered."""
    with ShardPool(handlers.counter, workers=4, heartbeat_interval_s=0.1) as pool:
        traffic = Traffic(pool, 200)
        traffic.send(1)
        pool.resize(1, wait=False)
        traffic.send(grow_after)  # lets the shrink get further before the grow
        pool.resize(3, timeout=60)
        place = pool.placement()
        assert place["workers"] == 3 and len(pool.worker_pids()) == 3
        assert sum(place["slots_per_worker"]) == 4096 and not place["resize"]["retiring"]
        traffic.send(1)
        traffic.check()
        _order_ok(pool)


@pytest.mark.parametrize("bad", [0, 1025, -1, "2", 2.0, True, None])
def test_a_bad_worker_count_is_refused_naming_it(bad: Any) -> None:
    with ShardPool(handlers.counter, workers=1) as pool:
        with pytest.raises(MoveRefused, match="resize: workers must be"):
            pool.resize(bad)
        assert pool.placement()["workers"] == 1


def test_a_resize_that_runs_past_its_timeout_goes_on() -> None:
    with ShardPool(handlers.counter, workers=1, heartbeat_interval_s=0.1) as pool:
        with pytest.raises(DrainTimeout, match="goes on"):
            pool.resize(2, timeout=0.0001)
        pool.resize(2, timeout=60)  # the same target: waits for the one under way
        assert pool.placement()["slots_per_worker"] == [2048, 2048]


def test_resizing_a_closed_pool_is_refused() -> None:
    pool = ShardPool(handlers.counter, workers=1)
    pool.close()
    with pytest.raises(MoveRefused, match="not running"):
        pool.resize(2)
