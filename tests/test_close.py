"""Closing a pool with work still queued: every accepted message ends in exactly one outcome.

finished (its handler ran it and it was acknowledged), unfinished (never handed to a handler:
safe to submit again) or in doubt (a handler may have run it). A durable ledger written by the
handler itself (``handlers.Ledger``) is the ground truth the report is checked against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import handlers
import pytest

from shardpool import InDoubt, PoolClosed, ShardPool

pytestmark = pytest.mark.multiprocess


def _cid(c: int) -> bytes:
    return b"close-%04d" % c


def _submit_all(pool: ShardPool, channels: int, per_channel: int, outcomes: dict[Any, Any]) -> None:
    for i in range(per_channel):
        for c in range(channels):
            key = (_cid(c), i)

            def done(value: Any, error: BaseException | None, key: Any = key) -> None:
                outcomes[key] = error if error is not None else "ok"

            pool.submit_bytes(_cid(c), handlers_payload(c, i), on_done=done)


def handlers_payload(c: int, i: int) -> bytes:
    import cbor2

    return cbor2.dumps({"v": c * 1000 + i})


def _applied(ledger_dir: Path) -> dict[bytes, list[int]]:
    out: dict[bytes, list[int]] = {}
    for key, lines in handlers.read_ledgers(str(ledger_dir)).items():
        assert [x for x in lines if x[0] not in "A"] == [], f"{key}: {lines}"  # no replays here
        out[bytes.fromhex(key)] = [x[1] for x in lines]
    return out


def test_close_never_hands_back_what_the_handler_applied(tmp_path: Path) -> None:
    """3,000 messages of a 20 ms handler and close(timeout=1.5): most cannot finish. The report
    must match the ledger exactly: nothing applied is listed unfinished, nothing unfinished was
    applied, each message has one outcome, and a 20 ms call always fits in the stop grace."""
    channels, per_channel = 300, 10
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    outcomes: dict[Any, Any] = {}
    pool = ShardPool(
        "handlers:Ledger",
        handler_options={"dir": str(ledger), "ms": 20},
        workers=2,
        max_inflight=4096,
    )
    try:
        _submit_all(pool, channels, per_channel, outcomes)
    finally:
        report = pool.close(timeout=1.5)
    applied = _applied(ledger)
    unfinished = {(c, s) for c, s, _ in report.unfinished}
    assert report.in_doubt == []
    assert len(unfinished) == len(report.unfinished)  # each listed once
    everything = {(_cid(c), i) for c in range(channels) for i in range(per_channel)}
    done = {(c, s) for c, seqs in applied.items() for s in seqs}
    assert done and unfinished  # the deadline really cut the work short
    assert done.isdisjoint(unfinished)
    assert done | unfinished == everything
    for c in range(channels):
        # Per channel: a prefix applied, in order, then the rest handed back, in order.
        mine = [s for cid, s, _ in report.unfinished if cid == _cid(c)]
        ran = applied.get(_cid(c), [])
        assert ran == list(range(len(ran))) and mine == list(range(len(ran), per_channel))
    # Every on_done had exactly its outcome: ok for the applied, PoolClosed for the rest.
    assert set(outcomes) == everything
    for key in done:
        assert outcomes[key] == "ok"
    for key in unfinished:
        assert type(outcomes[key]) is PoolClosed
    assert report.exitcodes == {0: 0, 1: 0}  # both workers stopped cleanly (BYE, exit 0)
    assert not report.drained


def test_a_call_longer_than_the_deadline_is_in_doubt_and_only_it(tmp_path: Path) -> None:
    """A sync handler stuck in a long call cannot stop: it is killed at the deadline. Its
    message is in doubt (it may have been applied); every message it was sent after that one
    never ran: unfinished. The other worker stopped cleanly with nothing left."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    outcomes: dict[Any, Any] = {}
    with ShardPool(handlers.sleepy, workers=2) as pool:
        slow = _cid(0)
        w = pool.worker_of(slow)
        fut = pool.request(slow, {"ms": 60_000})
        behind = [pool.request(slow, {"ms": 0}) for _ in range(3)]
        others = [c for c in (_cid(i) for i in range(1, 200)) if pool.worker_of(c) != w][:5]
        assert [pool.call(c, {"ms": 0}, timeout=30) for c in others] == [0] * 5
        report = pool.close(timeout=1.0)
    assert [(c, s) for c, s, _ in report.in_doubt] == [(slow, 0)]
    assert [(c, s) for c, s, _ in report.unfinished] == [(slow, 1), (slow, 2), (slow, 3)]
    with pytest.raises(InDoubt):
        fut.result(timeout=0)
    for f in behind:
        with pytest.raises(PoolClosed) as err:
            f.result(timeout=0)
        assert not isinstance(err.value, InDoubt)
    assert report.exitcodes[w] == -9 and report.exitcodes[1 - w] == 0
    del outcomes
