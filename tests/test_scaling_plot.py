"""``scripts/scaling.py``'s figures: each run's plot has a title of its own, and no legend entry
stands for a series without data (checked on the lines it would draw, so without matplotlib)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").glob("scaling-*.json"))


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scaling_script", ROOT / "scripts" / "scaling.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


scaling = load_script()


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_every_line_of_a_stored_run_has_data(path: Path) -> None:
    doc = json.loads(path.read_text())
    throughput, efficiency = scaling.plot_lines(doc)
    for line in throughput + efficiency:
        assert line.x and len(line.x) == len(line.y), line.label
    labels = [line.label for line in throughput]
    assert len(labels) == len(set(labels))
    if not doc["trivial"]:
        assert not any("trivial" in lab or "bare" in lab or "Queue" in lab for lab in labels)


def test_stored_runs_have_distinct_titles() -> None:
    assert len(RESULTS) >= 2
    titles = [scaling.plot_title(json.loads(p.read_text()), p.stem) for p in RESULTS]
    assert len(set(titles)) == len(titles)
    for path, title in zip(RESULTS, titles, strict=True):
        assert path.stem in title


def test_a_series_run_alone_draws_only_its_lines() -> None:
    doc = {
        "started": "2026-11-26T10:54:25Z",
        "machine": {"cpus": 16, "python": "3.12.3", "platform": "Linux"},
        "options": {"cpu_cost_us": 500.0, "cpu_messages": 200_000, "repeats": 2},
        "trivial": [],
        "cpu": [{"workers": w, "msgs_per_s": 9e3 * w, "efficiency": 0.9, "cpu_efficiency": None}
                for w in (1, 2)],
    }
    throughput, efficiency = scaling.plot_lines(doc)
    assert [line.label for line in throughput] == ["synthetic: busy loop, 500 µs/commitment"]
    assert [line.label for line in efficiency] == ["synthetic: busy loop"]
    title = scaling.plot_title(doc, "run-a")
    assert "run-a, 2026-11-26" in title and "200,000" in title and "trivial" not in title
