"""The ceilings section's arithmetic and text (no processes: the runs are made up here; the real
runs are checked by tests/test_bench_cli.py and tests/test_baselines.py)."""

from __future__ import annotations

import pytest

from shardpool.bench.ceilings import (
    CEILING_ROWS,
    ROW_KEYS,
    CeilingRuns,
    ceiling_lines,
    ceilings_section,
    measure_ceilings,
)


def _runs() -> CeilingRuns:
    runs = CeilingRuns(messages=1000, repeats=3)
    figures = {
        "forwarding_1w": ([80.0, 90.0, 100.0], [100.0, 100.0, 100.0]),
        "dicts_1w": ([60.0, 70.0, 80.0], [100.0, 100.0, 100.0]),
        "mp_queue_2w": ([1000.0, 1100.0, 1200.0], [100.0, 100.0, 100.0]),
        "call_rtt": ([200.0, 300.0, 400.0], [100.0, 100.0, 100.0]),
        "ingress_1p": ([50.0, 50.0, 50.0], [100.0, 100.0, 100.0]),
        "recovery": ([30.0, 40.0, 70.0], []),
    }
    for key, (ours, base) in figures.items():
        runs.shardpool[key] = ours
        runs.baseline[key] = base
    runs.details["recovery"] = {"kills": 3, "load_msgs_per_s": 1000.0, "front_median_ms": 20.0,
                                "end_to_end_max_ms": 70.0}
    return runs


def test_section_has_every_row_in_table_order_with_ratio_and_verdict() -> None:
    section = ceilings_section(_runs())
    rows = section["rows"]
    assert list(rows) == list(ROW_KEYS)
    assert rows["forwarding_1w"]["ratio"] == 0.9 and rows["forwarding_1w"]["met"] is True
    assert rows["dicts_1w"]["ratio"] == 0.7 and rows["dicts_1w"]["met"] is True  # >= 0.7
    assert rows["mp_queue_2w"]["ratio"] == 11.0 and rows["mp_queue_2w"]["met"] is True
    assert rows["call_rtt"]["ratio"] == 3.0 and rows["call_rtt"]["met"] is False  # <= 1.5
    assert rows["ingress_1p"]["ratio_paired"] == 0.5 and rows["ingress_1p"]["met"] is False
    rec = rows["recovery"]
    assert rec["shardpool"] == 40.0 and rec["ratio"] is None and rec["met"] is True  # <= 50 ms
    assert [r["target"] for r in rows.values()] == [">= 0.8", ">= 0.7", ">= 10x", "<= 1.5",
                                                    ">= 0.8", "<= 50 ms"]


def test_text_names_every_row_its_baseline_and_target() -> None:
    text = "\n".join(ceiling_lines(ceilings_section(_runs())))
    for row in CEILING_ROWS:
        assert row.path[:44] in text and row.target_text in text
        if row.baseline:
            assert row.baseline in text
    assert "MISSED" in text and "met" in text


def test_rows_not_measured_are_left_out() -> None:
    runs = CeilingRuns(messages=10, repeats=1)
    runs.shardpool["call_rtt"], runs.baseline["call_rtt"] = [150.0], [100.0]
    section = ceilings_section(runs)
    assert list(section["rows"]) == ["call_rtt"]
    assert section["rows"]["call_rtt"]["met"] is True


def test_measure_rejects_unknown_rows_and_empty_streams() -> None:
    with pytest.raises(ValueError, match="rows"):
        measure_ceilings([], [], rows=("nope",))
    with pytest.raises(ValueError, match="messages"):
        measure_ceilings([], [], rows=("forwarding_1w",))
