"""Operator commands against a real ``shardpool run``: ``undrain`` after ``drain`` (intake, the
demo load and the state in status all come back), ``stop`` passing the backend's exit code on,
and ``--log-format json``."""

from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import backend_tools
import pytest
from service_handlers import backend_sections, toml_config

from shardpool.client import Client
from shardpool.control import ControlClient
from shardpool.logformat import JsonFormatter

pytestmark = pytest.mark.multiprocess


def test_undrain_reopens_intake_the_demo_load_and_the_state(tmp_path: Path) -> None:
    """`shardpool drain` under `--demo-load`, then `shardpool undrain`: producers are accepted
    again, the demo load sends again, status says running / intake open, nothing is out of
    order; a second undrain says intake was open already."""
    sections = backend_sections(
        tmp_path, pool={"workers": 2, "handler": "shardpool.demo.handler:LightningHandler"}
    )
    cfg = str(tmp_path / "backend.toml")
    with (
        backend_tools.backend_process(tmp_path, sections, ("--demo-load", "2000")) as backend,
        ControlClient(sections["control"]["endpoint"], timeout=10.0) as ctl,
        Client(sections["ingress"]["endpoint"], timeout=20.0) as client,
    ):
        assert backend.info["intake"] == "open"
        backend_tools.wait_for(ctl, "status", lambda s: s["demo_load"]["replies"] >= 500)
        out = backend_tools.cli("drain", "-c", cfg, "--timeout", "20")
        assert out.returncode == 0, (out.stdout, out.stderr)
        drained = ctl.request("status")
        svc = drained["service"]
        assert (svc["state"], svc["intake"]) == ("drained", "closed (drained)")
        assert drained["ingress"]["accepting"] is False
        with pytest.raises(Exception) as exc:
            client.call(b"probe", {"x": 1}, timeout=20.0)
        assert getattr(exc.value, "code", None) == "draining"
        # The demo load is stopped: one more status round trip later it has sent nothing more.
        assert ctl.request("status")["demo_load"]["sent"] == drained["demo_load"]["sent"]
        shown = backend_tools.cli("status", "--json", "-c", cfg)
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["service"]["intake"] == "closed (drained)"

        out = backend_tools.cli("undrain", "-c", cfg)
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "intake reopened (was drained)" in out.stdout
        snap = ctl.request("status")
        assert (snap["service"]["state"], snap["service"]["intake"]) == ("running", "open")
        assert snap["ingress"]["accepting"] is True
        sent = drained["demo_load"]["sent"]
        replies = drained["demo_load"]["replies"]
        snap = backend_tools.wait_for(
            ctl,
            "status",
            lambda s: s["demo_load"]["sent"] >= sent + 500
            and s["demo_load"]["replies"] >= replies + 500,
        )
        out = backend_tools.cli("undrain", "-c", cfg)
        assert out.returncode == 0, (out.stdout, out.stderr)
        assert "intake was open already" in out.stdout
    demo = snap["demo_load"]
    assert demo["violations"] == 0 and demo["not_ok"] == 0, demo
    assert snap["order"] == {"gaps": 0, "duplicates": 0, "reorders": 0}


def test_undrain_calls_off_a_waiting_drain(tmp_path: Path) -> None:
    """A drain waiting on a message held in its handler is called off by `shardpool undrain`:
    the drain exits 1 saying so, intake is open at once, and the held message still finishes."""
    gate = tmp_path / "gate"
    sections = backend_sections(tmp_path, pool={"workers": 1, "handler": "handlers:gated"})
    cfg = str(tmp_path / "backend.toml")
    with (
        backend_tools.backend_process(tmp_path, sections),
        ControlClient(sections["control"]["endpoint"], timeout=10.0) as ctl,
        Client(sections["ingress"]["endpoint"], timeout=30.0) as client,
    ):
        held = client.send(b"held", {"gate": str(gate)})
        client.flush()
        backend_tools.wait_for(ctl, "status", lambda s: s["pool"]["inflight"] == 1)
        drain = backend_tools.popen_cli("drain", "-c", cfg, "--timeout", "60")
        try:
            backend_tools.wait_for(ctl, "status", lambda s: s["service"]["state"] == "draining")
            out = backend_tools.cli("undrain", "-c", cfg)
            assert out.returncode == 0, (out.stdout, out.stderr)
            assert "was draining" in out.stdout
            d_out, d_err = drain.communicate(timeout=30)
        finally:
            if drain.poll() is None:
                drain.kill()
                drain.wait(10)
        assert drain.returncode == 1, (d_out, d_err)
        assert "called off" in d_err
        assert ctl.request("ping")["intake"] == "open"
        other = client.send(b"other", {"i": 7})  # accepted again (no 'draining' rejection)
        gate.touch()
        replies = {r.corr: r for r in client.results(timeout=20.0)}
    assert set(replies) == {held, other}
    assert {r.status for r in replies.values()} == {"ok"}


def test_stop_exits_0_after_a_clean_drain(tmp_path: Path) -> None:
    """`shardpool stop` exits with the backend's own code: 0 after a clean drain (the backend
    process itself exits 0 too), and says so."""
    sections = backend_sections(tmp_path)
    cfg = str(tmp_path / "backend.toml")
    with backend_tools.backend_process(tmp_path, sections) as backend:
        with Client(sections["ingress"]["endpoint"], timeout=20.0) as client:
            for i in range(100):
                client.send(b"c%d" % (i % 5), {"p": 0, "i": i // 5})
            client.wait(20.0)
        out = backend_tools.cli("stop", "-c", cfg, "--timeout", "30")
        assert backend.proc.wait(timeout=30) == 0
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert f"backend pid {backend.proc.pid} stopped: clean drain, exit code 0" in out.stdout


def test_stop_passes_on_exit_code_1_when_the_drain_is_not_clean(tmp_path: Path) -> None:
    """A message held in its handler past `supervisor.stop_timeout_s`: the backend ends with
    the message in doubt and exits 1, and `shardpool stop` exits 1 with it, saying why."""
    gate = tmp_path / "gate"  # never opened
    sections = backend_sections(
        tmp_path,
        pool={"workers": 1, "handler": "handlers:gated"},
        supervisor={"stop_timeout_s": 2.0},
    )
    cfg = str(tmp_path / "backend.toml")
    with (
        backend_tools.backend_process(tmp_path, sections) as backend,
        ControlClient(sections["control"]["endpoint"], timeout=10.0) as ctl,
        Client(sections["ingress"]["endpoint"], timeout=30.0) as client,
    ):
        client.send(b"held", {"gate": str(gate)})
        client.flush()
        backend_tools.wait_for(ctl, "status", lambda s: s["pool"]["inflight"] == 1)
        out = backend_tools.cli("stop", "-c", cfg, "--timeout", "30")
        assert backend.proc.wait(timeout=30) == 1
        replies = list(client.results(timeout=20.0))
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "exit code 1" in out.stdout and "not a clean drain" in out.stdout
    assert [r.status for r in replies] == ["in_doubt"]


def test_stop_without_a_backend_says_so_at_once(tmp_path: Path) -> None:
    """No backend: `shardpool stop` and `shardpool undrain` exit 1 at once, naming the cause."""
    sections = backend_sections(tmp_path)
    cfg = tmp_path / "backend.toml"
    cfg.write_text(toml_config(sections))
    for cmd in ("stop", "undrain"):
        t0 = time.monotonic()
        out = backend_tools.cli(cmd, "-c", str(cfg), "--timeout", "30")
        assert out.returncode == 1, (cmd, out.stdout, out.stderr)
        assert "no shardpool backend" in out.stderr, out.stderr
        assert time.monotonic() - t0 < 20


# ------------------------------------------------------------------------- --log-format json


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line of ``text`` parsed as one JSON object with the stable keys."""
    docs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        doc = json.loads(line)  # raises on any line that is not JSON
        assert isinstance(doc, dict), line
        assert list(doc)[:5] == ["ts", "level", "logger", "message", "pid"], line
        ts = datetime.datetime.fromisoformat(doc["ts"].replace("Z", "+00:00"))
        assert ts.utcoffset() == datetime.timedelta(0), line
        assert doc["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), line
        docs.append(doc)
    return docs


def test_run_log_format_json_writes_one_object_per_stderr_line(tmp_path: Path) -> None:
    """`shardpool run --log-format json` through start, a failing message, drain, undrain and
    SIGTERM: every line the backend wrote is one JSON object with ts (UTC), level,
    logger, message and the backend's pid."""
    sections = backend_sections(
        tmp_path, pool={"workers": 2, "handler": "handlers:fail_on", "failure_policy": "skip"}
    )
    cfg = str(tmp_path / "backend.toml")
    with backend_tools.backend_process(tmp_path, sections, ("--log-format", "json")) as backend:
        with Client(sections["ingress"]["endpoint"], timeout=20.0) as client:
            client.send(b"bad", {"fail": True, "i": 1})
            client.send(b"good", {"i": 2})
            client.wait(20.0)
        for cmd in ("drain", "undrain"):
            out = backend_tools.cli(cmd, "-c", cfg)
            assert out.returncode == 0, (cmd, out.stdout, out.stderr)
        backend.proc.send_signal(signal.SIGTERM)
        assert backend.proc.wait(timeout=30) == 0
    docs = _json_lines((tmp_path / "backend.log").read_text())
    assert {d["pid"] for d in docs} == {backend.proc.pid}
    messages = [d["message"] for d in docs]
    assert any(m.startswith("shardpool ") and " running: pid " in m for m in messages)
    assert any(m.startswith("undrain: intake reopened") for m in messages)
    assert any(m.startswith("stopped:") and m.endswith("exit code 0") for m in messages)
    assert {d["logger"] for d in docs} >= {"shardpool.service"}


def test_run_log_format_json_start_up_failure_is_json_too(tmp_path: Path) -> None:
    """A backend that cannot start (its handler module does not exist) with --log-format json:
    the error it prints on stderr comes out as JSON lines too, and it exits 1."""
    sections = backend_sections(tmp_path, pool={"workers": 1, "handler": "no_such_mod:h"})
    cfg = tmp_path / "backend.toml"
    cfg.write_text(toml_config(sections))
    out = backend_tools.cli("run", "-c", str(cfg), "--log-format", "json", timeout=60.0)
    assert out.returncode != 0
    docs = _json_lines(out.stderr)
    assert docs and any("no_such_mod" in d["message"] for d in docs), out.stderr
    assert all(d["level"] in ("ERROR", "CRITICAL", "INFO", "WARNING") for d in docs)


def test_json_formatter_keys_traceback_and_extra_fields() -> None:
    """The formatter itself: exc holds the traceback text, extra fields are included (one
    named like a stable key as extra_<name>), values JSON cannot hold become strings, and a
    multi-line message stays on one line."""
    formatter = JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("shardpool.test").makeRecord(
            "shardpool.test", logging.ERROR, __file__, 1, "line one\nline %d", (2,),
            sys.exc_info(), extra={"worker": 3, "channel": b"\x01", "level": "x"},
        )
    line = formatter.format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["message"] == "line one\nline 2"
    assert doc["level"] == "ERROR" and doc["logger"] == "shardpool.test"
    assert doc["pid"] == os.getpid()
    assert doc["exc"].startswith("Traceback (most recent call last):")
    assert "ValueError: boom" in doc["exc"]
    assert doc["worker"] == 3 and doc["channel"] == "b'\\x01'" and doc["extra_level"] == "x"
    assert doc["ts"].endswith("Z")
    plain = json.loads(formatter.format(logging.makeLogRecord({"msg": "hi"})))
    assert "exc" not in plain and plain["message"] == "hi"
