"""Command-line conventions: ``--version``; ``run -c FILE -w N --handler module:attr`` over the file
and the environment, and ``check-config`` saying where each value came from; a handler module in
the current directory; ``bench -c``; commands that need a backend say at once that none runs."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import backend_tools
import pytest
from service_handlers import subprocess_env

from shardpool import __version__
from shardpool.cli import main
from shardpool.client import Client
from shardpool.exitcodes import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, EXIT_USAGE

HANDLER_MODULE = """\
def handle(channel, seq, message, redelivered):
    return {"from": "cwd handler", "echo": message}
"""


def _shardpool(cwd: Path, *args: str, env: dict[str, str] | None = None,
               timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``shardpool ARGS`` as the installed script runs it: ``-P`` keeps Python from putting the
    current directory on the import path itself (``python -m`` would), so that what finds a
    handler module there is shardpool's own doing."""
    return subprocess.run(
        [sys.executable, "-P", "-m", "shardpool", *args], cwd=cwd, env=env or _env(),
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def _env(**extra: str) -> dict[str, str]:
    env = subprocess_env()
    env.pop("PYTHONPATH", None)  # nothing but the installed shardpool and the current directory
    env.update(extra)
    return env


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == f"shardpool {__version__}"


def _write_project(tmp_path: Path) -> Path:
    """A deployment directory: a handler module and a config that names another handler, 2
    workers and 64 slots."""
    (tmp_path / "cwd_handler_mod.py").write_text(HANDLER_MODULE)
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[pool]\nworkers = 2\nslots = 64\nhandler = "shardpool.demo.handler:LightningHandler"\n'
        f'[ingress]\nendpoint = "ipc://{tmp_path}/in"\n'
        f'[control]\nendpoint = "ipc://{tmp_path}/ctl"\n'
        "[supervisor]\nready_timeout_s = 30.0\nstop_timeout_s = 5.0\n"
    )
    return cfg


def test_check_config_shows_where_each_value_came_from(tmp_path: Path) -> None:
    cfg = _write_project(tmp_path)
    env = _env(SHARDPOOL_POOL_WORKERS="3", SHARDPOOL_POOL_FAILURE_POLICY="skip")
    r = _shardpool(tmp_path, "check-config", "-c", str(cfg), "-w", "1",
                   "--handler", "cwd_handler_mod:handle", "--json", env=env)
    assert r.returncode == EXIT_OK, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["pool"]["workers"], doc["pool"]["handler"]) == (1, "cwd_handler_mod:handle")
    assert (doc["pool"]["slots"], doc["pool"]["failure_policy"]) == (64, "skip")
    origins = doc["origins"]
    assert origins["pool.workers"] == "flag --workers"  # over the file and the environment
    assert origins["pool.handler"] == "flag --handler"
    assert origins["pool.slots"] == "file"
    assert origins["pool.failure_policy"] == "env SHARDPOOL_POOL_FAILURE_POLICY"
    assert origins["pool.retry_limit"] == "default"
    # the TOML output says the same, one comment per line
    r = _shardpool(tmp_path, "check-config", str(cfg), "-w", "1", env=env)
    assert r.returncode == EXIT_OK, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("workers = 1  #") and line.endswith("[flag --workers]")
               for line in lines), r.stdout
    assert any(line.startswith("slots = 64  #") and line.endswith("[file]") for line in lines)
    # a flag value the config refuses is named as the flag's
    r = _shardpool(tmp_path, "check-config", str(cfg), "-w", "0", env=env)
    assert r.returncode == EXIT_CONFIG
    assert "pool.workers = 0: an integer from 1 to 1024" in r.stderr
    assert "[set by flag --workers]" in r.stderr
    r = _shardpool(tmp_path, "check-config", "-w", "many", env=env)
    assert r.returncode == EXIT_USAGE and "'many' is not a worker count" in r.stderr


def test_a_handler_outside_the_import_path_is_named_with_the_hint(tmp_path: Path) -> None:
    """From a directory without the module, check-config and run both say where it was searched
    and name PYTHONPATH."""
    cfg = _write_project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _shardpool(elsewhere, "check-config", "-c", str(cfg), "--handler", "cwd_handler_mod:handle")
    assert r.returncode == EXIT_CONFIG
    assert "pool.handler = 'cwd_handler_mod:handle'" in r.stderr
    assert "No module named 'cwd_handler_mod'" in r.stderr and "PYTHONPATH" in r.stderr
    r = _shardpool(elsewhere, "run", "-c", str(cfg), "-w", "1",
                   "--handler", "cwd_handler_mod:handle")
    assert r.returncode == EXIT_FAILURE
    assert "No module named 'cwd_handler_mod'" in r.stderr and "PYTHONPATH" in r.stderr


@contextlib.contextmanager
def _backend(
    cwd: Path, control: str, *args: str, env: dict[str, str]
) -> Iterator[dict[str, Any]]:
    """``shardpool run ARGS`` in ``cwd`` (``-P``: the current directory is on the import path
    only through shardpool itself); the control socket's first answer (60 s at most); the
    backend and its workers gone on the way out."""
    argv = [sys.executable, "-P", "-m", "shardpool", "run", *args]
    with backend_tools.running(argv, control, cwd, env) as backend:
        yield backend.info


@pytest.mark.multiprocess
def test_run_flags_override_file_and_env_and_the_handler_imports_from_cwd(tmp_path: Path) -> None:
    cfg = _write_project(tmp_path)
    env = _env(SHARDPOOL_POOL_WORKERS="3")
    control = f"ipc://{tmp_path}/ctl"
    with _backend(tmp_path, control, "-c", str(cfg), "-w", "1",
                  "--handler", "cwd_handler_mod:handle", env=env) as info:
        assert info["workers"] == 1  # not the file's 2, not the environment's 3
        with Client(f"ipc://{tmp_path}/in", timeout=30.0) as client:
            assert client.call(b"chan-1", {"x": 1}, timeout=30.0) == {
                "from": "cwd handler", "echo": {"x": 1}
            }
        r = _shardpool(tmp_path, "stop", "-c", str(cfg), env=env)
        assert r.returncode == EXIT_OK, r.stderr


def test_bench_takes_dash_c(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[transport]\nbatch_size = 0\n")
    r = _shardpool(tmp_path, "bench", "-c", str(bad), "--quiet", env=subprocess_env())
    assert r.returncode == EXIT_CONFIG, (r.stdout[-2000:], r.stderr[-2000:])
    assert "transport.batch_size = 0" in r.stderr and str(bad) in r.stderr


@pytest.mark.parametrize("where", ["missing ipc socket", "tcp port nobody listens on"])
def test_commands_needing_a_backend_say_at_once_that_none_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    if where == "missing ipc socket":
        endpoint = f"ipc://{tmp_path}/nobody"
    else:
        import socket

        with socket.socket() as s:  # a free loopback port, closed again: nothing listens
            s.bind(("127.0.0.1", 0))
            endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    for argv in (["status", "--once"], ["status", "--json"], ["drain"], ["stop"],
                 ["resume", "chan-1"], ["skip", "chan-1"], ["move", "1", "0"],
                 ["pin", "chan-1"], ["unpin", "chan-1"], ["resize", "2"]):
        capsys.readouterr()
        start = time.monotonic()
        code = main([*argv, "--endpoint", endpoint])
        took = time.monotonic() - start
        err = capsys.readouterr().err
        assert code == EXIT_FAILURE, (argv, err)
        assert "no shardpool backend at" in err and "is `shardpool run` running?" in err, err
        assert "in hex" not in err  # nothing from a backend to explain
        assert took < 3.0, (argv, took)  # not the command's --timeout (5 to 120 s)
