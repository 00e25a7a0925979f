"""``shardpool bench`` end to end, as a user runs it: a subprocess with small arguments. Checks the
report's structure and that shardpool kept the order — never a speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardpool.bench.ceilings import CEILING_ROWS, ROW_KEYS
from shardpool.bench.report import format_report

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]


def test_bench_json_report_has_every_section_and_zero_violations() -> None:
    cmd = [
        sys.executable, "-m", "shardpool", "bench", "--json",
        "--workers", "2", "--messages", "4000", "--channels", "300", "--repeats", "1",
        "--bytype-messages", "800", "--cpu-cost-us", "20", "--timeout", "60",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "repeat 1/1" in proc.stderr  # progress goes to stderr, the report alone to stdout
    report = json.loads(proc.stdout)

    assert report["ok"] is True
    assert report["traffic"]["messages"] == 4000
    sp = report["shardpool"]
    assert sp["violations"] == 0 and sp["force_closed_channels"] == 0 and sp["failures"] == 0
    assert sp["sequence_errors"] == {"gaps": 0, "duplicates": 0, "reorders": 0}
    assert sp["digest"]["mismatches"] == 0
    assert sp["digest"]["channels_checked"] == report["traffic"]["channel_ids"]
    assert len(sp["runs"]) == 1 and sum(sp["per_worker"]) == 4000
    assert len(sp["balance"]["shares"]) == 2
    for lat in (sp["latency"], sp["latency_saturated"]):
        us = lat["us"]
        assert us["count"] > 0
        assert 0 < us["p50"] <= us["p90"] <= us["p99"] <= us["p99.9"] <= us["max"]

    assert report["shardpool_trivial"]["msgs_per_s"] > 0
    for name in ("bare_zmq", "mp_queue"):
        base = report["baselines"][name]
        assert base["msgs_per_s"] > 0 and sum(base["runs"][0]["per_worker"]) == 4000
    bt = report["baselines"]["by_type"]
    assert bt["messages"] == 800
    assert bt["violations"] == sum(bt["violations_by_code"].values())
    same = bt["shardpool_same_traffic"]
    assert same["violations"] == 0 and same["digest_mismatches"] == 0
    assert report["shardpool_trivial_many"]["msgs_per_s"] > 0
    assert set(report["ratios"]) == {"pool_over_bare", "pool_over_mp_queue",
                                     "pool_many_over_bare", "pool_many_over_mp_queue",
                                     "lightning_over_bare", "lightning_over_mp_queue"}
    assert all(v > 0 for v in report["ratios"].values())

    # the ceilings section: every row of the issue-13 table, measured in this run
    ceilings = report["ceilings"]
    assert ceilings["messages"] == 4000 and ceilings["repeats"] == 1
    assert list(ceilings["rows"]) == list(ROW_KEYS)
    for key, row in ceilings["rows"].items():
        assert row["shardpool"] > 0 and len(row["shardpool_runs"]) >= 1, key
        assert row["target"] and row["met"] in (True, False), key
        if key == "recovery":
            assert row["baseline"] is None and row["ratio"] is None
            assert row["details"]["kills"] == len(row["shardpool_runs"])
        else:
            assert row["baseline_value"] > 0 and row["ratio"] > 0, key
            assert row["ratio"] == pytest.approx(row["shardpool"] / row["baseline_value"],
                                                 rel=1e-2), key

    text = format_report(report)
    for needle in ("shardpool÷bare", "shardpool÷mp.Queue", "p99.9", "per-worker balance",
                   "by-type dispatch", "verdict: OK", "ceilings (same run"):
        assert needle in text
    for row in CEILING_ROWS:
        assert row.path[:44] in text and row.target_text in text


def test_bench_lightning_real_reports_rates_per_worker_count_against_serial() -> None:
    cmd = [
        sys.executable, "-m", "shardpool", "bench", "--json", "--workload", "lightning-real",
        "--workers", "2", "--messages", "1500", "--channels", "60", "--repeats", "1",
        "--bytype-messages", "600", "--timeout", "60",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)

    assert report["ok"] is True and report["workload"] == "lightning-real"
    t = report["traffic"]
    assert t["messages"] == 1500 and t["signatures"] > 0 and t["secret_checks"] > 0
    serial = report["serial"]
    assert serial["msgs_per_s"] > 0 and serial["verifications_per_s"] > 0
    assert serial["cost_us_by_type"]["commitment_signed"]["us"] > 0
    sp = report["shardpool"]
    assert [p["workers"] for p in sp["points"]] == [1, 2]
    for p in sp["points"]:
        assert p["msgs_per_s"] > 0 and p["verifications_per_s"] > 0 and p["over_serial"] > 0
        assert sum(p["runs"][0]["per_worker"]) == 1500
    assert sp["violations"] == 0 and sp["failures"] == 0 and sp["digest"]["mismatches"] == 0
    assert sp["digest"]["channels_checked"] == 2 * t["channel_ids"]
    bt = report["baselines"]["by_type"]
    assert bt["violations"] > 0  # the by-type dispatch breaks the same real traffic
    assert bt["shardpool_same_traffic"]["violations"] == 0

    text = format_report(report)
    for needle in ("lightning-real", "verif./s", "one process, serially", "shardpool, 2 workers",
                   "commitment_signed", "by-type dispatch", "verdict: OK"):
        assert needle in text
