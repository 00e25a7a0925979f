"""Front forwarding through a real pool (1 worker, started once per module): ``submit_bytes`` of
4,096 pre-encoded messages, then ``drain`` — the bytes fast path end to end, including the worker
and the acknowledgements coming back. Divide by 4,096 for one message."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from shardpool import ShardPool
from shardpool.bench.handlers import TRIVIAL_HANDLER

N = 4096


@pytest.fixture(scope="module", params=["raw", "cbor"])
def pool(request: pytest.FixtureRequest) -> Iterator[ShardPool]:
    """A 1-worker pool with the trivial handler; ``raw`` hands payload bytes over undecoded."""
    p = ShardPool(TRIVIAL_HANDLER, workers=1, payload=request.param)
    try:
        yield p
    finally:
        p.close(timeout=10.0)


def test_submit_bytes_and_drain_4096(benchmark: Any, pool: ShardPool,
                                     stream: list[tuple[bytes, bytes]]) -> None:
    submit = pool.submit_bytes

    def forward() -> None:
        for cid, payload in stream:
            submit(cid, payload)
        pool.drain(30.0)

    benchmark.extra_info["messages"] = N
    benchmark.pedantic(forward, rounds=30, warmup_rounds=2)
    workers = pool.stats()["workers"]
    assert all(w["gaps"] == w["reorders"] == w["duplicates"] == 0 for w in workers)


def test_submit_only_4096(benchmark: Any, pool: ShardPool,
                          stream: list[tuple[bytes, bytes]]) -> None:
    """The producer's side alone: the drain happens outside the timed call."""
    submit = pool.submit_bytes

    def forward() -> None:
        for cid, payload in stream:
            submit(cid, payload)

    benchmark.extra_info["messages"] = N
    benchmark.pedantic(forward, rounds=30, warmup_rounds=2, teardown=lambda: pool.drain(30.0))
