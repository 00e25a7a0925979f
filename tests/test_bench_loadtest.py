"""The load-test building blocks in-process (no worker processes): options, percentiles, the
digest probe and the text report."""

from __future__ import annotations

import argparse
import subprocess
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from shardpool.bench.handlers import (
    PROBE_TYPE,
    AsyncDigestLightningHandler,
    DigestLightningHandler,
    calibrate_cost,
    state_digest,
)
from shardpool.bench.options import BenchOptions, add_arguments, from_arguments
from shardpool.bench.report import format_report, latency_summary
from shardpool.demo import generate, replay
from shardpool.demo.channel import ChannelState


def test_latency_summary_uses_nearest_rank_percentiles_in_microseconds() -> None:
    samples = [i * 1000 for i in range(1, 1001)]  # 1..1000 µs, shuffled order must not matter
    samples.reverse()
    s = latency_summary(samples)
    assert s == {"count": 1000, "p50": 500.0, "p90": 900.0, "p99": 990.0, "p99.9": 999.0,
                 "max": 1000.0}
    assert latency_summary([]) == {"count": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0,
                                   "p99.9": 0.0, "max": 0.0}
    one = latency_summary([2500])
    assert one["p50"] == one["p99.9"] == one["max"] == 2.5


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"workers": 0}, "workers"),
        ({"messages": 0}, "messages"),
        ({"repeats": 0}, "repeats"),
        ({"peers": 0}, "peers"),
        ({"mode": "sideways"}, "mode"),
        ({"rate": 0.0}, "rate"),
        ({"cpu_cost_us": -1.0}, "cpu_cost_us"),
        ({"latency_load": 0.0}, "latency_load"),
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"close_fraction": 1.5}, "close_fraction"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"config": 3}, "config must be a str"),
        ({"baselines": "no"}, "baselines must be a bool"),
    ],
)
def test_options_out_of_range_are_named(change: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        BenchOptions(**change).check()


def test_flags_come_from_the_options_with_their_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_arguments(parser.parse_args([])) == BenchOptions()
    opts = from_arguments(parser.parse_args(
        ["--timeout", "5", "--no-baselines", "--mode", "open", "--peers", "3", "--workers", "1"]
    ))
    assert opts == BenchOptions(timeout_s=5.0, baselines=False, mode="open", peers=3, workers=1)
    text = " ".join(parser.format_help().split())
    assert "--messages N" in text and "(default: 200,000;" in text
    assert "--workload {synthetic,lightning-real,levelling}" in text
    assert "(default: the CPUs available, at most the physical cores)" in text
    assert "--close-fraction" not in text  # library-only options stay off the command line
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "sideways"])


def test_default_options_are_valid_and_spread_channels_over_peers() -> None:
    opts = BenchOptions()
    opts.check()
    assert (opts.n_peers, opts.channels_per_peer) == (200, 10)
    odd = BenchOptions(channels=25, peers=4)
    assert odd.n_peers * odd.channels_per_peer >= 25
    real = BenchOptions(workload="lightning-real")
    assert (real.n_messages, real.n_channels, real.n_peers) == (20_000, 300, 30)
    assert BenchOptions(workload="lightning-real", messages=5).n_messages == 5
    with pytest.raises(ValueError, match="workload must be one of"):
        BenchOptions(workload="fake").check()  # type: ignore[arg-type]


def test_state_digest_tells_apart_a_reordered_channel() -> None:
    stream = generate(1, 1, 200, 3)
    in_order, _ = replay(stream)
    (cid, state), = in_order.items()
    assert state_digest(state) == state_digest(replay(stream)[0][cid])  # deterministic
    # Swap two neighbouring messages that are each valid in either order somewhere in the
    # stream: the trace in the digest still sees the reorder.
    for i in range(len(stream) - 1):
        swapped = stream[:i] + [stream[i + 1], stream[i]] + stream[i + 2 :]
        states, violations = replay(swapped)
        if stream[i][1]["type"] != stream[i + 1][1]["type"]:
            assert violations or state_digest(states[cid]) != state_digest(state)
    assert state_digest(None) == "-"


def test_probe_returns_the_digest_without_applying_anything() -> None:
    handler = DigestLightningHandler()
    channel = SimpleNamespace(id=b"c" * 32, state=None)
    assert handler.handle(channel, 0, {"type": PROBE_TYPE}, False) == "-"
    stream = generate(1, 1, 50, 9)
    for seq, (_, msg) in enumerate(stream):
        assert handler.handle(channel, seq, msg, False) is None
    before = state_digest(channel.state)
    assert handler.handle(channel, 50, {"type": PROBE_TYPE}, False) == before
    assert handler.handle(channel, 51, {"type": PROBE_TYPE}, False) == before
    assert isinstance(channel.state, ChannelState) and channel.state.applied == 50
    ref, _ = replay(stream)
    assert before == state_digest(ref[stream[0][0]])


def test_async_handler_rejects_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay_s"):
        AsyncDigestLightningHandler(delay_s=-1.0)


def _report() -> dict[str, Any]:
    run = {"msgs_per_s": 1000.0, "elapsed_s": 1.0, "messages": 1000, "target_rate": None,
           "per_worker": [500, 500], "violations": 0, "force_closed_channels": 0, "failures": 0,
           "sequence_errors": {"gaps": 0, "duplicates": 0, "reorders": 0},
           "digest_mismatches": 0}
    lat = {"count": 10, "p50": 1.0, "p90": 2.0, "p99": 3.0, "p99.9": 4.0, "max": 5.0}
    return {
        "options": BenchOptions().__dict__ | {"repeats": 1},
        "machine": {"cpus": 2, "python": "3.11", "platform": "Linux"},
        "traffic": {"messages": 1000, "channel_ids": 20, "peers": 2, "seed": 1,
                    "payload_bytes_avg": 100.0},
        "shardpool": {
            "handler": "LightningHandler(cpu_cost_us=0)", "msgs_per_s": 1000.0, "runs": [run],
            "balance": {"shares": [0.5, 0.5], "max_over_mean": 1.0}, "hot_channels": [],
            "violations": 0, "force_closed_channels": 0, "failures": 0,
            "sequence_errors": {"gaps": 0, "duplicates": 0, "reorders": 0},
            "digest": {"channels_checked": 20, "mismatches": 0},
            "latency": {"rate": 300.0, "us": lat}, "latency_saturated": None,
        },
        "baselines": {}, "ratios": {}, "ok": True, "elapsed_s": 1.0,
    }


def test_text_report_without_baselines() -> None:
    text = format_report(_report())
    assert "1,000 messages, 20 channels" in text
    assert "p99.9 4" in text
    assert "verdict: OK" in text
    bad = _report()
    bad["ok"] = False
    assert "verdict: FAILED" in format_report(bad)


def test_bench_rejects_options_out_of_range_before_starting_anything() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shardpool", "bench", "--messages", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "messages must be an integer >= 1" in proc.stderr


def test_fixed_cost_iterations_replace_the_per_worker_calibration() -> None:
    handler = DigestLightningHandler(cpu_cost_us=100.0, cost_iters=7)
    handler.setup(3)
    assert handler._cost_iters == 7 and handler.worker_index == 3
    assert calibrate_cost(0.0) == 0
    assert calibrate_cost(50.0) >= 1
    with pytest.raises(ValueError, match="cost_iters"):
        DigestLightningHandler(cost_iters=0)
