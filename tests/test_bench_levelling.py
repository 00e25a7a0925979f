"""``shardpool bench --workload levelling``: the pure pieces on fixed inputs (expected values worked
out by hand here, not by the code under test), then one short real run of each phase checking
what must hold whatever the machine — no message lost, none out of order — never a speed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import xxhash

from shardpool.bench import levelling as lv
from shardpool.bench.options import BenchOptions
from shardpool.bench.report import Progress

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- the pure pieces


def test_zipf_weights_follow_the_law_and_sum_to_one() -> None:
    # n = 3, s = 1: 1, 1/2, 1/3 over their sum 11/6.
    assert lv.zipf_weights(3, 1.0) == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    # s = 0: every channel alike.
    assert lv.zipf_weights(4, 0.0) == pytest.approx([0.25] * 4)
    w = lv.zipf_weights(1000, 1.1)
    assert math.fsum(w) == pytest.approx(1.0)
    assert w[9] / w[0] == pytest.approx(10 ** -1.1)
    assert all(a > b for a, b in zip(w, w[1:], strict=False))


def test_ideal_max_over_mean_is_bounded_by_the_hottest_channel() -> None:
    assert lv.ideal_max_over_mean([0.5, 0.25, 0.25], 4) == 2.0  # 4 × 0.5: one channel, one worker
    assert lv.ideal_max_over_mean([0.5, 0.25, 0.25], 1) == 1.0
    assert lv.ideal_max_over_mean([0.1] * 10, 4) == 1.0  # 0.4 < 1: a placement can be even
    assert lv.ideal_max_over_mean([0.3, 0.7], 3) == 2.1


def test_static_shares_follow_the_initial_slot_table() -> None:
    cids = [b"chan-%03d" % i for i in range(50)]
    weights = [1.0 / 50] * 50
    expected = [0.0, 0.0, 0.0]
    for cid in cids:  # slot = xxh64(id) % slots, worker = slot % workers (round robin)
        expected[xxhash.xxh64_intdigest(cid) % 64 % 3] += 1.0 / 50
    assert lv.static_shares(cids, weights, 3, 64) == pytest.approx(expected)
    assert math.fsum(lv.static_shares(cids, weights, 3, 64)) == pytest.approx(1.0)


def test_max_over_mean() -> None:
    assert lv.max_over_mean([1.0, 1.0, 2.0]) == 1.5
    assert lv.max_over_mean([0.0, 0.0]) is None
    assert lv.max_over_mean([]) is None


def test_settled_at_is_when_the_smoothed_series_reached_its_final_level() -> None:
    series = [(0.5, 1.5), (1.0, 1.4), (1.5, 1.2), (2.0, 1.05), (2.5, 1.02), (3.0, 1.03),
              (3.5, 1.02)]
    # Final level: median of the last third (2 points) = 1.025; the rolling medians of three are
    # 1.45, 1.4, 1.2, 1.05, 1.03, 1.02, 1.025: within 0.05 of 1.025 from t = 2.0 on.
    assert lv.settled_at(series) == 2.0
    assert lv.settled_at([(t / 2, 1.1) for t in range(1, 8)]) == 0.5  # flat: settled at once
    assert lv.settled_at(series[:2]) is None


def test_hot_rate_gives_the_hot_worker_its_share_of_one_workers_capacity() -> None:
    # 2 workers: the hot worker has 40% + half of the other 60% = 70% of the traffic; one
    # worker's capacity is 10,000 / 2; 80% of it over 0.7.
    assert lv.hot_rate(10_000, 2, 2, 0.4, 0.8, 0.5) == pytest.approx(0.8 * 5_000 / 0.7)
    # 4 workers on 2 CPUs: a lone busy worker still gets a CPU (÷ 2, not ÷ 4); 40% + 15%.
    assert lv.hot_rate(10_000, 4, 2, 0.4, 0.8, 0.25) == pytest.approx(0.8 * 5_000 / 0.55)
    # Never over MAX_OFFERED of the whole capacity.
    assert lv.hot_rate(10_000, 2, 16, 0.4, 1.0, 0.0) == pytest.approx(lv.MAX_OFFERED * 10_000)


def test_calibrated_rate_scales_to_the_target_within_what_the_machine_has_free() -> None:
    # Busy 0.4 at 1,000 msgs/s, target 0.8: twice the rate; the machine would allow 0.85 × 2 / 0.5.
    assert lv.calibrated_rate(1000, 0.4, 0.8, 0.5, 0.0, 2) == (pytest.approx(2000), "load")
    # Other work takes 1 of 2 CPUs and the bench already used 1: 0.85 × 1 / 1.
    assert lv.calibrated_rate(1000, 0.4, 0.8, 1.0, 1.0, 2) == (pytest.approx(850), "machine")
    # The scale stays within 1/4 .. 4.
    assert lv.calibrated_rate(1000, 0.01, 0.8, 0.01, 0.0, 16)[0] == pytest.approx(4000)
    assert lv.calibrated_rate(1000, 0.4, 0.8, 5.0, 1.9, 2)[0] == pytest.approx(250)


def test_a_before_window_whose_queue_grew_counts_as_saturated() -> None:
    assert lv.saturated([1_000.0, 50_000.0])  # 50× and over the 20 ms floor
    assert not lv.saturated([1_000.0, 2_500.0])  # under 3×
    assert not lv.saturated([5_000.0, 19_000.0])  # over 3× but under the floor
    assert not lv.saturated([None, 50_000.0])


def _scaling_run(steady: float, late: float = 1.0) -> dict[str, Any]:
    return {"steady_msgs_per_s": steady, "msgs_per_s": steady * 0.9,
            "cpu_max_over_mean_late": late, "moves_committed": 0, "slots_moved": 0,
            "worker_cpu_us_per_message": 200.0, "machine": {"other_cpus": 0.0}}


def test_efficiency_points_and_targets_on_fixed_runs() -> None:
    runs = {
        1: {"off": [_scaling_run(100), _scaling_run(110)]},
        4: {"off": [_scaling_run(300, 1.3), _scaling_run(330, 1.3)],
            "auto": [_scaling_run(360, 1.05), _scaling_run(396, 1.05)]},
    }
    points = {(p["workers"], p["mode"]): p for p in lv.efficiency_points(runs)}
    assert points[1, "off"]["efficiency"] == 1.0
    off, auto = points[4, "off"], points[4, "auto"]
    # Baseline median 105; off: median 315 → 3.0× → 0.75; per repeat 300/400 and 330/440.
    assert (off["steady_msgs_per_s"], off["speedup"], off["efficiency"]) == (315.0, 3.0, 0.75)
    assert off["efficiency_paired"] == 0.75
    # auto: median 378 → 3.6× → 0.9; per repeat 360/400 and 396/440.
    assert (auto["speedup"], auto["efficiency"], auto["efficiency_paired"]) == (3.6, 0.9, 0.9)
    assert auto["cpu_max_over_mean_late"] == 1.05
    targets = lv.efficiency_targets(list(points.values()))
    assert targets["efficiency_off_up_to_15"] == {"target": 0.85, "value": 0.75,
                                                  "at_workers": 4, "met": False}
    assert targets["efficiency_auto_up_to_15"]["met"] is True
    text = lv.format_scaling({"options": {"zipf_s": 0.8, "channels": 10_000,
                                          "message_cost_us": 200.0, "run_s": 8.0, "repeats": 2},
                              "machine": {"cpus": 16, "python": "3.12.3"},
                              "points": list(points.values()), "targets": targets,
                              "complete": True})
    assert "efficiency_off_up_to_15: 0.75 at 4 workers (target >= 0.85) MISSED" in text
    assert "efficiency_auto_up_to_15: 0.9 at 4 workers (target >= 0.85) met" in text
    assert "cut short" not in text


def _zipf_trace() -> lv._ZipfTrace:
    """Six samples: the first three uneven (1.0 and 0.5 busy: max/mean 4/3), the last three
    even; slot 5 moved 0 → 1 → 0 (back), slot 7 moved 0 → 1."""
    trace = lv._ZipfTrace()
    trace.t = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    trace.sent = [1000, 2000, 3000, 4000, 5000, 6000]
    trace.busy = [[1.0, 0.5]] * 3 + [[0.75, 0.75]] * 3
    trace.front_load = [[0.5, 0.5]] * 6
    trace.committed = [0, 1, 1, 2, 2, 2]
    trace.slot_moves = [(1.0, 5, 0, 1), (2.0, 5, 1, 0), (2.0, 7, 0, 1)]
    return trace


def test_zipf_summary_and_report_text_on_a_fixed_trace() -> None:
    opts = BenchOptions(workload="levelling", workers=2, channels=100, repeats=1, run_s=3.0)
    order = {"messages": 6000, "violations": 0, "failures": 0,
             "sequence_errors": {"gaps": 0, "duplicates": 0, "reorders": 0},
             "channels_checked": 100, "channels_mismatched": 0, "first_problems": []}
    moves = {"committed": 2, "aborted": 0, "pause_p50_s": 0.002, "pause_p99_s": 0.004}
    run = lv._zipf_summary(opts, 2, "auto", _zipf_trace(), 6000, 3.0, 1.5, moves, order)
    # early: samples up to t[2] = 1.5 (max/mean 4/3); late: from t[6 - 2] = 2.5 (1.0).
    assert run["cpu_max_over_mean_early"] == pytest.approx(4 / 3, abs=1e-4)
    assert run["cpu_max_over_mean_late"] == 1.0
    assert run["steady_msgs_per_s"] == 2000.0  # (6000 - 4000) / (3.0 - 2.0)
    assert run["msgs_per_s"] == 2000.0 and run["worker_cpu_us_per_message"] == 250.0
    assert (run["slots_moved"], run["slot_moves"], run["slots_moved_back"]) == (2, 3, 1)
    assert run["last_move_s"] == 2.0 and run["worker_utilisation"] == 0.25
    off = {**run, "mode": "off", "msgs_per_s": 1000.0, "steady_msgs_per_s": 1000.0,
           "cpu_max_over_mean_late": 1.25}
    section = lv._zipf_section(opts, 2, lv.zipf_weights(100, 1.1), [0.6, 0.4],
                               {"off": [off], "auto": [run]})
    assert section["static_max_over_mean"] == 1.2
    assert section["ratios"]["msgs_per_s_auto_over_off"] == 2.0
    assert section["ratios"]["cpu_max_over_mean_late_auto_over_off"] == 0.8
    report = {"options": {**vars(opts)}, "machine": {"cpus": 2, "python": "3.x",
                                                     "platform": "test"},
              "zipf": section, "ok": True, "elapsed_s": 12.0}
    report["options"]["workers"] = 2
    text = lv.format_levelling_report(report)
    assert "static hash max/mean 1.2" in text
    assert "1.333 → 1.000" in text and "1.333 → 1.250" in text
    assert "auto ÷ off: msgs/s 2.0 (paired 2.0)" in text
    assert "late CPU max/mean 0.8 (paired 0.8)" in text
    assert "2.0/4.0" in text  # pause p50/p99 in ms
    assert "order: 2 runs, 12,000 messages, 0 out of order" in text
    assert "verdict: OK" in text


def test_pause_summary_percentiles_on_fixed_moves() -> None:
    # 100 committed moves of each size pausing 1..100 ms: nearest-rank p50 = 50, p99 = 99.
    moves = [{"size": size, "slots": size, "state": "committed", "pause_s": k / 1000,
              "call_s": (k + 1) / 1000, "held": 3} for size in lv.MOVE_SIZES
             for k in range(1, 101)]
    moves.append({"size": 64, "slots": 64, "state": "refused", "error": "MoveRefused: x",
                  "call_s": 0.001})
    timed = lv._Timed(0.0)
    order = {"messages": 0}
    p = lv._pause_summary(100.0, 2, moves, {"pause_p50_s": None, "pause_p99_s": None}, order,
                          timed)
    one, many = p["by_size"]["1"], p["by_size"]["64"]
    assert (one["pause_p50_ms"], one["pause_p99_ms"], one["pause_max_ms"]) == (50.0, 99.0, 100.0)
    assert (one["call_p50_ms"], one["call_p99_ms"]) == (51.0, 100.0)
    assert (many["moves"], many["committed"], many["not_committed"]) == (101, 100,
                                                                          ["MoveRefused: x"])
    text = "\n".join(lv._pause_lines({**p, "busy_during_moves": [0.5, 0.5],
                                      "rate_limited_by": "load"}))
    assert " 1 slot(s): 100/100 committed, pause p50 50.00 ms p99 99.00 ms" in text
    assert "64 slot(s): 100/101 committed" in text


def test_phases_option_is_checked() -> None:
    BenchOptions(workload="levelling", phases="pause,zipf").check()
    assert BenchOptions(phases="pause, zipf").phase_list == ["zipf", "pause"]
    with pytest.raises(ValueError, match="phases"):
        BenchOptions(phases="zipf,warp").check()
    with pytest.raises(ValueError, match="phases"):
        BenchOptions(phases=" , ").check()


# ------------------------------------------------------------------------------ short real runs


def _ok(order: dict[str, Any], channels: int) -> None:
    """Nothing lost, nothing out of order: every channel's last message number is the count
    sent to it, and every check along the way saw none out of place."""
    assert order["violations"] == 0 and order["failures"] == 0, order["first_problems"]
    assert order["sequence_errors"] == {"gaps": 0, "duplicates": 0, "reorders": 0}
    assert order["channels_checked"] == channels and order["channels_mismatched"] == 0
    assert order["messages"] > 0


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter fixed stages, so that a real run of a phase takes seconds."""
    for name, value in (("CAPACITY_S", 1.0), ("PROBE_S", 0.5), ("_HOT_AFTER_S", 0.5),
                        ("_SETTLE_S", 0.3), ("SAMPLE_S", 0.25)):
        monkeypatch.setattr(lv, name, value)


def _opts(phases: str) -> BenchOptions:
    return BenchOptions(workload="levelling", workers=2, channels=60, repeats=1, run_s=1.0,
                        phases=phases, pause_moves=2, message_cost_us=50.0, timeout_s=30.0,
                        rebalance_interval_s=0.2, rebalance_grace_s=0.5)


@pytest.mark.multiprocess
@pytest.mark.usefixtures("quick")
def test_a_real_zipf_phase_keeps_every_message_in_order() -> None:
    report = lv.run_levelling_bench(_opts("zipf"), Progress(enabled=False))
    assert report["ok"] is True and set(report) >= {"zipf", "machine", "options"}
    z = report["zipf"]
    for mode in ("off", "auto"):
        (run,) = z["runs"][mode]
        _ok(run["order"], 60)
        assert run["order"]["messages"] == run["messages"]
        assert run["mode"] == mode and run["moves_aborted"] == 0
    assert z["runs"]["off"][0]["moves_committed"] == 0  # off measures, never moves
    assert "verdict: OK" in lv.format_levelling_report(report)


@pytest.mark.multiprocess
@pytest.mark.usefixtures("quick")
def test_a_real_hot_phase_pins_the_channel_and_keeps_every_message_in_order() -> None:
    report = lv.run_levelling_bench(_opts("hot"), Progress(enabled=False))
    assert report["ok"] is True
    h = report["hot"]
    for run in h["capacity_runs"]:
        _ok(run["order"], 60)
    (pin,) = h["runs"]["pin"]
    (auto,) = h["runs"]["auto"]
    for run in (pin, auto):
        _ok(run["order"], 60)
        assert run["rate"] == pin["rate"]  # the auto run goes at the rate the pin run found
    assert pin["pinned"] and pin["error"] is None
    assert pin["hot_worker_after"] != pin["hot_worker_before"]
    assert pin["groups"]["neighbours"]["before"]["count"] > 0
    if auto["pinned"]:  # the balancer's timing is not asserted, only where the channel went
        assert auto["hot_worker_after"] != auto["hot_worker_before"]
    assert "neighbours' p99 before ÷ after" in lv.format_levelling_report(report)


@pytest.mark.multiprocess
@pytest.mark.usefixtures("quick")
def test_a_real_pause_phase_commits_every_move_and_keeps_every_message_in_order() -> None:
    report = lv.run_levelling_bench(_opts("pause"), Progress(enabled=False))
    assert report["ok"] is True
    p = report["pause"]
    _ok(p["order"], 60)
    _ok(p["capacity"]["order"], 60)
    for size in ("1", "64"):
        s = p["by_size"][size]
        assert s["moves"] == 2 and s["committed"] == 2, s["not_committed"]
        assert s["pause_p50_ms"] is not None and s["pause_p50_ms"] <= s["pause_p99_ms"]
    assert p["by_size"]["1"]["slots_per_move"] == 1
    assert "slot(s): 2/2 committed" in lv.format_levelling_report(report)


# --------------------------------------------------------------------------- command line, script


def test_the_cli_refuses_an_unknown_phase() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "shardpool", "bench", "--workload", "levelling", "--phases",
         "zipf,warp"], capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 2 and "phases must be" in proc.stderr


@pytest.mark.multiprocess
def test_the_cli_runs_the_levelling_workload_and_prints_json() -> None:
    cmd = [sys.executable, "-m", "shardpool", "bench", "--json", "--workload", "levelling",
           "--workers", "2", "--channels", "40", "--phases", "zipf", "--run-seconds", "1",
           "--repeats", "1", "--message-cost-us", "50", "--timeout", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zipf repeat 1/1" in proc.stderr  # progress on stderr, the report alone on stdout
    report = json.loads(proc.stdout)
    assert report["workload"] == "levelling" and report["ok"] is True
    assert set(report["zipf"]["runs"]) == {"off", "auto"}


@pytest.mark.multiprocess
def test_the_scaling_script_writes_points_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "levelling-scaling.json"
    cmd = [sys.executable, "scripts/levelling_scaling.py", "--workers", "2", "--run-seconds",
           "1", "--repeats", "1", "--channels", "100", "--message-cost-us", "50", "--timeout",
           "30", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] is True and doc["options"]["workers"] == [1, 2]
    assert {(p["workers"], p["mode"]) for p in doc["points"]} == {(1, "off"), (2, "off"),
                                                                  (2, "auto")}
    for runs in doc["runs"].values():
        for mode_runs in runs.values():
            for run in mode_runs:
                _ok(run["order"], 100)
    assert set(doc["targets"]) == {"efficiency_off_up_to_15", "efficiency_auto_up_to_15"}
    assert "efficiency_auto_up_to_15" in proc.stdout
