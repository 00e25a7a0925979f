"""The by-type dispatch baseline (lnd issue 8393) really breaks per-channel order (processes)."""

from __future__ import annotations

import multiprocess
import psutil
import pytest

from shardpool.demo import generate, replay, run_by_type_dispatch

pytestmark = pytest.mark.multiprocess


def _our_children() -> list[psutil.Process]:
    """Live child processes of this test process, minus multiprocess's resource tracker (a shared
    helper that lives as long as the interpreter, by design)."""
    live = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "resource_tracker" in " ".join(child.cmdline()):
                continue
            live.append(child)
        except psutil.NoSuchProcess:
            continue
    return live


def _assert_reaped(pids: list[int]) -> None:
    assert multiprocess.active_children() == []
    lingering = {c.pid for c in _our_children()}
    assert not lingering & set(pids), f"worker processes not reaped: {lingering & set(pids)}"


def test_by_type_dispatch_breaks_a_valid_stream() -> None:
    # 300 channels, 4000 messages: valid when applied in arrival order...
    stream = generate(20, 15, 4_000, 11)
    assert replay(stream)[1] == {}
    # ...but the update worker carries ~2/3 of the traffic at the same per-message cost, so the
    # commitment worker runs ever further ahead: commitment_signed / revoke_and_ack reach the state
    # machine before the updates they cover. Tens of channels per commitment batch are hit; zero
    # violations would need every type-worker to keep exact arrival order across queues.
    result = run_by_type_dispatch(stream, delay_s=0.0002, timeout=60.0, seed=11)
    _assert_reaped(result["worker_pids"])
    assert result["exitcodes"] == [0, 0, 0]
    assert result["messages"] == 4_000 and result["channels"] == len({c for c, _ in stream})
    assert result["reordered_messages"] > 0
    assert result["violations"] > 0
    assert result["force_closed_channels"] > result["channels"] // 4
    assert sum(result["violations_by_code"].values()) == result["violations"]
    assert sum(result["root_causes"].values()) == result["force_closed_channels"]
    assert set(result["root_causes"]) & {
        "empty_commitment",
        "commitment_mismatch",
        "revoke_without_commitment",
        "uncommitted_htlc",
    }
    assert result["elapsed_s"] < 60.0


def test_by_type_dispatch_reaps_workers_on_timeout() -> None:
    # Far too short for spawned interpreters to report ready: the error path must still reap them.
    before = {c.pid for c in _our_children()}
    with pytest.raises(TimeoutError):
        run_by_type_dispatch(generate(2, 2, 50, 1), timeout=0.05)
    assert multiprocess.active_children() == []
    assert {c.pid for c in _our_children()} <= before


def test_by_type_dispatch_rejects_bad_arguments() -> None:
    for kwargs in ({"delay_s": -1.0}, {"timeout": 0.0}, {"jitter": 2.0}):
        with pytest.raises(ValueError):
            run_by_type_dispatch([], **kwargs)
