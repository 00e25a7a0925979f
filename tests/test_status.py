"""``shardpool status``: the table, --once/--json, finding a backend with no flags, and a backend
that is not there."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from service_handlers import in_process_backend

from shardpool.cli import main
from shardpool.client import Client
from shardpool.control import ControlClient
from shardpool.status import Figures, render_status

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.mark.multiprocess
def test_status_table_once_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with in_process_backend(tmp_path) as svc:
        with Client(svc.ingress_endpoint, timeout=20.0) as client:
            for i in range(300):
                client.send(b"hot" if i % 2 else b"c%d" % i, {"p": 0, "i": i // 2 if i % 2 else 0})
            assert all(r.ok for r in client.results(timeout=20.0))
        capsys.readouterr()
        assert main(["status", "--once", "--endpoint", svc.control_endpoint]) == 0
        table = capsys.readouterr().out
        for heading in (
            "PID",
            "STATE",
            "EPOCH",
            "CHANNELS",
            "QUEUED",
            "INFLIGHT",
            "PROC/S",
            "FAILED",
            "REDELIV",
            "LAG ms",
            "CPU%",
            "RSS MB",
            "order violations",
            "hottest channels",
            "unread replies held 0 for 0 producers",
            "internal errors 0",
        ):
            assert heading in table, heading
        for pid in svc.pool.worker_pids():
            assert str(pid) in table
        assert "gaps 0  duplicates 0  reorders 0" in table
        # the hottest channel, 150 messages, printed as the commands take it
        assert any(line.split()[:3] == ["150", str(svc.pool.worker_of(b"hot")), "hot"]
                   for line in table.splitlines()), table

        assert main(["status", "--json", "--endpoint", svc.control_endpoint]) == 0
        snap = json.loads(capsys.readouterr().out)
        assert snap["pool"]["acknowledged"] == 300
        assert snap["ingress"]["accepted"] == 300
        assert snap["hot_channels"][0][:2] == [b"hot".hex(), 150]
        assert len(snap["workers"]) == 2
        assert {
            "pid",
            "state",
            "epoch",
            "restarts",
            "channels",
            "queued",
            "inflight",
            "processed",
            "processed_per_s",
            "failed",
            "redelivered",
            "loop_lag_s",
            "cpu_percent",
            "rss_bytes",
            "gaps",
            "duplicates",
            "reorders",
        } <= set(snap["workers"][0])
        assert render_status(snap).splitlines()[0].startswith("shardpool ")


def test_status_without_a_backend_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "--once", "--endpoint", f"ipc://{tmp_path}/none"]) == 1
    assert "no shardpool backend" in capsys.readouterr().err
    assert main(["drain", "--endpoint", f"ipc://{tmp_path}/none"]) == 1
    assert main(["stop", "--endpoint", f"ipc://{tmp_path}/none"]) == 1


@pytest.mark.multiprocess
def test_no_flags_status_finds_a_no_flags_run_with_demo_load(tmp_path: Path) -> None:
    """The README's newcomer path: `shardpool run --demo-load` and `shardpool status` in a second
    terminal, both with no config flags (default config, default runtime directory)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPOOL_")}
    env["XDG_RUNTIME_DIR"] = str(tmp_path)  # the per-user default, kept inside this test
    env["PYTHONPATH"] = os.pathsep.join((str(TESTS), str(REPO)))
    env["SHARDPOOL_POOL_WORKERS"] = "2"  # "auto" may be 1 core here; keep two workers
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardpool", "run", "--demo-load", "20000"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,  # no config/shardpool.toml here: built-in defaults
        )
    kids: list[psutil.Process] = []
    try:
        control = f"ipc://{tmp_path}/shardpool/control"
        with ControlClient(control) as ctl:
            ctl.wait_ready(60.0, alive=lambda: proc.poll() is None)
            kids = psutil.Process(proc.pid).children(recursive=True)
            deadline = time.monotonic() + 60
            while True:
                snap: dict[str, Any] = ctl.request("status")
                if snap["demo_load"]["replies"] >= 3000:
                    break
                assert time.monotonic() < deadline, snap
        out = subprocess.run(
            [sys.executable, "-m", "shardpool", "status", "--json"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        snap = json.loads(out.stdout)
        assert snap["service"]["pid"] == proc.pid
        assert snap["service"]["config"] == "<defaults>"
        assert snap["demo_load"]["violations"] == 0 and snap["demo_load"]["not_ok"] == 0
        assert snap["order"] == {"gaps": 0, "duplicates": 0, "reorders": 0}
        assert snap["ingress"]["producers"] == 1
        out = subprocess.run(
            [sys.executable, "-m", "shardpool", "status", "--once"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=tmp_path,
        )
        assert out.returncode == 0 and "demo load: sent" in out.stdout, out.stderr
        out = subprocess.run(
            [sys.executable, "-m", "shardpool", "stop"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=tmp_path,
        )
        assert out.returncode == 0, out.stderr
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for kid in kids:
            with contextlib.suppress(psutil.Error):
                kid.kill()
        psutil.wait_procs(kids, timeout=5)
        print(log_path.read_text(errors="replace")[-4000:])


def _stats(acknowledged: int, workers: list[tuple[int, int]]) -> dict[str, Any]:
    """Pool stats as :meth:`ShardPool.stats` gives them: workers as ``(epoch, processed)``."""
    return {
        "state": "running",
        "acknowledged": acknowledged,
        "halted": [{"channel": b"\x01\x02", "seq": 3}],
        "workers": [
            {"index": i, "epoch": epoch, "processed": processed, "gaps": i,
             "hot_channels": [[b"w%d" % i, 10 * (i + 1)], [b"x%d" % i, 1]]}
            for i, (epoch, processed) in enumerate(workers)
        ],
    }


def test_figures_give_rates_over_the_last_sample_and_restart_a_worker_count_from_zero() -> None:
    now = [100.0]
    figures = Figures(clock=lambda: now[0])
    first = figures.snapshot({"pid": 1}, _stats(0, [(1, 0), (1, 0)]), {"accepted": 0}, None)
    assert first["rates"] == {"processed_per_s": 0.0, "ingress_per_s": 0.0}
    assert first["pool"]["halted"][0]["channel"] == "0102"
    assert first["order"] == {"gaps": 1, "duplicates": 0, "reorders": 0}
    assert first["hot_channels"][0] == [b"w1".hex(), 20, 1]
    assert "hot_channels" not in first["workers"][0]

    now[0] += 0.2  # too recent a base: no rates yet
    early = figures.snapshot({}, _stats(10, [(1, 5), (1, 5)]), {"accepted": 10}, None)
    assert early["rates"]["processed_per_s"] == 0.0

    now[0] += 2.0  # the base is the latest sample at least 0.5 s old: the one just taken
    # Worker 1 was restarted meanwhile (epoch 2): its count starts from 0, not from 5.
    snap = figures.snapshot({}, _stats(410, [(1, 305), (2, 100)]), {"accepted": 610}, None)
    assert snap["rates"] == pytest.approx({"processed_per_s": 200.0, "ingress_per_s": 300.0})
    assert [w["processed_per_s"] for w in snap["workers"]] == pytest.approx([150.0, 50.0])
