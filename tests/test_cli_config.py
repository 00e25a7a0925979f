"""``python -m shardpool check-config`` end to end, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shardpool.cli import main
from shardpool.exitcodes import EXIT_CONFIG, EXIT_OK, EXIT_USAGE

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 60


def run_cli(
    *args: str, cwd: Path = REPO, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    # A clean SHARDPOOL_* environment: the developer's own overrides must not change the outcome.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDPOOL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "shardpool", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def test_good_file_prints_effective_config(tmp_path: Path) -> None:
    p = tmp_path / "good.toml"
    p.write_text("[pool]\nworkers = 3\n[transport]\nbatch_size = 64\n")
    r = run_cli("check-config", str(p))
    assert r.returncode == EXIT_OK, r.stderr
    assert "workers = 3" in r.stdout
    assert "batch_size = 64" in r.stdout
    assert str(p) in r.stdout
    # The text output is itself a valid config carrying the same values.
    parsed = tomllib.loads(r.stdout)
    assert parsed["pool"]["workers"] == 3 and parsed["transport"]["batch_size"] == 64


def test_default_file_found_in_cwd() -> None:
    r = run_cli("check-config")
    assert r.returncode == EXIT_OK, r.stderr
    assert "config/shardpool.toml" in r.stdout
    assert "workers = " in r.stdout


def test_bad_file_exits_2_and_names_key(tmp_path: Path) -> None:
    p = tmp_path / "bad.toml"
    p.write_text("[transport]\nbatch_size = 0\nmax_inflight = 1.5\n")
    r = run_cli("check-config", str(p))
    assert r.returncode == EXIT_CONFIG == 2
    assert r.stdout == ""
    assert "transport.batch_size = 0" in r.stderr
    assert "an integer from 1 to 65536" in r.stderr
    assert "transport.max_inflight = 1.5" in r.stderr
    assert str(p) in r.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    r = run_cli("check-config", str(tmp_path / "absent.toml"))
    assert r.returncode == EXIT_CONFIG
    assert "config file not found" in r.stderr and "absent.toml" in r.stderr


def test_env_override_and_bad_env_value(tmp_path: Path) -> None:
    r = run_cli("check-config", "--json", extra_env={"SHARDPOOL_POOL_WORKERS": "5"})
    assert r.returncode == EXIT_OK, r.stderr
    assert json.loads(r.stdout)["pool"]["workers"] == 5
    r = run_cli("check-config", extra_env={"SHARDPOOL_POOL_WORKERS": "many"})
    assert r.returncode == EXIT_CONFIG
    assert "pool.workers = 'many'" in r.stderr and "SHARDPOOL_POOL_WORKERS" in r.stderr


def test_config_path_from_env(tmp_path: Path) -> None:
    p = tmp_path / "via-env.toml"
    p.write_text("[metrics]\nport = 9999\n")
    r = run_cli("check-config", "--json", cwd=tmp_path, extra_env={"SHARDPOOL_CONFIG": str(p)})
    assert r.returncode == EXIT_OK, r.stderr
    assert json.loads(r.stdout)["metrics"]["port"] == 9999


def test_json_output_parses() -> None:
    r = run_cli("check-config", str(REPO / "config" / "example-production.toml"), "--json")
    assert r.returncode == EXIT_OK, r.stderr
    doc = json.loads(r.stdout)
    assert doc["source"].endswith("example-production.toml")
    sections = {"pool", "transport", "supervisor", "ingress", "control", "metrics"}
    assert set(doc) == {"source"} | sections
    assert doc["metrics"]["enabled"] is True
    assert doc["ingress"]["endpoint"].startswith("tcp://")


def test_main_in_process_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert main(["no-such-command"]) == EXIT_USAGE
    assert main(["check-config", "--help"]) == EXIT_OK
    assert "check-config" in capsys.readouterr().out
