"""Per-channel records are released: channels a handler ends, and stateless channels idle past
``pool.channel_idle_expiry_s``, are forgotten by worker and front together, and come back as fresh
channels without any order violation being counted."""

from __future__ import annotations

import time
from typing import Any

import handlers
import pytest

from shardpool import ShardPool

pytestmark = pytest.mark.multiprocess


def _cid(c: int) -> bytes:
    return b"exp-%05d" % c


def _records(pool: ShardPool) -> tuple[int, int]:
    """(front records, worker records), from one in-band stats round trip."""
    stats = pool.stats()
    return stats["channels"], sum(w["channels"] for w in stats["workers"])


def _await_records(pool: ShardPool, expect: tuple[int, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (got := _records(pool)) != expect:
        assert time.monotonic() < deadline, f"records {got}, expected {expect}"


def _send_round(
    pool: ShardPool, channels: int, per_channel: int, msg: dict[str, Any]
) -> dict[bytes, list[Any]]:
    futs = {
        _cid(c): [pool.request(_cid(c), msg) for _ in range(per_channel)] for c in range(channels)
    }
    return {cid: [f.result(timeout=60) for f in fs] for cid, fs in futs.items()}


def test_idle_stateless_channels_are_forgotten_by_front_and_worker(tmp_path: Any) -> None:
    channels = 2000
    with ShardPool(handlers.lifecycle, workers=2, channel_idle_expiry_s=0.3) as pool:
        first = _send_round(pool, channels, 3, {})
        assert all(r == [[0, None], [1, None], [2, None]] for r in first.values())
        kept = pool.call(b"keeper", {"keep": "open"}, timeout=30)
        assert kept == [0, None]
        # Every stateless channel goes; the one holding state stays, in both places.
        _await_records(pool, (1, 1), timeout=30.0)
        # They come back as fresh channels: seq from 0, no state, nothing counted as a gap.
        again = _send_round(pool, channels, 2, {})
        assert all(r == [[0, None], [1, None]] for r in again.values())
        assert pool.call(b"keeper", {}, timeout=30) == [1, "open"]
        stats = pool.stats()
    assert stats["forgotten"] == channels
    assert sum(w["forgotten"] for w in stats["workers"]) == channels
    for w in stats["workers"]:
        assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0)
    assert stats["submitted"] == stats["acknowledged"] == channels * 5 + 2


def test_a_halted_channel_is_not_forgotten(tmp_path: Any) -> None:
    with ShardPool(handlers.fail_on, workers=1, channel_idle_expiry_s=0.1) as pool:
        pool.submit(b"bad", {"fail": True, "i": 0})
        assert pool.call(b"good", {"i": 1}, timeout=30) == 1
        _await_records(pool, (1, 1), timeout=30.0)  # "good" went, "bad" is held
        assert pool.halted_channels() == {b"bad": 0}
        pool.skip(b"bad")
        _await_records(pool, (0, 0), timeout=30.0)


def test_an_ended_channel_is_dropped_when_its_last_message_is_done(tmp_path: Any) -> None:
    with ShardPool(handlers.lifecycle, workers=2) as pool:  # no idle expiry: end() alone
        assert pool.call(b"chan", {"keep": "a"}, timeout=30) == [0, None]
        assert pool.call(b"chan", {"end": True}, timeout=30) == [1, "a"]
        # Dropped in the worker and at the front before that result was delivered: the next
        # message starts a fresh channel.
        assert pool.call(b"chan", {}, timeout=30) == [0, None]
        assert _records(pool) == (1, 1)
        stats = pool.stats()
    assert stats["forgotten"] == 1
    for w in stats["workers"]:
        assert (w["gaps"], w["duplicates"], w["reorders"]) == (0, 0, 0)
