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
    make_stream,
    run_bare_zmq,
    run_mp_queue,
)
from shardpool.routing import Router

pytestmark = pytest.mark.multiprocess

MESSAGES = 20_000
CHANNELS = 200

Runner = Callable[..., BaselineResult]

RUNNERS: dict[str, Runner] = {
    "bare_zmq": run_bare_zmq,
    "mp_queue": run_mp_queue,
    "mp_queue_dill": lambda stream, workers, **kw: run_mp_queue(
        stream, workers, queue_impl="multiprocess", **kw
    ),
}


def _our_children() -> set[int]:
    """Live child pids of this process, minus the start methods' shared resource trackers.

    The spawn start method starts one ``resource_tracker`` per library the first time it is used;
    it belongs to the library, lives as long as this process and is not a worker of ours.
    """
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            if any("resource_tracker" in part for part in child.cmdline()):
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
