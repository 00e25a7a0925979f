"""``shardpool run`` as users start it: a subprocess with producers in other processes, signals,
the control socket (status/drain/stop), metrics and CPU pinning."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import backend_tools
import psutil
import pytest
from service_handlers import backend_sections, in_process_backend, subprocess_env

from shardpool.client import Client
from shardpool.control import ControlClient
from shardpool.status import render_status

pytestmark = pytest.mark.multiprocess


_env = subprocess_env


@contextlib.contextmanager
def backend_process(
    tmp_path: Path, sections: dict[str, dict[str, Any]]
) -> Iterator[tuple[subprocess.Popen[bytes], Path, dict[str, Any]]]:
    """:func:`backend_tools.backend_process` as ``(process, config path, ready info)``."""
    with backend_tools.backend_process(tmp_path, sections) as backend:
        yield backend.proc, tmp_path / "backend.toml", backend.info


def _status(cfg: Path) -> dict[str, Any]:
    out = backend_tools.cli("status", "--json", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _wait_status(cfg_or_ctl: ControlClient, cond: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Ask for status until ``cond(snapshot)`` holds; each answer is a fresh reply, not a sleep."""
    deadline = time.monotonic() + timeout
    while True:
        snap = cfg_or_ctl.request("status")
        if cond(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"status never satisfied the condition; last: {snap}")
        cfg_or_ctl.request("ping", timeout=1.0)  # one round trip between polls


def test_end_to_end_producers_order_status_and_sigterm(tmp_path: Path) -> None:
    channels, per_producer, producers = 3000, 10_000, 3
    sections = backend_sections(tmp_path)
    with backend_process(tmp_path, sections) as (proc, cfg, info):
        assert info["pid"] == proc.pid and info["state"] == "running"
        endpoint = sections["ingress"]["endpoint"]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import service_handlers as s; s.produce_main()",
                    endpoint,
                    str(p),
                    str(channels),
                    str(per_producer),
                    "7",
                    "async" if p == 0 else "sync",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_env(),
            )
            for p in range(producers)
        ]
        summaries = []
        try:
            for p in procs:
                out, err = p.communicate(timeout=120)
                assert p.returncode == 0, err.decode()
                summaries.append(json.loads(out))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
        for s in summaries:
            assert s["sent"] == s["replies"] == s["ok"] == per_producer, s
            assert s["n_errors"] == 0, s["errors"]

        total = producers * per_producer
        snap = _status(cfg)
        pool, ing = snap["pool"], snap["ingress"]
        assert pool["state"] == "running"
        assert pool["submitted"] == pool["acknowledged"] == pool["results"] == total
        assert pool["failures"] == pool["inflight"] == pool["restarts"] == 0
        assert ing["accepted"] == ing["replies"] == ing["ok"] == total
        assert ing["rejected"] == ing["frame_errors"] == 0
        assert sum(w["processed"] for w in snap["workers"]) == total
        assert sum(w["channels"] for w in snap["workers"]) == channels
        assert snap["order"] == {"gaps": 0, "duplicates": 0, "reorders": 0}
        assert all(w["state"] == "ready" for w in snap["workers"])
        pids = [w["pid"] for w in snap["workers"]]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    for pid in pids:
        assert not psutil.pid_exists(pid), f"worker {pid} outlived the backend"


def test_drain_then_stop_through_the_control_socket(tmp_path: Path) -> None:
    sections = backend_sections(tmp_path)
    with backend_process(tmp_path, sections) as (proc, cfg, _):
        with Client(sections["ingress"]["endpoint"], timeout=20.0) as client:
            for i in range(200):
                client.send(b"c%d" % (i % 7), {"p": 0, "i": i // 7})
            client.wait(20.0)
            out = backend_tools.cli("drain", "-c", str(cfg), "--timeout", "20")
            assert out.returncode == 0, out.stderr
            assert "drained" in out.stdout
            with pytest.raises(Exception) as exc:
                client.call(b"c0", {"p": 0, "i": 29}, timeout=20.0)
            assert getattr(exc.value, "code", None) == "draining"
        snap = _status(cfg)
        assert snap["service"]["state"] == "drained"
        assert snap["ingress"]["accepting"] is False
        assert snap["pool"]["acknowledged"] == 200
        out = backend_tools.cli("stop", "-c", str(cfg), "--timeout", "30")
        assert out.returncode == 0, out.stderr
        assert proc.wait(timeout=30) == 0


def test_sigterm_with_work_in_flight_drains_it_and_exits_0(tmp_path: Path) -> None:
    """SIGTERM while 400 messages are in flight (held by a gate the test opens only after the
    signal): every accepted message is processed and answered ok within the drain deadline, the
    exit code is 0, and no worker process is left."""
    gate = tmp_path / "gate"
    sections = backend_sections(
        tmp_path,
        pool={"workers": 2, "handler": "handlers:gated"},
        supervisor={"stop_timeout_s": 30.0},
    )
    n = 400
    with (
        backend_process(tmp_path, sections) as (proc, _cfg, _),
        Client(sections["ingress"]["endpoint"], timeout=30.0) as client,
        ControlClient(sections["control"]["endpoint"]) as ctl,
    ):
        sent = [
            client.send(b"slow-%d" % (i % 40), {"gate": str(gate), "i": i}) for i in range(n)
        ]
        client.flush()
        snap = _wait_status(ctl, lambda s: s["pool"]["inflight"] == n)
        pids = [w["pid"] for w in snap["workers"]]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _wait_status(ctl, lambda s: s["service"]["state"] == "stopping")
        gate.touch()  # the in-flight work can finish now, during the drain phase
        assert proc.wait(timeout=60) == 0
        assert time.monotonic() - t0 < 30  # within supervisor.stop_timeout_s
        replies = list(client.results(timeout=10.0))
    assert sorted(r.corr for r in replies) == sorted(sent)
    assert {r.status for r in replies} == {"ok"}
    for pid in pids:
        assert not psutil.pid_exists(pid), f"worker {pid} outlived the backend"


def test_second_signal_forces_exit_and_unsettled_work_is_answered(tmp_path: Path) -> None:
    """A second SIGTERM cuts the drain short and stops the workers at once. The message stuck in
    its handler may have been applied: its producer is told ``in_doubt``. Killed before it could
    report, the worker cannot say whether it started the one queued behind: that one is answered
    ``in_doubt`` too unless its report came first (then ``closed``)."""
    gate = tmp_path / "never"
    sections = backend_sections(
        tmp_path,
        pool={"workers": 1, "handler": "handlers:gated"},
        supervisor={"stop_timeout_s": 120.0},
    )
    with backend_process(tmp_path, sections) as (proc, _cfg, _):
        with (
            Client(sections["ingress"]["endpoint"], timeout=20.0) as client,
            ControlClient(sections["control"]["endpoint"]) as ctl,
        ):
            corr = client.send(b"stuck", {"gate": str(gate), "i": 0})
            behind = client.send(b"stuck", {"i": 1})
            client.flush()
            _wait_status(ctl, lambda s: s["pool"]["inflight"] == 2)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _wait_status(ctl, lambda s: s["service"]["state"] == "stopping")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 1
            # Far less than the 120 s drain deadline: the second signal cut it short.
            assert time.monotonic() - t0 < 30
            replies = list(client.results(timeout=10.0))
        assert [r.corr for r in replies] == [corr, behind]
        assert replies[0].status == "in_doubt" and replies[0].value["error"] == "in_doubt"
        assert replies[1].status in ("in_doubt", "closed")


def test_stop_deadline_answers_in_doubt_and_closed_apart(tmp_path: Path) -> None:
    """SIGTERM with a handler stuck past the drain deadline: the worker is asked to stop, says
    which call is running, and is killed at the deadline. Its producer learns exactly which
    message may have been applied (``in_doubt``) and which never reached the handler
    (``closed``); finished ones are ``ok``; the exit code says the stop was not clean."""
    gate = tmp_path / "never"
    sections = backend_sections(
        tmp_path,
        pool={"workers": 1, "handler": "handlers:gated"},
        supervisor={"stop_timeout_s": 4.0},
    )
    with (
        backend_process(tmp_path, sections) as (proc, _cfg, _),
        Client(sections["ingress"]["endpoint"], timeout=20.0) as client,
        ControlClient(sections["control"]["endpoint"]) as ctl,
    ):
        done = client.send(b"free", {"i": 0})
        stuck = client.send(b"stuck", {"gate": str(gate), "i": 0})
        behind = [client.send(b"stuck", {"i": i}) for i in range(1, 4)]
        client.flush()
        _wait_status(
            ctl, lambda s: s["pool"]["acknowledged"] == 1 and s["pool"]["inflight"] == 4
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 1
        replies = {r.corr: r.status for r in client.results(timeout=10.0)}
    assert replies == {done: "ok", stuck: "in_doubt", **{c: "closed" for c in behind}}
    log = (tmp_path / "backend.log").read_text()
    assert "3 accepted messages were never handed to the handler" in log
    assert "1 may have been applied" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_endpoint_and_worker_pinning(tmp_path: Path) -> None:
    port = _free_port()
    with in_process_backend(
        tmp_path,
        pool={"pin_workers": True},
        metrics={"enabled": True, "host": "127.0.0.1", "port": port},
    ) as svc:
        with Client(svc.ingress_endpoint, timeout=20.0) as client:
            for i in range(50):
                client.send(b"m%d" % (i % 5), {"p": 0, "i": i // 5})
            assert all(r.ok for r in client.results(timeout=20.0))
        with urllib.request.urlopen(svc.metrics_url, timeout=10) as resp:
            text = resp.read().decode()
        assert "shardpool_up 1.0" in text
        assert "shardpool_messages_acknowledged_total 50.0" in text
        assert 'shardpool_ingress_replies_total{status="ok"} 50.0' in text
        assert 'shardpool_worker_reorders_total{worker="0"} 0.0' in text
        cpus = sorted(psutil.Process().cpu_affinity())
        for i, pid in enumerate(svc.pool.worker_pids()):
            assert psutil.Process(pid).cpu_affinity() == [cpus[i % len(cpus)]]


def test_operator_skips_a_halted_channel_through_the_control_socket(tmp_path: Path) -> None:
    with (
        in_process_backend(
            tmp_path, pool={"workers": 2, "handler": "handlers:fail_on", "failure_policy": "halt"}
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0) as client,
        ControlClient(svc.control_endpoint) as ctl,
    ):
        bad = client.send(b"chan-h", {"i": 0, "fail": True})
        later = client.send(b"chan-h", {"i": 1})
        other = client.send(b"chan-o", {"i": 2})
        assert client.call(b"chan-o", {"i": 3}, timeout=20.0) == 3  # others are not held
        _wait_status(ctl, lambda s: s["pool"]["halted_channels"] == 1)
        with pytest.raises(Exception, match="not halted"):
            ctl.request("resume", {"channel": b"chan-o".hex()})
        out = backend_tools.cli("skip", b"chan-h".hex(), "--endpoint", svc.control_endpoint)
        assert out.returncode == 0, out.stderr
        replies = {r.corr: r for r in client.results(timeout=20.0)}
    finals = {c: r for c, r in replies.items() if r.status != "halted"}
    assert finals[bad].status == "failed"
    assert finals[later].ok and finals[later].value == 1
    assert finals[other].ok and finals[other].value == 2


def test_quarantined_channel_shows_in_status_log_and_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A message that kills its worker every time quarantines its channel: the pool goes on, the
    producer gets a HALTED notice, status lists the channel with the cause, metrics count it, the
    log says it, and `shardpool skip` lets the channel go on."""
    port = _free_port()
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 2, "handler": "service_handlers:poisonable"},
            supervisor={"restart_backoff_s": 0.01, "max_restarts": 2},
            metrics={"enabled": True, "host": "127.0.0.1", "port": port},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=60.0) as client,
        ControlClient(svc.control_endpoint) as ctl,
    ):
        poison = client.send(b"chan-p", {"i": 0, "die": True})
        behind = client.send(b"chan-p", {"i": 1})
        others = {client.send(b"chan-%d" % k, {"i": k}): k for k in range(50)}
        client.flush()
        snap = _wait_status(ctl, lambda s: s["pool"]["quarantined"] == 1, timeout=60.0)
        [halt] = snap["pool"]["halted"]
        assert (halt["channel"], halt["seq"], halt["quarantined"]) == (b"chan-p".hex(), 0, True)
        assert "exited with code 71" in halt["error"] and halt["type"] == "WorkerDied"
        assert snap["pool"]["state"] == "running"
        table = render_status(snap, width=200)
        assert "QUARANTINED" in table and "  chan-p  seq 0  QUARANTINED" in table
        with urllib.request.urlopen(svc.metrics_url, timeout=10) as resp:
            assert "shardpool_quarantined_total 1.0" in resp.read().decode()
        out = backend_tools.cli("skip", b"chan-p".hex(), "--endpoint", svc.control_endpoint)
        assert out.returncode == 0, out.stderr
        replies = list(client.results(timeout=30.0))
    by_corr: dict[int, list[Any]] = {}
    for r in replies:
        by_corr.setdefault(r.corr, []).append(r)
    assert [r.status for r in by_corr[poison]] == ["halted", "failed"]
    assert by_corr[poison][0].value["policy"] == "quarantine"
    assert [(r.status, r.value[1]) for r in by_corr[behind]] == [("ok", 1)]
    for corr, k in others.items():
        assert [(r.status, r.value[1]) for r in by_corr[corr]] == [("ok", k)]
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("quarantined at seq 0" in m and "exited with code 71" in m for m in logged)
