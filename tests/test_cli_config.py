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
    sections = {
        "pool", "transport", "supervisor", "ingress", "control", "metrics", "deadletters", "remote"
    }
    assert set(doc) == {"source", "origins"} | sections
    assert doc["origins"]["metrics.enabled"] == "file"
    assert doc["origins"]["pool.retry_backoff_ms"] in ("file", "default")
    assert doc["metrics"]["enabled"] is True
    assert doc["ingress"]["endpoint"].startswith("tcp://")


def test_main_in_process_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE
    assert main(["no-such-command"]) == EXIT_USAGE
    assert main(["check-config", "--help"]) == EXIT_OK
    assert "check-config" in capsys.readouterr().out


# -------------------------------------------------- check-config refuses what `run` refuses


def _backend_toml(tmp_path: Path, pool: str = "", ingress: str = "") -> Path:
    """A config with its sockets in ``tmp_path`` plus extra ``[pool]`` / ``[ingress]`` lines
    (``ingress`` replaces the ingress endpoint)."""
    p = tmp_path / "backend.toml"
    ingress = ingress or f'endpoint = "ipc://{tmp_path}/in"'
    p.write_text(
        f'[pool]\nworkers = 1\n{pool}\n'
        f'[ingress]\n{ingress}\n'
        f'[control]\nendpoint = "ipc://{tmp_path}/ctl"\n'
        '[supervisor]\nready_timeout_s = 30.0\nstop_timeout_s = 5.0\n'
    )
    return p


_REFUSED: list[tuple[str, str, str, str]] = [
    # (id, [pool] lines, [ingress] lines, what stderr must say)
    (
        "non-loopback ingress without CURVE",
        "",
        'endpoint = "tcp://0.0.0.0:*"',
        "ingress.endpoint = 'tcp://0.0.0.0:*': a loopback address",
    ),
    (
        "handler module missing",
        'handler = "no_such_module_here:handle"',
        "",
        "pool.handler = 'no_such_module_here:handle': an importable module:attribute "
        "(ModuleNotFoundError: No module named 'no_such_module_here'); ",
    ),
    (
        "handler attribute missing",
        'handler = "json:no_such_attr"',
        "",
        "pool.handler = 'json:no_such_attr': an importable module:attribute (AttributeError",
    ),
    (
        "handler options the class does not take",
        'handler = "shardpool.demo.handler:LightningHandler"\nhandler_options = { bogus = 1 }',
        "",
        "pool.handler_options = {'bogus': 1}: keyword arguments that "
        "shardpool.demo.handler:LightningHandler accepts (TypeError",
    ),
    (
        "move_state hooks without hooks",
        'handler = "json:dumps"\nmove_state = "hooks"',
        "",
        "pool.move_state = 'hooks': \"auto\", \"cbor\" or \"none\" (pool.move_state = 'hooks' "
        "needs a handler object with snapshot(channel) and restore(channel, data)",
    ),
]


@pytest.mark.multiprocess
@pytest.mark.parametrize(("pool", "ingress", "says"), [r[1:] for r in _REFUSED],
                         ids=[r[0] for r in _REFUSED])
def test_check_config_refuses_what_run_refuses(
    tmp_path: Path, pool: str, ingress: str, says: str
) -> None:
    """Each config passes the file's own validation but `run` cannot serve it: check-config
    exits 2 naming the key, the value and what is allowed, and `run` on the same file indeed
    fails (it starts nothing that outlives it)."""
    p = _backend_toml(tmp_path, pool, ingress)
    r = run_cli("check-config", str(p))
    assert r.returncode == EXIT_CONFIG, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert f"invalid configuration ({p})" in r.stderr and says in r.stderr, r.stderr
    ran = run_cli("run", "-c", str(p))
    assert ran.returncode != EXIT_OK, ran.stderr
    assert "cannot start" in ran.stderr or "invalid configuration" in ran.stderr, ran.stderr


def test_check_config_lists_every_run_time_problem_at_once(tmp_path: Path) -> None:
    long_dir = tmp_path / ("d" * 100)
    p = tmp_path / "several.toml"
    p.write_text(
        '[pool]\nhandler = "no_such_module_here:handle"\n'
        '[ingress]\nendpoint = "tcp://0.0.0.0:7400"\n'
        f'[control]\nendpoint = "ipc://{long_dir}/ctl"\n'
    )
    r = run_cli("check-config", str(p))
    assert r.returncode == EXIT_CONFIG
    for key in ("ingress.endpoint = ", "control.endpoint = ", "pool.handler = "):
        assert key in r.stderr, (key, r.stderr)
    assert "an ipc path of at most 107 bytes" in r.stderr
    assert not long_dir.exists()  # checked, not created


def test_check_config_accepts_a_curve_ingress_and_an_importable_handler(tmp_path: Path) -> None:
    """A non-loopback ingress with keys from `shardpool keys` and authorised clients passes; so
    does a handler importable from PYTHONPATH."""
    keys = tmp_path / "keys"
    made = run_cli("keys", str(keys))
    assert made.returncode == EXIT_OK, made.stderr
    p = _backend_toml(
        tmp_path,
        'handler = "service_handlers:ordered"',
        'endpoint = "tcp://0.0.0.0:7400"\n'
        f'curve_public_key = "{keys}/server.key"\n'
        f'curve_secret_key = "{keys}/server.key_secret"\n'
        f'curve_clients_dir = "{keys}/authorized_clients"',
    )
    r = run_cli("check-config", str(p), extra_env={"PYTHONPATH": str(REPO / "tests")})
    assert r.returncode == EXIT_OK, r.stderr
    assert 'handler = "service_handlers:ordered"' in r.stdout
