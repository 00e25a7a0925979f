"""``scripts/scaling.py`` writes its JSON (and the PNG where matplotlib is installed) with every
point, ratio and target present. Tiny sizes: this checks the script, never the speed."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[1]


def test_scaling_script_writes_json_plot_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    cmd = [
        sys.executable, str(ROOT / "scripts" / "scaling.py"),
        "--workers", "1", "2", "--messages", "3000", "--messages-per-worker", "1000",
        "--queue-messages", "2000", "--cpu-messages", "1500", "--cpu-channels", "100",
        "--cpu-cost-us", "50", "--channels", "200", "--repeats", "1", "--timeout", "60",
        "--real-messages", "800", "--real-channels", "40", "--ceiling-messages", "2000",
        "--out", str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [p["workers"] for p in doc["trivial"]] == [1, 2]
    assert [p["workers"] for p in doc["cpu"]] == [1, 2]
    for p in doc["trivial"]:
        assert p["msgs_per_s"] > 0 and p["ceiling_msgs_per_s"] > 0 and p["mp_queue_msgs_per_s"] > 0
        assert p["per_item_msgs_per_s"] > 0 and p["pool_over_per_item"] > 0
        assert p["many_msgs_per_s"] > 0 and p["pool_many_over_ceiling"] > 0
        assert p["messages"] == 3000 and p["mp_queue_messages"] == 2000
    for series in (doc["trivial"], doc["cpu"]):
        assert series[0]["speedup"] == 1.0 and series[0]["efficiency"] == 1.0
        assert series[1]["efficiency"] == pytest.approx(series[1]["speedup"] / 2, abs=1e-3)
    assert doc["cpu"][0]["messages"] == doc["cpu"][1]["messages"] == 1500
    assert [p["workers"] for p in doc["real"]] == [1, 2]
    for p in doc["real"]:
        assert p["messages"] == 800 and p["verifications_per_s"] > 0
        assert p["serial_msgs_per_s"] > 0 and p["over_serial"] > 0
    assert doc["real"][0]["speedup"] == 1.0
    assert set(doc["targets"]) == {
        "trivial_1w_pool_over_ceiling", "trivial_1w_pool_over_mp_queue",
        "trivial_1w_pool_many_over_ceiling", "trivial_1w_pool_many_over_mp_queue",
        "cpu_speedup_1_to_2", "cpu_efficiency_up_to_cores_minus_1",
        "ceiling_forwarding_1w", "ceiling_dicts_1w", "ceiling_mp_queue_2w", "ceiling_call_rtt",
        "ceiling_ingress_1p", "ceiling_recovery",
    }
    # every issue-13 row measured in this run: two from the trivial series, four once
    assert set(doc["ceilings"]["rows"]) == {"dicts_1w", "call_rtt", "ingress_1p", "recovery"}
    for name, t in doc["targets"].items():
        if name.startswith("ceiling_"):
            assert t["value"] is not None and t["value"] > 0, name
    assert doc["targets"]["ceiling_call_rtt"]["better"] == "lower"
    assert doc["targets"]["ceiling_forwarding_1w"]["value"] == doc["trivial"][0][
        "pool_many_over_ceiling"]
    assert "ceilings (same run" in proc.stdout
    assert doc["targets"]["cpu_speedup_1_to_2"]["value"] == doc["cpu"][1]["speedup"]
    assert "targets (" in proc.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 10_000
    else:
        assert "no plot written" in proc.stderr


def test_replot_reads_an_earlier_json_without_measuring(tmp_path: Path) -> None:
    doc = {
        "machine": {"cpus": 4, "python": "3.12.0", "platform": "Linux"},
        "options": {"cpu_cost_us": 500.0},
        "trivial": [
            {"workers": w, "msgs_per_s": 1e5 * w, "bare_msgs_per_s": 2e5 * w,
             "mp_queue_msgs_per_s": 5e4, "pool_over_bare": 0.5, "pool_over_mp_queue": 2.0 * w,
             "speedup": float(w), "efficiency": 1.0}
            for w in (1, 2, 4)
        ],
        "cpu": [
            {"workers": w, "msgs_per_s": 1e4 * w * 0.9, "speedup": 0.9 * w if w > 1 else 1.0,
             "efficiency": 0.9 if w > 1 else 1.0}
            for w in (1, 2, 4)
        ],
        "targets": {},
    }
    src = tmp_path / "old.json"
    src.write_text(json.dumps(doc))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "scaling.py"), "--replot", str(src),
         "--plot", str(tmp_path / "old.png")],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trivial" in proc.stdout and "cpu" in proc.stdout
    assert "real" not in proc.stdout  # an older JSON without the real series still plots
