"""``shardpool run`` and its operator's signals and service manager: SIGHUP reloads the config
(live keys applied, the rest logged as needing a restart, a bad file changes nothing) and rolls
the workers onto fresh processes, SIGUSR1
reopens log files, and sd_notify tells a test NOTIFY_SOCKET READY=1 ... STOPPING=1."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import backend_tools
import pytest
from service_handlers import backend_sections, produce_sync, toml_config

from shardpool.control import ControlClient

pytestmark = pytest.mark.multiprocess


def _wait_log(log: Path, ctl: ControlClient, text: str, timeout: float = 15.0) -> str:
    """Wait until the backend's log holds ``text`` (a control round trip between reads)."""
    deadline = time.monotonic() + timeout
    while True:
        content = log.read_text(errors="replace")
        if text in content:
            return content
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} never logged; log ends:\n{content[-3000:]}")
        ctl.request("ping", timeout=1.0)


def _serves(endpoint: str, producer: int) -> None:
    """200 messages over 20 channels come back, all ok and in order."""
    summary = produce_sync(endpoint, producer, 20, 200, 11)
    assert summary["ok"] == 200 and summary["n_errors"] == 0, summary


def _mode(ctl: ControlClient) -> str:
    return str(ctl.request("placement")["levelling"]["mode"])


def test_sighup_applies_live_keys_logs_restart_keys_and_survives_a_bad_config(
    tmp_path: Path,
) -> None:
    sections = backend_sections(tmp_path, pool={"rebalance": "advise"})
    log = tmp_path / "backend.log"
    with (
        backend_tools.backend_process(tmp_path, sections) as backend,
        ControlClient(sections["control"]["endpoint"]) as ctl,
    ):
        endpoint = sections["ingress"]["endpoint"]
        _serves(endpoint, 0)
        assert _mode(ctl) == "advise"

        # One live key, one that needs a restart.
        changed = backend_sections(tmp_path, pool={"rebalance": "auto", "retry_limit": 7})
        (tmp_path / "backend.toml").write_text(toml_config(changed))
        backend.proc.send_signal(signal.SIGHUP)
        text = _wait_log(log, ctl, "SIGHUP: reload done")
        assert "reload: pool.rebalance = 'auto' (was 'advise'): applied" in text
        assert "reload: pool.retry_limit = 7 (was 3): needs a restart, not applied" in text
        assert _mode(ctl) == "auto"
        # ... then the workers are replaced one at a time (a rolling restart).
        text = _wait_log(log, ctl, "roll: 2 worker(s) replaced", 60.0)
        assert "SIGHUP: rolling restart of 2 worker(s)" in text
        _serves(endpoint, 1)

        # A file that does not validate: logged, nothing changes, still serving.
        (tmp_path / "backend.toml").write_text(
            toml_config(backend_sections(tmp_path, pool={"rebalance": "sometimes"}))
        )
        backend.proc.send_signal(signal.SIGHUP)
        text = _wait_log(log, ctl, "configuration not reloaded, nothing changed")
        assert "pool.rebalance = 'sometimes'" in text
        assert _mode(ctl) == "auto"
        _serves(endpoint, 2)

        # SIGUSR1: logged, and the backend stays (it logs to stderr only: nothing to reopen).
        pids = [w["pid"] for w in ctl.request("status")["workers"]]
        backend.proc.send_signal(signal.SIGUSR1)
        _wait_log(log, ctl, "SIGUSR1: no log file to reopen")
        _serves(endpoint, 3)
        assert backend.proc.poll() is None
        assert [w["pid"] for w in ctl.request("status")["workers"]] == pids  # none restarted

        backend.proc.send_signal(signal.SIGTERM)
        assert backend.proc.wait(30) == 0


def test_sighup_keeps_the_command_line_flags_on_top_of_the_file(tmp_path: Path) -> None:
    """`shardpool run -w 3` over a file that says 2 workers: a reload reads the file with the same
    flags again, so the worker count is no change to restart for."""
    sections = backend_sections(tmp_path, pool={"workers": 2})
    log = tmp_path / "backend.log"
    with (
        backend_tools.backend_process(tmp_path, sections, ("-w", "3")) as backend,
        ControlClient(sections["control"]["endpoint"]) as ctl,
    ):
        assert ctl.request("placement")["workers"] == 3
        backend.proc.send_signal(signal.SIGHUP)
        text = _wait_log(log, ctl, "SIGHUP: reload done")
        assert "reload done: 0 keys applied, 0 need a restart" in text, text[-2000:]
        assert "pool.workers" not in text
        backend.proc.send_signal(signal.SIGTERM)
        assert backend.proc.wait(30) == 0


def _datagrams(
    sock: socket.socket, until: Callable[[list[str]], bool], timeout: float
) -> list[str]:
    """Read datagrams from ``sock`` until ``until(all so far)`` holds or ``timeout`` passes."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while not until(got):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"notifications so far: {got}")
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            continue
    return got


def test_sd_notify_ready_watchdog_status_and_stopping(tmp_path: Path) -> None:
    name = f"shardpool-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)  # abstract namespace: NOTIFY_SOCKET=@name
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"}
        sections = backend_sections(tmp_path)
        with backend_tools.backend_process(tmp_path, sections, env=env) as backend:
            got = _datagrams(sock, lambda g: any("READY=1" in d for d in g), 10.0)
            ready = next(d for d in got if "READY=1" in d)
            assert "STATUS=running: 2 workers" in ready
            # The watchdog every half WATCHDOG_USEC: at least two more within ~2 s.
            got += _datagrams(sock, lambda g: sum(d == "WATCHDOG=1" for d in g) >= 2, 10.0)
            backend.proc.send_signal(signal.SIGTERM)
            got += _datagrams(sock, lambda g: any("STOPPING=1" in d for d in g), 30.0)
            assert backend.proc.wait(30) == 0
    lines = [line for d in got for line in d.split("\n")]
    assert lines.index("READY=1") < lines.index("STOPPING=1")
    assert not any(line.startswith("STOPPING") for line in lines[: lines.index("READY=1")])
    stopping = next(d for d in got if "STOPPING=1" in d)
    assert "STATUS=stopping (SIGTERM): draining" in stopping
