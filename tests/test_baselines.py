"""The baselines count every message once, split it as the router does, and leave no process behind.

These tests check correctness and cleanup only; they never assert a speed (benchmarks do that,
side by side, in one run).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import cbor2
import psutil
import pytest

from shardpool.bench.baselines import (
    SLOTS,
    BaselineResult,
    array_header,
    make_stream,
    round_trip_result,
    run_bare_zmq,
    run_mp_queue,
    run_one_pass,
    run_per_item,
    run_ping_pong,
)
from shardpool.bench.ceilings import call_round_trip
from shardpool.routing import Router

pytestmark = pytest.mark.multiprocess

MESSAGES = 20_000
CHANNELS = 200

Runner = Callable[..., BaselineResult]

RUNNERS: dict[str, Runner] = {
    "one_pass": run_one_pass,
    "bare_zmq": run_bare_zmq,
    "mp_queue": run_mp_queue,
    "mp_queue_dill": lambda stream, workers, **kw: run_mp_queue(
        stream, workers, queue_impl="multiprocess", **kw
    ),
}


def _our_children() -> set[int]:
    """Live child pids of this process, minus the start methods' shared resource trackers.

    The spawn start method starts one ``resource_tracker`` per library the first time it is used,
    which lives as long as this process and is not a worker of ours (the fork server of the
    pools ends with the last pool).
    """
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(child.cmdline())
            if "resource_tracker" in cmd:
                continue
        except psutil.NoSuchProcess:
            continue
        pids.add(child.pid)
    return pids


@pytest.fixture
def no_leftover_children() -> Iterator[None]:
    """Fail the test if it leaves a child process (other than resource trackers) running."""
    before = _our_children()
    yield
    left = _our_children() - before
    assert not left, f"child processes left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def stream() -> list[tuple[bytes, bytes]]:
    return make_stream(MESSAGES, CHANNELS, seed=1)


def _expected_split(stream: list[tuple[bytes, bytes]], workers: int) -> list[int]:
    router = Router(SLOTS, workers)
    counts = Counter(router.worker_of(cid) for cid, _ in stream)
    return [counts[w] for w in range(workers)]


def test_make_stream_shape() -> None:
    s = make_stream(2_000, 50, payload_size=190, seed=7)
    assert len(s) == 2_000
    assert s == make_stream(2_000, 50, payload_size=190, seed=7)  # reproducible
    cids = {cid for cid, _ in s}
    assert len(cids) == 50 and all(len(c) == 32 for c in cids)
    assert all(abs(len(p) - 190) <= 1 for _, p in s)
    per_channel: dict[bytes, list[int]] = {}
    for cid, payload in s:
        msg = cbor2.loads(payload)
        assert msg["type"] == "update_add_htlc"
        assert len(msg["payment_hash"]) == 32
        per_channel.setdefault(cid, []).append(msg["id"])
    # per-channel ids count up from 0, so an order checker can use them
    assert all(ids == list(range(len(ids))) for ids in per_channel.values())


def test_make_stream_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="messages"):
        make_stream(-1, 1)
    with pytest.raises(ValueError, match="channels"):
        make_stream(1, 0)
    with pytest.raises(ValueError, match="payload_size"):
        make_stream(1, 1, payload_size=-5)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("name", list(RUNNERS))
def test_every_message_processed_on_its_routed_worker(
    name: str, workers: int, stream: list[tuple[bytes, bytes]], no_leftover_children: None
) -> None:
    result = RUNNERS[name](stream, workers, timeout=60.0)
    assert result.name == name
    assert result.workers == workers
    assert result.messages == MESSAGES
    assert sum(result.per_worker) == MESSAGES
    assert result.per_worker == _expected_split(stream, workers)
    assert result.elapsed_s > 0
    assert result.msgs_per_s == pytest.approx(MESSAGES / result.elapsed_s)


def test_bare_zmq_partial_batches_and_empty_stream(no_leftover_children: None) -> None:
    small = make_stream(1_001, 7, seed=3)  # not a multiple of the batch size on any worker
    result = run_bare_zmq(small, 3, batch_size=64, timeout=60.0)
    assert result.per_worker == _expected_split(small, 3)
    empty = run_bare_zmq([], 2, timeout=60.0)
    assert empty.per_worker == [0, 0]


@pytest.mark.parametrize("name", list(RUNNERS))
def test_timeout_raises_and_leaves_no_children(
    name: str, stream: list[tuple[bytes, bytes]], no_leftover_children: None
) -> None:
    with pytest.raises(TimeoutError):
        RUNNERS[name](stream, 2, timeout=0.001)


@pytest.mark.parametrize("name", list(RUNNERS))
def test_dead_worker_raises_and_leaves_no_children(
    name: str, stream: list[tuple[bytes, bytes]], no_leftover_children: None
) -> None:
    # A payload that is not CBOR kills the worker it is routed to (the baselines handle no
    # errors); the front must notice the death instead of waiting for the timeout.
    bad = [*stream[:5_000], (stream[0][0], b"\xff\xff not cbor"), *stream[5_000:]]
    with pytest.raises(RuntimeError, match="exited with code"):
        RUNNERS[name](bad, 2, timeout=60.0)


@pytest.mark.parametrize(
    "kwargs",
    [{"workers": 0}, {"workers": 1, "timeout": 0.0}, {"workers": 1, "timeout": float("nan")}],
)
def test_bad_arguments_raise_value_error(
    kwargs: dict[str, float], no_leftover_children: None
) -> None:
    with pytest.raises(ValueError):
        run_bare_zmq([], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        run_mp_queue([], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        run_bare_zmq([], 1, batch_size=0)
    with pytest.raises(ValueError, match="queue_impl"):
        run_mp_queue([], 1, queue_impl="threading")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ one-pass ceiling


@pytest.mark.parametrize("items", [0, 1, 23, 24, 255, 256, 65_535, 65_536])
def test_array_header_is_cbors_own(items: int) -> None:
    head = array_header(items)
    assert cbor2.dumps([0] * items)[: len(head)] == head
    with pytest.raises(ValueError):
        array_header(-1)


def test_one_pass_frame_decodes_in_one_loads_to_the_messages_themselves() -> None:
    # The layout the one-pass front builds: array header + encoded ids + payloads inserted raw.
    s = make_stream(300, 5, seed=2)
    frame = array_header(2 * len(s)) + b"".join(cbor2.dumps(c) + p for c, p in s)
    flat = cbor2.loads(frame)
    assert flat[0::2] == [c for c, _ in s]
    assert flat[1::2] == [cbor2.loads(p) for _, p in s]  # dicts, not byte strings


def test_per_item_is_the_bare_harness_under_its_clearer_name() -> None:
    assert run_bare_zmq is run_per_item


@pytest.mark.parametrize("workers", [1, 2])
def test_one_pass_dicts_counts_every_message_on_its_routed_worker(
    workers: int, stream: list[tuple[bytes, bytes]], no_leftover_children: None
) -> None:
    decoded = [(cid, cbor2.loads(p)) for cid, p in stream]
    result = run_one_pass(decoded, workers, timeout=60.0, dicts=True)
    assert result.name == "one_pass_dicts"
    assert result.messages == MESSAGES and result.workers == workers
    assert result.per_worker == _expected_split(stream, workers)
    assert result.elapsed_s > 0


def test_one_pass_partial_batches_and_empty_stream(no_leftover_children: None) -> None:
    small = make_stream(1_001, 7, seed=3)  # not a multiple of the batch size on any worker
    assert run_one_pass(small, 3, batch_size=64, timeout=60.0).per_worker == _expected_split(
        small, 3)
    assert run_one_pass([], 2, timeout=60.0).per_worker == [0, 0]
    with pytest.raises(ValueError, match="batch_size"):
        run_one_pass([], 1, batch_size=0)


# ------------------------------------------------------------------------------ round trips


def test_ping_pong_reports_ordered_percentiles(no_leftover_children: None) -> None:
    rt = run_ping_pong(200, timeout=30.0, warmup=10)
    assert rt.name == "ping_pong" and rt.rounds == 200
    assert 0 < rt.p50_us <= rt.p99_us <= rt.max_us


def test_ping_pong_timeout_raises_and_leaves_no_children(no_leftover_children: None) -> None:
    with pytest.raises(TimeoutError):
        run_ping_pong(100_000, timeout=0.001)


@pytest.mark.parametrize("kwargs", [{"rounds": 0}, {"rounds": 1, "timeout": 0.0},
                                    {"rounds": 1, "warmup": -1}])
def test_ping_pong_bad_arguments(kwargs: dict[str, float], no_leftover_children: None) -> None:
    with pytest.raises(ValueError):
        run_ping_pong(**kwargs)  # type: ignore[arg-type]


def test_round_trip_result_nearest_rank() -> None:
    rt = round_trip_result("x", [k * 1000 for k in range(100, 0, -1)])  # 1..100 us, unsorted
    assert (rt.rounds, rt.p50_us, rt.p99_us, rt.max_us) == (100, 50.0, 99.0, 100.0)
    with pytest.raises(ValueError):
        round_trip_result("x", [])


def test_pool_call_round_trip(no_leftover_children: None) -> None:
    rt = call_round_trip(50, timeout=30.0, warmup=5)
    assert rt.name == "pool_call" and rt.rounds == 50
    assert 0 < rt.p50_us <= rt.p99_us <= rt.max_us
