"""The shipped systemd units: what they promise the service manager (the front's unit checked
against the config defaults; the remote worker's template against the worker's exit codes and
credentials), and ``systemd-analyze verify`` on each where that tool exists."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shardpool.config import load_config
from shardpool.exitcodes import EXIT_CONFIG

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "systemd" / "shardpool.service"
WORKER_UNIT = ROOT / "config" / "systemd" / "shardpool-worker@.service"


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


# ------------------------------------------------------------------------------ remote worker unit


def _worker_unit() -> configparser.ConfigParser:
    # strict=False: LoadCredential= is repeated (configparser keeps the last one; see _values).
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(WORKER_UNIT.read_text())
    return parser


def _values(section: str, key: str) -> list[str]:
    """Every value of a key that a unit may repeat, in order."""
    out: list[str] = []
    current = ""
    for raw in WORKER_UNIT.read_text().splitlines():
        line = raw.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.partition("=")[0].strip() == key:
            out.append(line.partition("=")[2].strip())
    return out


def test_worker_unit_promises() -> None:
    unit = _worker_unit()
    u, svc = unit["Unit"], unit["Service"]
    assert "network-online.target" in u["After"] and "network-online.target" in u["Wants"]
    # Start limits belong in [Unit]: systemd ignores them in [Service] since v230.
    assert int(u["StartLimitBurst"]) == 5 and u["StartLimitIntervalSec"] == "60"
    assert "StartLimitBurst" not in svc
    assert svc["Restart"] == "on-failure"
    assert svc["RestartSec"] == "1s"
    assert svc["RestartPreventExitStatus"].split() == [str(EXIT_CONFIG)]
    assert svc["KillSignal"] == "SIGTERM" and _seconds(svc["TimeoutStopSec"]) == 30
    assert svc["MemoryMax"] == "2G"
    assert svc["NoNewPrivileges"] == "yes" and svc["DynamicUser"] == "yes"
    assert svc["ProtectSystem"] == "strict" and svc["ProtectHome"] == "yes"
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    for key in ("PrivateTmp", "PrivateDevices", "ProtectKernelTunables", "ProtectControlGroups",
                "LockPersonality"):
        assert svc[key] == "yes", key
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_worker_unit_passes_the_instance_and_its_credentials() -> None:
    argv = shlex.split(_worker_unit()["Service"]["ExecStart"])
    assert argv[:3] == ["/usr/bin/env", "shardpool", "worker"]
    opts = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert opts["--config"] == "/etc/shardpool/worker.toml"
    assert opts["--id"] == "%i"
    credentials = dict(v.split(":", 1) for v in _values("Service", "LoadCredential"))
    assert credentials == {
        "worker.key_secret": "/etc/shardpool/keys/%i.key_secret",
        "front.key": "/etc/shardpool/keys/front.key",
    }
    # Each key file the worker is given is one systemd loads for it.
    assert opts["--secret-key"] == "${CREDENTIALS_DIRECTORY}/worker.key_secret"
    assert opts["--front-key"] == "${CREDENTIALS_DIRECTORY}/front.key"


def _verify(tool: str, text: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str],
                                                           list[str]]:
    """``systemd-analyze verify`` on ``text`` as the instance host2-0; returns the run and its
    lines about that unit (each starts with the unit's path or name, e.g. "…@host2-0.service:12:
    Unknown key …"; lines about other units on this system are not ours to fail on)."""
    name = "shardpool-worker@host2-0.service"
    (tmp_path / name).write_text(text)
    done = subprocess.run(
        [tool, "verify", name], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    return done, [line for line in (done.stdout + done.stderr).splitlines() if name in line]


@pytest.mark.timeout(60)
def test_worker_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed here (the unit is checked on systems "
                    "that have systemd)")
    text = WORKER_UNIT.read_text()
    done, about_unit = _verify(tool, text, tmp_path)
    assert done.returncode == 0 and not about_unit, done.stdout + done.stderr
    # The filter sees this systemd's warnings about the unit: a misspelt key shows up in it.
    (tmp_path / "typo").mkdir()
    _, typo = _verify(tool, text.replace("MemoryMax=", "MemoryMaxx="), tmp_path / "typo")
    assert any("MemoryMaxx" in line for line in typo), typo
