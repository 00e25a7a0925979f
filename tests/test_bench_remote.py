"""``shardpool bench --connect``: the load test through the ingress of a running backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from service_handlers import in_process_backend

pytestmark = pytest.mark.multiprocess

TESTS = Path(__file__).resolve().parent


def test_bench_connect_reports_order_and_replies(tmp_path: Path) -> None:
    with in_process_backend(
        tmp_path, pool={"workers": 2, "handler": "shardpool.demo.handler:LightningHandler"}
    ) as svc:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPOOL_")}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
        out = subprocess.run(
            [sys.executable, "-m", "shardpool", "bench", "--connect", svc.ingress_endpoint,
             "--messages", "3000", "--channels", "200", "--repeats", "2", "--json", "--quiet"],
            capture_output=True, text=True, timeout=120, env=env,
        )
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        snap = svc.snapshot(timeout=5.0)
    assert report["ok"] is True
    assert report["messages"] == 6000 and report["statuses"] == {"ok": 6000}
    assert report["violations"] == report["reply_reorders"] == 0
    assert report["latency_us"]["count"] == 6000
    # The backend saw exactly that traffic, with no order violation of its own.
    assert snap["pool"]["acknowledged"] == 6000
    assert snap["order"] == {"gaps": 0, "duplicates": 0, "reorders": 0}


def test_bench_connect_without_a_backend_fails_clearly(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "shardpool", "bench", "--connect", f"ipc://{tmp_path}/nobody",
         "--messages", "10", "--repeats", "1", "--timeout", "2", "--quiet"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1
    assert "shardpool bench:" in out.stderr
