"""Rolling restart: every worker process replaced by a fresh one, one at a time, through slot
moves, while traffic flows: every message of every channel answered once and in order, handler
state exact, no crash counted, nothing redelivered."""

from __future__ import annotations

import signal
from pathlib import Path

import backend_tools
import handlers
import pytest
from service_handlers import backend_sections
from test_moves import Traffic, _order_ok
from test_resize import Background

from shardpool import MoveRefused, ShardPool
from shardpool.control import ControlClient

pytestmark = pytest.mark.multiprocess


@pytest.mark.parametrize("workers", [1, 2])
def test_roll_under_load_replaces_every_worker_keeping_order_and_state(workers: int) -> None:
    with ShardPool(
        handlers.counter, workers=workers, heartbeat_interval_s=0.1, rebalance_interval_s=3600.0
    ) as pool:
        traffic = Traffic(pool, 300)
        traffic.send(2)
        before = pool.worker_pids()
        load = Background(traffic)
        try:
            pool.roll(timeout=120)
        finally:
            load.end()
        after = pool.worker_pids()
        assert len(after) == workers
        assert None not in after and not set(before) & set(after), (before, after)
        placement = pool.placement()
        assert placement["workers"] == workers
        assert placement["roll"]["in_progress"] is False and placement["roll"]["error"] is None
        assert placement["roll"]["rolled"] == workers
        per = placement["slots_per_worker"]
        assert sum(per) == 4096 and max(per) - min(per) <= 1, per
        traffic.send(1)
        traffic.check()
        _order_ok(pool)
        stats = pool.stats()
        assert all(w["redelivered"] == 0 for w in stats["workers"]), stats["workers"]
        assert all(w["restarts"] == 0 for w in stats["workers"]), stats["workers"]
        assert sum(len(f) for f in traffic.futs.values()) > 900  # it ran during the roll


def test_a_second_roll_or_a_resize_during_a_roll_is_refused() -> None:
    with ShardPool(handlers.counter, workers=2, heartbeat_interval_s=0.1) as pool:
        pool.roll(wait=False)
        with pytest.raises(MoveRefused, match="already under way"):
            pool.roll(wait=False)
        with pytest.raises(MoveRefused, match="rolling restart is under way"):
            pool.resize(3, wait=False)
        pool.drain(timeout=60)


def test_sighup_rolls_every_worker_under_demo_load(tmp_path: Path) -> None:
    """`shardpool run --demo-load` (the Lightning demo handler, synthetic BOLT #2 traffic through
    the ingress): a SIGHUP with nothing changed replaces every worker process, one at a time,
    while the demo sees no protocol violation and no failed reply, and status counts no gap,
    duplicate or reorder."""
    sections = backend_sections(
        tmp_path, pool={"workers": 2, "handler": "shardpool.demo.handler:LightningHandler"}
    )
    log = tmp_path / "backend.log"
    with (
        backend_tools.backend_process(tmp_path, sections, ("--demo-load", "2000")) as backend,
        ControlClient(sections["control"]["endpoint"], timeout=10.0) as ctl,
    ):
        snap = backend_tools.wait_for(
            ctl, "status", lambda s: s["demo_load"]["replies"] >= 1000, 60.0
        )
        before = {w["pid"] for w in snap["workers"]}
        assert len(before) == 2 and None not in before
        backend.proc.send_signal(signal.SIGHUP)
        rolled = backend_tools.wait_for(
            ctl, "placement", lambda p: p["roll"]["rolled"] == 2 and not p["roll"]["in_progress"],
            90.0,
        )
        assert rolled["roll"]["error"] is None
        seen = snap["demo_load"]["replies"]
        snap = backend_tools.wait_for(
            ctl, "status", lambda s: s["demo_load"]["replies"] >= seen + 2000, 60.0
        )
        after = {w["pid"] for w in snap["workers"]}
        assert len(after) == 2 and None not in after and not before & after, (before, after)
        text = log.read_text(errors="replace")
        assert "SIGHUP: rolling restart of 2 worker(s)" in text
        assert "roll: 2 worker(s) replaced" in text
        # The same through the control socket: `shardpool roll`.
        out = backend_tools.cli("roll", "-c", str(tmp_path / "backend.toml"), "--timeout", "60")
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "rolled 2 worker(s)" in out.stdout
        seen = snap["demo_load"]["replies"]
        snap = backend_tools.wait_for(
            ctl, "status", lambda s: s["demo_load"]["replies"] >= seen + 1000, 60.0
        )
        last = {w["pid"] for w in snap["workers"]}
        assert len(last) == 2 and None not in last and not after & last, (after, last)
    demo = snap["demo_load"]
    assert demo["violations"] == 0 and demo["not_ok"] == 0, demo
    assert snap["order"] == {"gaps": 0, "duplicates": 0, "reorders": 0}
    place = snap["placement"]
    assert place["workers"] == 2 and sum(place["slots_per_worker"]) == 4096
    assert not place["roll"]["in_progress"] and place["roll"]["error"] is None
