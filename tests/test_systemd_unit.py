"""The shipped systemd unit: what it promises the service manager (checked against the config
defaults), and ``systemd-analyze verify`` on it where that tool exists."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardpool.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "systemd" / "shardpool.service"


def _service_section() -> dict[str, str]:
    """The [Service] keys of the unit (the last value of a key repeated)."""
    out: dict[str, str] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service":
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _seconds(value: str) -> float:
    return float(value[:-1]) if value.endswith("s") else float(value)


def test_unit_matches_what_shardpool_run_does() -> None:
    svc = _service_section()
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert svc["KillSignal"] == "SIGTERM"
    # SIGTERM to the front alone: workers must not leave before the drain.
    assert svc["KillMode"] == "mixed"
    assert svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes"
    assert "-HUP" in svc["ExecReload"] and "$MAINPID" in svc["ExecReload"]
    assert shlex.split(svc["ExecStart"])[1] == "run"
    assert _seconds(svc["WatchdogSec"]) >= 2  # the main loop ticks every second
    # Drain + worker stop take supervisor.stop_timeout_s, closing the sockets up to ~2 s more.
    shipped = load_config(ROOT / "config" / "shardpool.toml", env={})
    defaults = load_config(None, env={})
    for cfg in (shipped, defaults):
        assert _seconds(svc["TimeoutStopSec"]) >= cfg.supervisor.stop_timeout_s + 5
        assert _seconds(svc["TimeoutStartSec"]) >= cfg.supervisor.ready_timeout_s + 10


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (the unit is checked on systems "
                    "that have systemd)")
    # verify checks that ExecStart's program exists: point it at this interpreter, as an
    # installation would at its own `shardpool`.
    text = UNIT.read_text().replace(
        "ExecStart=/usr/local/bin/shardpool", f"ExecStart={sys.executable} -m shardpool"
    )
    assert text != UNIT.read_text()
    unit = tmp_path / "shardpool.service"
    unit.write_text(text)
    done = subprocess.run(
        [tool, "verify", str(unit)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    # Unknown or misspelt keys are only warned about (exit 0): any line about the unit fails.
    about_unit = [
        line for line in (done.stdout + done.stderr).splitlines() if "shardpool.service" in line
    ]
    assert done.returncode == 0 and not about_unit, done.stdout + done.stderr
