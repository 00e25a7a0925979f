"""Load levelling decisions (shardpool.front.balance) on a front stand-in: fed LOAD reports, the
balancer must plan — and in ``auto`` mode start — exactly the moves its rules call for."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import handlers
import pytest
from test_moves import cid

from shardpool import ShardPool
from shardpool.codec import ToFront
from shardpool.config import config_from_dict
from shardpool.front import balance
from shardpool.front.balance import Balancer
from shardpool.front.channels import Channels
from shardpool.front.state import PoolState
from shardpool.front.window import Window
from shardpool.routing import Router
from shardpool.supervisor import WorkerState

SLOTS = 64


class FakeFront:
    """What the balancer reads of a front: config, slot table, pins, workers, moves."""

    def __init__(self, workers: int, **pool: Any) -> None:
        self.cfg = config_from_dict(
            {"pool": {"workers": workers, "slots": SLOTS, "rebalance_interval_s": 1.0, **pool}}
        )
        self.channels = Channels(Router(SLOTS, workers), [Window(i) for i in range(workers)])
        self.links = [SimpleNamespace(index=i) for i in range(workers)]
        self.sup = SimpleNamespace(
            workers=[SimpleNamespace(state=WorkerState.READY) for _ in range(workers)]
        )
        self.resizer = SimpleNamespace(retiring=set(), busy=lambda: False)
        self.roller = SimpleNamespace(busy=lambda: False, evacuating=set)
        self.started: list[tuple[tuple[int, ...], tuple[bytes, ...], int, str]] = []
        self.mover = SimpleNamespace(moved_at={}, start=self._start)
        self.state = PoolState.RUNNING

    def _start(self, slots: tuple[int, ...], cids: tuple[bytes, ...], dst: int, why: str) -> None:
        self.started.append((slots, cids, dst, why))
        for s in slots:  # as if committed at once
            self.channels.router.table[s] = dst
        for c in cids:
            if why == "unpin":
                del self.channels.pins[c]
            else:
                self.channels.pins[c] = dst


def report(
    b: Balancer, worker: int, busy: float, slots: dict[int, int], hot: list[list[Any]] | None = None
) -> None:
    """A LOAD of ``worker``: ``busy`` share of a core over 1 s, messages per slot."""
    b.on_load(b.front.links[worker], [ToFront.LOAD, worker, 1, 1.0, busy, slots, hot or []])


def periods(b: Balancer, n: int, feed: Any) -> None:
    """``n`` periods: ``feed()`` the reports, then one tick."""
    for _ in range(n):
        feed()
        b.next_tick = 0.0
        b.tick(1_000_000.0)


def hot_feed(f: FakeFront, b: Balancer, hot: bytes, home: int) -> Any:
    """A period's reports of 4 workers: ``home`` 95% busy with ``hot`` carrying most of it, the
    others 30%; every slot counts 100 messages."""

    def feed() -> None:
        for w in range(4):
            mine = {s: 100 for s in range(SLOTS) if f.channels.router.table[s] == w}
            if w == home:
                report(b, w, 0.95, mine, [[hot, 1600]])
            else:
                report(b, w, 0.3, mine)

    return feed


def skewed(b: Balancer) -> None:
    # Worker 0 at 0.9 of a core over slots 0, 2, 4, 6 (slot 0 the hottest); worker 1 at 0.1.
    report(b, 0, 0.9, {0: 600, 2: 200, 4: 100, 6: 100})
    report(b, 1, 0.1, {1: 100})


def test_loads_are_cpu_divided_among_slots_by_messages_and_smoothed() -> None:
    b = Balancer(FakeFront(2))  # type: ignore[arg-type]
    skewed(b)
    assert b.slot_load[0] == pytest.approx(0.54) and b.slot_load[6] == pytest.approx(0.09)
    assert b.worker_loads() == pytest.approx([0.9, 0.1])
    report(b, 0, 0.0, {})  # an idle period pulls every slot of worker 0 down by ALPHA
    assert b.slot_load[0] == pytest.approx(0.54 * (1 - balance.ALPHA))


def test_an_imbalance_acts_only_after_it_lasts_and_moves_the_hottest_slot_under_the_cap() -> None:
    f = FakeFront(2, rebalance="auto")
    b = Balancer(f)  # type: ignore[arg-type]
    def feed() -> None:
        report(b, 0, 0.6, {0: 500, 2: 300, 4: 100, 6: 100})
        report(b, 1, 0.45, {1: 1})

    periods(b, 1, feed)
    assert b.streak == 1 and f.started == []  # 0.6 vs mean 0.525: over by 14%, once
    periods(b, balance.STREAK - 1, feed)
    # Cap 1.05 × mean = 0.551 for worker 1 (0.45): slots 0 (0.3) and 2 (0.18) would overshoot;
    # slot 4 (0.06) fits, and then nothing more does.
    assert f.started == [((4,), (), 1, "levelling")]


def test_a_surge_acts_at_once_and_an_idle_or_even_pool_never_moves() -> None:
    f = FakeFront(2, rebalance="auto")
    b = Balancer(f)  # type: ignore[arg-type]
    periods(b, 5, lambda: (report(b, 0, 0.1, {0: 10}), report(b, 1, 0.0, {})))
    assert f.started == []  # the busiest is under MIN_BUSY: an idle pool is left alone
    periods(b, 5, lambda: (report(b, 0, 0.5, {0: 10, 2: 10}), report(b, 1, 0.48, {1: 10})))
    assert f.started == []  # within the threshold
    b2 = Balancer(f2 := FakeFront(2, rebalance="auto"))  # type: ignore[arg-type]
    periods(b2, 1, lambda: skewed(b2))
    assert f2.started  # 0.9 vs mean 0.5: a surge


def test_advise_plans_without_moving_and_off_does_not_plan() -> None:
    f = FakeFront(2)  # rebalance = "advise" by default
    b = Balancer(f)  # type: ignore[arg-type]
    periods(b, 1, lambda: skewed(b))
    assert f.started == [] and b.plan and b.plan[0]["kind"] == "move"
    assert b.report()["plan"] == b.plan and b.report()["load_share"] == pytest.approx([0.9, 0.1])
    off = FakeFront(2, rebalance="off")
    b_off = Balancer(off)  # type: ignore[arg-type]
    periods(b_off, 5, lambda: skewed(b_off))
    assert off.started == [] and b_off.plan == []


def test_a_slot_moved_within_the_grace_period_stays() -> None:
    f = FakeFront(2, rebalance="auto", rebalance_grace_s=60.0)
    b = Balancer(f)  # type: ignore[arg-type]
    f.mover.moved_at.update({s: 1_000_000.0 - 10 for s in range(SLOTS)})  # all moved 10 s ago
    periods(b, 5, lambda: skewed(b))
    assert f.started == [] and b.plan == []


def test_an_oscillating_load_does_not_move_a_slot_back_and_forth() -> None:
    f = FakeFront(2, rebalance="auto", rebalance_grace_s=60.0)
    b = Balancer(f)  # type: ignore[arg-type]
    now = [1_000_000.0]

    def tick() -> None:
        b.next_tick = 0.0
        b.tick(now[0])
        for slots, _, _, _ in f.started:
            for s in slots:
                f.mover.moved_at[s] = now[0]
        now[0] += 1.0

    for flip in range(20):  # the hot slot's traffic jumps between the two workers' slots
        hot, cold = (0, 1) if flip % 2 == 0 else (1, 0)
        table = f.channels.router.table
        for w in (0, 1):
            slots = {s: (900 if s == hot else 10) for s in range(SLOTS) if table[s] == w}
            report(b, w, 0.9 if table[hot] == w else 0.1, slots)
        tick()
    moved = [s for slots, _, _, _ in f.started for s in slots]
    assert len(moved) == len(set(moved))  # no slot moved twice within the grace period


def test_a_hot_channel_is_pinned_alone_then_unpinned_when_it_cools() -> None:
    f = FakeFront(4, rebalance="auto")
    b = Balancer(f)  # type: ignore[arg-type]
    hot = b"hot-channel"
    home = f.channels.worker_of(hot)

    busy_hot = hot_feed(f, b, hot, home)

    periods(b, balance.STREAK, busy_hot)
    pins = [(cids, dst) for _, cids, dst, why in f.started if cids]
    assert len(pins) == 1 and pins[0][0] == (hot,) and pins[0][1] != home
    dedicated = pins[0][1]
    assert b.report()["dedicated"] == {dedicated: hot.hex()}
    before = len(f.started)
    periods(b, 3, busy_hot)
    # The dedicated worker's own slots were moved away (MAX_MOVES per period), to the others.
    assert [s for s in range(SLOTS) if f.channels.router.table[s] == dedicated] == []
    later = f.started[before:]
    assert later and {dst for _, _, dst, _ in later} <= set(range(4)) - {dedicated}

    def cool() -> None:
        for w in range(4):
            mine = {s: 100 for s in range(SLOTS) if f.channels.router.table[s] == w}
            if w == dedicated:
                report(b, w, 0.01, mine, [[hot, 1]])  # the channel went quiet
            else:
                report(b, w, 0.3, mine)

    f.started.clear()
    periods(b, 30, cool)  # the smoothed load decays under half the share, then COOL periods
    unpins = [(cids, why) for _, cids, _, why in f.started if cids]
    assert unpins == [((hot,), "unpin")] and hot not in f.channels.pins
    assert b.report()["dedicated"] == {}


def test_a_dedicated_worker_hands_its_idle_slots_over_at_once_spread_over_the_others() -> None:
    # 4 workers of 64 slots each; only the hot channel's home worker and slot 0's carry load.
    f = FakeFront(4, rebalance="auto", max_concurrent_moves=64)
    b = Balancer(f)  # type: ignore[arg-type]
    hot = b"hot-channel"
    home = f.channels.worker_of(hot)

    def busy_hot() -> None:
        for w in range(4):
            if w == home:
                report(b, w, 0.95, {f.channels.router.slot_of(hot): 1600}, [[hot, 1600]])
            else:
                report(b, w, 0.3, {s: 100 for s in f.channels.router.slots_of(w)[:1]})

    for _ in range(balance.STREAK + 2):
        table = list(f.channels.router.table)
        f.started.clear()
        periods(b, 1, busy_hot)
        if any(cids for _, cids, _, _ in f.started):
            break
    [dedicated] = [dst for _, cids, dst, _ in f.started if cids]
    idle = [s for s, w in enumerate(table) if w == dedicated and s not in b.slot_load]
    assert len(idle) > balance.MAX_MOVES
    # The period of the pin: every idle slot of the dedicated worker goes, to each other worker
    # in turn.
    assert [s for s in idle if f.channels.router.table[s] == dedicated] == []
    shares = [sum(len(slots) for slots, _, dst, _ in f.started if dst == w) for w in range(4)]
    assert shares[dedicated] == 0 and max(shares) - min(x for i, x in enumerate(shares)
                                                        if i != dedicated) <= 1, shares


def test_no_slot_is_moved_onto_the_worker_a_hot_channel_is_being_pinned_to() -> None:
    # The period that plans the pin also levels (the hot worker is far over the mean): its slot
    # moves must not pick the worker that the pin is about to dedicate to the channel, which
    # would only have to hand them back the next period.
    f = FakeFront(4, rebalance="auto", rebalance_grace_s=0.0)
    b = Balancer(f)  # type: ignore[arg-type]
    hot = b"hot-channel"
    home = f.channels.worker_of(hot)

    busy_hot = hot_feed(f, b, hot, home)

    for _ in range(balance.STREAK + 2):
        before = len(f.started)
        periods(b, 1, busy_hot)
        now = f.started[before:]
        pins = [dst for _, cids, dst, _ in now if cids]
        if pins:
            break
    assert pins, "the hot channel was never pinned"
    onto = [(slots, why) for slots, _, dst, why in now if slots and dst == pins[0]]
    assert onto == []
    # ... and that same period starts handing the dedicated worker's own slots to the others.
    assert any(slots and dst != pins[0] for slots, _, dst, _ in now)


def test_a_channel_that_keeps_a_whole_core_busy_is_reported_saturated() -> None:
    f = FakeFront(2)
    b = Balancer(f)  # type: ignore[arg-type]
    hot = b"too-hot"
    periods(b, 3, lambda: (report(b, f.channels.worker_of(hot), 1.0, {0: 1000}, [[hot, 990]]),))
    assert b.report()["saturated"] == [hot.hex()]


@pytest.mark.multiprocess
def test_auto_levelling_moves_load_off_a_busy_worker_without_reordering() -> None:
    with ShardPool(
        handlers.spin,
        workers=2,
        rebalance="auto",
        rebalance_interval_s=0.2,
        rebalance_grace_s=0.0,
        heartbeat_interval_s=0.1,
    ) as pool:
        busy = [c for c in range(400) if pool.worker_of(cid(c)) == 0][:60]
        sent = dict.fromkeys(busy, 0)
        futs: list[Any] = []
        deadline = time.monotonic() + 60
        while not any(pool.worker_of(cid(c)) == 1 for c in busy):
            assert time.monotonic() < deadline, pool.placement()
            for c in busy:  # ~60 ms of CPU per round, all of it on worker 0 at first
                futs.append((c, sent[c], pool.request(cid(c), {"i": sent[c], "us": 1000})))
                sent[c] += 1
            pool.drain(timeout=30)
        for c in busy:
            futs.append((c, sent[c], pool.request(cid(c), {"i": sent[c], "us": 0})))
            sent[c] += 1
        assert [f.result(timeout=30) for _, _, f in futs] == [[i, i + 1] for _, i, _ in futs]
        moves = pool.placement()["moves"]
        assert moves["committed"] >= 1 and moves["aborted"] == 0
        stats = pool.stats()
        for w in stats["workers"]:
            assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0)


@pytest.mark.multiprocess
def test_a_worker_that_always_has_a_frame_waiting_still_reports_its_load() -> None:
    # pyzmq completes a receive at once when a frame is waiting, and awaiting a done future does
    # not yield to the event loop: a saturated worker once never sent LOAD (nor heartbeats),
    # so levelling saw no load exactly when a worker was busiest.
    with ShardPool(
        handlers.spin, workers=1, rebalance="off", rebalance_interval_s=0.1, max_inflight=2000
    ) as pool:
        sent = dict.fromkeys(range(50), 0)
        loads: list[float] = []
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # ~0.4 s of work always queued at the worker
            for c in sent:
                pool.submit(cid(c), {"i": sent[c], "us": 200})
                sent[c] += 1
            loads.append(pool.placement()["levelling"]["load"][0])
        assert max(loads) > 0.1, loads[-5:]
        pool.drain(timeout=30)
        for w in pool.stats()["workers"]:
            assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0)
