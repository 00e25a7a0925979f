"""The core engine on real worker processes: order, isolation, backpressure, results, errors."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import handlers
import pytest

from shardpool import (
    ChannelIdError,
    HandlerError,
    InDoubt,
    InputError,
    PayloadTooLarge,
    PoolClosed,
    ShardPool,
    WorkerStartError,
)

pytestmark = pytest.mark.multiprocess


def _channel(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8  # 32 bytes, like a Lightning channel id


def _check_counters(stats: dict[str, Any]) -> None:
    for w in stats["workers"]:
        assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0), w


@pytest.mark.timeout(300)
def test_order_under_load_async_handler_many_producers() -> None:
    """4 workers, 2,000 channels, 200,000 messages from 4 producer threads, interleaved; the
    async handler awaits random short delays. Every message of every channel is processed
    exactly once, in submission order."""
    channels = 2000
    per_channel = 100
    producers = 4
    got: dict[bytes, list[int]] = collections.defaultdict(list)
    seqs: dict[bytes, list[int]] = collections.defaultdict(list)
    failures: list[HandlerError] = []

    def on_result(cid: bytes, seq: int, value: Any) -> None:
        seqs[cid].append(seq)
        got[cid].append(value[1])

    def produce(pool: ShardPool, k: int) -> None:
        mine = [_channel(c) for c in range(k, channels, producers)]
        for i in range(per_channel):
            for cid in mine:  # interleaved: one message of each channel in turn
                assert pool.submit(cid, {"i": i}) == i

    with ShardPool(
        handlers.record_async, workers=4, on_result=on_result, on_failure=failures.append
    ) as pool:
        threads = [threading.Thread(target=produce, args=(pool, k)) for k in range(producers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(240)
            assert not t.is_alive()
        pool.drain(timeout=240)
        stats = pool.stats()
    assert failures == []
    assert len(got) == channels
    for c in range(channels):
        cid = _channel(c)
        assert got[cid] == list(range(per_channel)), f"channel {c}"
        assert seqs[cid] == list(range(per_channel)), f"channel {c}"
    _check_counters(stats)
    assert sum(w["processed"] for w in stats["workers"]) == channels * per_channel
    assert stats["submitted"] == stats["acknowledged"] == channels * per_channel
    assert all(w["processed"] > 0 for w in stats["workers"])


def test_sync_handler_order_and_exactly_once() -> None:
    got: dict[bytes, list[int]] = collections.defaultdict(list)
    with ShardPool(
        handlers.record, workers=2, on_result=lambda c, s, v: got[c].append(v[1])
    ) as pool:
        for i in range(300):
            for c in range(50):
                pool.submit_bytes(_channel(c), cbor2.dumps({"i": i}))
        pool.drain(timeout=60)
        stats = pool.stats()
    assert {c: v for c, v in got.items()} == {_channel(c): list(range(300)) for c in range(50)}
    _check_counters(stats)


def test_slow_channel_does_not_delay_other_channels_on_its_worker(tmp_path: Path) -> None:
    gate = str(tmp_path / "never-opened")
    with ShardPool(handlers.gated, workers=2) as pool:
        slow = _channel(0)
        w = pool.worker_of(slow)
        same = [c for c in (_channel(i) for i in range(1, 400)) if pool.worker_of(c) == w][:50]
        assert len(same) == 50
        stuck = pool.request(slow, {"gate": gate, "i": 0})
        futs = [pool.request(c, {"i": n}) for n, c in enumerate(same)]
        # The other channels of the same worker finish while the slow one is still waiting.
        assert [f.result(timeout=30)[1] for f in futs] == list(range(50))
        assert not stuck.done()
        # Its channel's next message waits behind it (order), others keep going.
        behind = pool.request(slow, {"i": 1})
        assert pool.call(same[0], {"i": 99}, timeout=30)[1] == 99
        assert not behind.done()
        report = pool.close(timeout=1.0)
    # Closing accounts for what was not finished, never dropping it silently: the message stuck
    # in its handler may have been applied (in doubt), the one behind it never reached a handler.
    assert [(cid, seq) for cid, seq, _ in report.in_doubt] == [(slow, 0)]
    assert [(cid, seq) for cid, seq, _ in report.unfinished] == [(slow, 1)]
    assert not report.drained
    with pytest.raises(InDoubt, match="may have been applied"):
        stuck.result(timeout=0)
    with pytest.raises(PoolClosed, match="closed before") as closed:
        behind.result(timeout=0)
    assert not isinstance(closed.value, InDoubt)


def test_backpressure_blocks_submit_and_loses_nothing(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    submitted: list[int] = []
    got: list[int] = []
    with ShardPool(
        handlers.gated,
        workers=1,
        max_inflight=8,
        batch_size=4,
        on_result=lambda c, s, v: got.append(v[1]),
    ) as pool:

        def produce() -> None:
            for i in range(100):
                pool.submit(b"one-channel", {"gate": str(gate), "i": i})
                submitted.append(i)

        t = threading.Thread(target=produce)
        t.start()
        deadline = time.monotonic() + 30
        while len(submitted) < 8 and time.monotonic() < deadline:
            t.join(0.01)
        assert len(submitted) == 8
        # The ninth submit is blocked: the window holds 8 unacknowledged messages, no more.
        t.join(0.5)
        assert t.is_alive() and len(submitted) == 8
        assert pool.stats()["inflight"] == 8
        gate.touch()
        t.join(60)
        assert not t.is_alive()
        pool.drain(timeout=60)
    assert submitted == list(range(100))
    assert got == list(range(100))


def test_async_submit_awaits_room(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def main() -> list[int]:
        got: list[int] = []
        pool = await ShardPool.open(
            handlers.gated,
            workers=1,
            max_inflight=4,
            batch_size=2,
            on_result=lambda c, s, v: got.append(v[1]),
        )
        async with pool:
            task = asyncio.ensure_future(
                asyncio.gather(
                    *[pool.asubmit(b"ch", {"gate": str(gate), "i": i}) for i in range(20)]
                )
            )
            # While the window is full the loop stays free: this coroutine keeps running.
            for _ in range(50):
                await asyncio.sleep(0.005)  # sleep-ok - pacing the loop, not synchronising
            assert not task.done()
            gate.touch()
            seqs = await asyncio.wait_for(task, 60)
            assert sorted(seqs) == list(range(20))
            await pool.adrain(timeout=60)
            assert await pool.arequest(b"ch", {"i": 99}) == [20, 99]
        return got

    got = asyncio.run(main())
    assert sorted(got) == list(range(20)) and len(got) == 20


def test_submit_chunk_stops_at_a_full_window_and_calls_each_on_done_once(
    tmp_path: Path,
) -> None:
    """submit_chunk never blocks: it takes pairs in order up to the first whose window is full
    and says how many; the rest go in once there is room, every on_done called once, in order."""
    gate = tmp_path / "gate"
    done: list[tuple[int, Any, BaseException | None]] = []

    def on_done_of(i: int) -> Any:
        return lambda value, error: done.append((i, value, error))

    msgs = [cbor2.dumps({"gate": str(gate), "i": i}) for i in range(10)]
    pairs = [(b"ch", m) for m in msgs]
    dones = [on_done_of(i) for i in range(10)]
    with ShardPool(handlers.gated, workers=1, max_inflight=4, batch_size=2) as pool:
        assert pool.submit_chunk(pairs, dones) == 4  # the gate holds the first call
        assert pool.submit_chunk(pairs[4:], dones[4:]) == 0  # still full: nothing taken
        gate.touch()
        sent = 4
        while sent < len(pairs):
            pool.drain(timeout=60)
            sent += pool.submit_chunk(pairs[sent:], dones[sent:])
        pool.drain(timeout=60)
    assert done == [(i, [i, i], None) for i in range(10)]


def test_submit_chunk_raises_for_its_first_pair_and_counts_the_ones_before_a_bad_one() -> None:
    def ignore(value: Any, error: BaseException | None) -> None:
        pass

    with ShardPool(handlers.record, workers=1, max_message_bytes=64) as pool:
        good = cbor2.dumps({"i": 1})
        with pytest.raises(PayloadTooLarge):
            pool.submit_chunk([(b"a", b"x" * 65)], [ignore])
        with pytest.raises(ChannelIdError):
            pool.submit_chunk([(b"", good)], [ignore])
        pairs = [(b"a", good), (b"a", b"x" * 65), (b"a", good)]
        assert pool.submit_chunk(pairs, [ignore] * 3) == 1
        with pytest.raises(PayloadTooLarge):
            pool.submit_chunk(pairs[1:], [ignore] * 2)
        pool.drain(timeout=30)
    with pytest.raises(PoolClosed):
        pool.submit_chunk([(b"a", good)], [ignore])


def test_request_result_and_handler_error_with_remote_traceback() -> None:
    failures: list[HandlerError] = []
    with ShardPool(
        handlers.fail_on, workers=2, failure_policy="skip", on_failure=failures.append
    ) as pool:
        assert pool.call(b"c", {"i": 1}, timeout=30) == 1
        fut = pool.request(b"c", {"i": 2, "fail": True})
        with pytest.raises(HandlerError) as info:
            fut.result(timeout=30)
        # skip: the channel goes on with its next message.
        assert pool.call(b"c", {"i": 3}, timeout=30) == 3
        pool.submit(b"d", {"i": 4, "fail": True})
        pool.drain(timeout=30)
    err = info.value
    assert err.channel_id == b"c" and err.seq == 1 and err.exc_type == "ValueError"
    assert err.policy == "skip"
    assert "refusing message 2" in str(err)
    assert 'raise ValueError(f"refusing message' in err.traceback
    assert "refusing message 2" in str(err.__cause__)
    assert [(f.channel_id, f.seq) for f in failures] == [(b"d", 0)]


def test_class_handler_with_options_and_setup() -> None:
    # One instance per worker, built with handler_options, set up with its worker index.
    with ShardPool("handlers:Counting", workers=2, handler_options={"start": 100}) as pool:
        results = [
            (pool.worker_of(_channel(i)), pool.call(_channel(i), {}, timeout=30)) for i in range(20)
        ]
    counts: dict[int, int] = collections.Counter()
    for owner, (worker, n) in results:
        assert worker == owner  # setup(worker_index) ran in the worker that serves the channel
        counts[worker] += 1
        assert n == 100 + counts[worker]  # the instance's own call count, from start=100
    assert set(counts) == {0, 1}


def test_handler_import_failure_is_reported_not_waited_on() -> None:
    t0 = time.monotonic()
    with pytest.raises(WorkerStartError) as info:
        ShardPool(handlers.BROKEN_IMPORT, workers=2, ready_timeout_s=60)
    assert time.monotonic() - t0 < 30
    assert "ModuleNotFoundError" in str(info.value)
    assert "tests_missing_module_for_shardpool" in str(info.value.__cause__)


def test_bad_input_is_refused_and_affects_nothing_else() -> None:
    got: list[int] = []
    failures: list[HandlerError] = []
    with ShardPool(
        handlers.fail_on,
        workers=2,
        max_message_bytes=1000,
        failure_policy="skip",
        on_result=lambda c, s, v: got.append(v),
        on_failure=failures.append,
    ) as pool:
        pool.submit(b"ok", {"i": 0})
        with pytest.raises(ChannelIdError):
            pool.submit(b"", {"i": -1})
        with pytest.raises(ChannelIdError):
            pool.submit("not-bytes", {"i": -1})  # type: ignore[arg-type]
        with pytest.raises(ChannelIdError):
            pool.submit(b"x" * 65, {"i": -1})
        with pytest.raises(PayloadTooLarge, match="1001 bytes"):
            pool.submit_bytes(b"ok", b"\x00" * 1001)
        with pytest.raises(InputError, match="CBOR"):
            pool.submit(b"ok", {"i": object()})
        # A payload that is not CBOR fails alone, in the worker, under the policy.
        pool.submit_bytes(b"ok", b"\xff\xff")
        pool.submit(b"ok", {"i": 1})
        pool.drain(timeout=30)
        stats = pool.stats()
    assert got == [0, 1]
    assert [(f.channel_id, f.seq) for f in failures] == [(b"ok", 1)]
    assert "CBOR" in failures[0].exc_type or "CBOR" in str(failures[0])
    _check_counters(stats)


def test_closed_pool_refuses_work_and_close_is_idempotent() -> None:
    pool = ShardPool(handlers.record, workers=1)
    pool.submit(b"c", {"i": 0})
    report = pool.close()
    assert report.drained and report.unfinished == []
    assert set(report.exitcodes.values()) == {0}
    with pytest.raises(PoolClosed):
        pool.submit(b"c", {"i": 1})
    assert pool.close().unfinished == []


def test_raw_payload_mode_hands_bytes_over() -> None:
    with ShardPool(handlers.echo_bytes, workers=1, payload="raw") as pool:
        assert pool.call(b"c", b"\xffnot cbor", timeout=30) == cbor2.dumps(b"\xffnot cbor")
        assert pool.request_bytes(b"c", b"\xff\x00").result(timeout=30) == b"\xff\x00"


def test_workers_exit_when_the_front_process_dies(tmp_path: Path) -> None:
    import subprocess
    import sys

    import psutil

    script = (
        f"import os, sys; sys.path.insert(0, {os.path.dirname(handlers.__file__)!r})\n"
        "from shardpool import ShardPool\n"
        "import handlers\n"
        "pool = ShardPool(handlers.record, workers=2, heartbeat_interval_s=0.1,"
        " heartbeat_timeout_s=5)\n"
        "print(' '.join(str(p) for p in pool.worker_pids()), flush=True)\n"
        "os._exit(0)\n"  # the front vanishes without closing anything
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2
    procs = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    gone, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        p.kill()
    assert alive == []


def test_submit_many_bytes_keeps_order_and_stops_at_bad_input() -> None:
    got: dict[bytes, list[int]] = collections.defaultdict(list)
    with ShardPool(
        handlers.record,
        workers=2,
        batch_size=16,
        max_inflight=64,
        on_result=lambda c, s, v: got[c].append(v[1]),
    ) as pool:
        stream = [(_channel(c), cbor2.dumps({"i": i})) for i in range(200) for c in range(20)]
        assert pool.submit_many_bytes(stream) == len(stream)
        with pytest.raises(ChannelIdError):
            pool.submit_many_bytes([(_channel(0), cbor2.dumps({"i": 200})), (b"", b"\x00")])
        pool.drain(timeout=60)
        stats = pool.stats()
    # The pair before the bad one was accepted and processed, in order, after the first 200.
    assert got[_channel(0)] == list(range(201))
    assert all(got[_channel(c)] == list(range(200)) for c in range(1, 20))
    _check_counters(stats)


def test_on_done_outcomes_keep_channel_order_when_values_and_nones_mix() -> None:
    # One acknowledgement carries None completions, values and failures in separate lists; the
    # per-message callbacks must still fire in the channel's order.
    seen: list[int] = []
    lock = threading.Lock()

    def done(i: int) -> Any:
        def cb(value: Any, error: BaseException | None) -> None:
            with lock:
                seen.append(i)

        return cb

    with ShardPool(handlers.none_or_value, workers=1, failure_policy="skip") as pool:
        for i in range(2000):
            pool.submit_bytes(b"one", cbor2.dumps({"i": i}), on_done=done(i))
        pool.drain(timeout=60)
    assert seen == list(range(2000))
