"""The Prometheus endpoint of ``shardpool run``: every exposed name and label follows Prometheus'
naming rules (scraped from a real in-process backend and parsed with prometheus-client's own text
parser), build info, 404 off ``/metrics``, the oldest-unacknowledged age while a handler holds a
message, and the window's timing (oldest batch, latency histogram) without processes."""

from __future__ import annotations

import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cbor2
import psutil
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from service_handlers import in_process_backend

from shardpool import __version__, codec
from shardpool.client import Client
from shardpool.front import Window
from shardpool.front.window import LATENCY_BOUNDS

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
# Every label the endpoint may use: each has a bounded set of values (no channel ids, no top-N);
# ``host`` (shardpool_worker_info) has one value per worker.
_LABELS = {"worker", "result", "error", "status", "version", "python", "host"}
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Units other than the base ones (seconds, bytes), and percentages, are not allowed in a name.
_NON_BASE = re.compile(r"(percent|_ms|_us|_ns|_millis|_kb|_mb|_gb|_kib|_mib|_minutes|_hours)(_|$)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(url: str) -> dict[str, Metric]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {m.name: m for m in text_string_to_metric_families(text)}


def _name_problems(name: str, fam: Metric) -> list[str]:
    problems: list[str] = []
    if not _NAME.match(name) or not name.startswith(("shardpool_", "process_")):
        problems.append(f"{name}: not a shardpool_* or process_* name")
    if _NON_BASE.search(name):
        problems.append(f"{name}: a non-base unit or a percentage in the name")
    for unit in ("_seconds", "_bytes"):
        if unit in name and not name.endswith(unit):
            problems.append(f"{name}: the unit {unit} is not the name's last part")
    if fam.type == "gauge" and name.endswith(("_total", *_HISTOGRAM_SUFFIXES)):
        problems.append(f"{name}: a gauge named like a counter or a histogram part")
    return problems


def _sample_problems(name: str, fam: Metric) -> list[str]:
    problems: list[str] = []
    parts = {name + s for s in (*_HISTOGRAM_SUFFIXES, "_created")}
    for sample in fam.samples:
        if fam.type == "counter" and not sample.name.endswith(("_total", "_created")):
            problems.append(f"{sample.name}: a counter not ending _total")
        if fam.type == "histogram" and sample.name not in parts:
            problems.append(f"{sample.name}: not a part of histogram {name}")
        for label in sample.labels:
            if not _LABEL.match(label):
                problems.append(f"{sample.name}: label {label!r} is not a valid name")
            elif label == "le" and fam.type == "histogram":
                continue
            elif name.startswith("shardpool_") and label not in _LABELS:
                problems.append(f"{sample.name}: label {label!r} has no bounded value set")
    return problems


def _naming_problems(families: dict[str, Metric]) -> list[str]:
    """What in ``families`` breaks Prometheus' naming rules (empty: nothing)."""
    return [
        p
        for name, fam in families.items()
        for p in (*_name_problems(name, fam), *_sample_problems(name, fam))
    ]


def _by_worker(fam: Metric, sample_name: str | None = None) -> dict[str, float]:
    return {
        s.labels["worker"]: s.value
        for s in fam.samples
        if sample_name is None or s.name == sample_name
    }


def test_every_metric_name_and_label_follows_the_naming_rules(tmp_path: Path) -> None:
    with in_process_backend(
        tmp_path,
        pool={"workers": 2},
        metrics={"enabled": True, "host": "127.0.0.1", "port": _free_port()},
    ) as svc:
        with Client(svc.ingress_endpoint, timeout=20.0) as client:
            for i in range(40):
                client.send(b"m%d" % (i % 8), {"p": 0, "i": i // 8})
            assert all(r.ok for r in client.results(timeout=20.0))
        svc.pool.pin(b"m1", 1 - svc.pool.worker_of(b"m1"))
        families = _scrape(svc.metrics_url)

        assert _naming_problems(families) == []
        [info] = families["shardpool_build_info"].samples
        assert info.value == 1 and info.labels["version"] == __version__
        assert re.fullmatch(r"\d+\.\d+\.\d+.*", info.labels["python"])
        assert families["shardpool_up"].samples[0].value == 1
        # Worker figures: CPU as a counter of seconds, not a percentage; the time-based lag.
        assert families["shardpool_worker_cpu_seconds"].type == "counter"
        cpu = _by_worker(families["shardpool_worker_cpu_seconds"])
        assert set(cpu) == {"0", "1"}
        for index, pid in enumerate(svc.pool.worker_pids()):
            # The worker process's own user + system time (read after the scrape: not less).
            # A worker forked from the fork server may not have used a whole clock tick yet.
            assert pid is not None
            times = psutil.Process(pid).cpu_times()
            assert 0 <= cpu[str(index)] <= times.user + times.system + 1e-6
        lag = _by_worker(families["shardpool_worker_oldest_unacked_age_seconds"])
        assert lag == {"0": 0.0, "1": 0.0}  # idle: nothing in flight
        latency = families["shardpool_batch_latency_seconds"]
        assert latency.type == "histogram"
        counts = _by_worker(latency, "shardpool_batch_latency_seconds_count")
        assert sum(counts.values()) == 40  # every finished message counted once
        buckets = [s for s in latency.samples if s.name.endswith("_bucket")]
        assert len(buckets) == 2 * (len(LATENCY_BOUNDS) + 1)
        assert families["shardpool_saturated_channels"].type == "gauge"
        # The front process itself, from prometheus-client's ProcessCollector (Linux: /proc).
        if Path("/proc/self/stat").exists():
            assert "process_cpu_seconds" in families
            assert "process_resident_memory_bytes" in families
        # Gone: per-channel series (top-N churn) and the CPU percentage.
        text = " ".join(families)
        assert "hot_channel" not in text and "channel_saturated" not in text
        assert "percent" not in text

        base = svc.metrics_url.removesuffix("/metrics")
        for path in ("/", "/nope", "/metrics/extra", "/favicon.ico"):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(base + path, timeout=10)
            assert err.value.code == 404, path
            assert b"/metrics" in err.value.read()


def test_the_naming_check_catches_what_it_is_for() -> None:
    """The rules above are not vacuous: each old or bad form is caught."""
    text = "\n".join(
        [
            "# TYPE shardpool_worker_cpu_percent gauge",
            'shardpool_worker_cpu_percent{worker="0"} 12.0',
            "# TYPE shardpool_hot_channel_messages gauge",
            'shardpool_hot_channel_messages{channel="ab",worker="0"} 3.0',
            "# TYPE shardpool_wait_seconds_max gauge",
            "shardpool_wait_seconds_max 1.0",
            "# TYPE shardpool_lag_ms gauge",
            "shardpool_lag_ms 1.0",
            "# TYPE shardpool_sent_total gauge",
            "shardpool_sent_total 1.0",
            "",
        ]
    )
    families = {m.name: m for m in text_string_to_metric_families(text)}
    problems = "\n".join(_naming_problems(families))
    for what in ("cpu_percent", "label 'channel'", "_seconds is not", "shardpool_lag_ms",
                 "shardpool_sent_total: a gauge"):
        assert what in problems, (what, problems)


def _ages(url: str) -> dict[str, float]:
    return _by_worker(_scrape(url)["shardpool_worker_oldest_unacked_age_seconds"])


def test_oldest_unacked_age_grows_while_a_handler_holds_a_message(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 2, "handler": "handlers:gated"},
            metrics={"enabled": True, "host": "127.0.0.1", "port": _free_port()},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=30.0) as client,
    ):
        held_worker = str(svc.pool.worker_of(b"slow"))
        corr = client.send(b"slow", {"i": 0, "gate": str(gate)})
        client.flush()
        deadline = time.monotonic() + 20.0
        first = _ages(svc.metrics_url)[held_worker]
        while first <= 0.0:  # until the message has reached the window
            assert time.monotonic() < deadline, "the held message never showed in the age"
            first = _ages(svc.metrics_url)[held_worker]
        # It keeps growing while the handler holds the message, on its worker only.
        while (ages := _ages(svc.metrics_url))[held_worker] <= first + 0.05:
            assert time.monotonic() < deadline, f"the age did not grow: {ages}"
        assert all(v == 0.0 for w, v in ages.items() if w != held_worker), ages
        gate.touch()
        [reply] = client.results(timeout=20.0)
        assert reply.corr == corr and reply.ok
        assert _ages(svc.metrics_url) == {"0": 0.0, "1": 0.0}


# --------------------------------------------------------------- the window's timing, no processes


def _fill(win: Window, items: list[tuple[bytes, int]]) -> None:
    for cid, cseq in items:
        win.place(codec.item_prefix(cid), cseq, cbor2.dumps([cid.decode(), cseq]), None)


def test_window_oldest_at_is_the_oldest_unfinished_batch() -> None:
    win = Window(0)
    assert win.oldest_at() is None
    _fill(win, [(b"a", 0)])
    assert win.oldest_at() is None  # pending (at most the linger) is not counted
    first = win.seal(1)
    _fill(win, [(b"b", 0)])
    second = win.seal(1)
    first.at, second.at = 100.0, 200.0
    assert win.oldest_at() == 100.0
    win.finish_range(0, 1, [])
    assert win.oldest_at() == 200.0
    win.finish_range(1, 2, [])
    assert win.oldest_at() is None


def test_a_replay_keeps_each_message_s_first_send_time() -> None:
    win = Window(0)
    _fill(win, [(b"a", 0), (b"b", 0)])
    old = win.seal(1)
    old.sent, old.at = True, 50.0
    _fill(win, [(b"a", 1)])
    newer = win.seal(1)
    newer.sent, newer.at = True, 60.0
    win.worker_died(taken=0, said_bye=False, reported=False)  # old in doubt, newer unread
    replay = win.take_for_replay(2, batch_size=256)
    assert [b.at for b in replay.batches] == [50.0, 60.0]
    assert win.oldest_at() == 50.0


def test_latency_histogram_counts_each_message_once_per_finished_batch() -> None:
    win = Window(0)
    _fill(win, [(b"a", 0), (b"b", 0), (b"c", 0)])
    batch = win.seal(1)
    batch.at = time.monotonic() - 0.003  # sealed 3 ms ago: the (2.5 ms, 5 ms] bucket
    win.finish_range(0, 1, [])  # one message alone: the batch is not finished yet
    assert sum(win.latency) == 0
    found = win.open(2)
    assert found is not None
    win.finish_one(found[0], 2)
    win.finish_range(1, 2, [])
    bucket = LATENCY_BOUNDS.index(0.005)
    assert win.latency[bucket] == 3 and sum(win.latency) == 3
    assert 0.009 <= win.latency_sum < 3 * 1.0
    # Messages taken out by a move (extract) did not finish: not counted.
    _fill(win, [(b"d", 0)])
    win.seal(1)
    assert [item[0] for item, _ in win.extract({b"d"})] == [b"d"]
    assert sum(win.latency) == 3


def test_a_failed_snapshot_still_answers_up_0() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from shardpool.metrics import SnapshotCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(broken))
    assert "shardpool_up 0.0" in generate_latest(registry).decode()


def _synthetic_snapshot(remote: bool) -> dict[str, Any]:
    """A snapshot as :meth:`Figures.snapshot` gives it, without processes: worker 0 local and,
    with ``remote``, worker 1 remote and up, worker 2 remote and away (the summary's ``workers``
    keyed by strings, as through the control socket's JSON)."""
    from shardpool.metrics import _INGRESS_COUNTERS, _POOL_COUNTERS

    pool: dict[str, Any] = {key: 0 for key, _ in _POOL_COUNTERS}
    pool.update(inflight=0, halted_channels=0, channels=0, remote=None)
    ingress: dict[str, Any] = {key: 0 for key, _ in _INGRESS_COUNTERS}
    ingress.update(dict.fromkeys(
        ("ok", "failed", "closed", "in_doubt", "halted", "rejected", "producers", "held_replies",
         "stalled_producers"), 0))
    worker = {"state": "ready", "restarts": 0, "epoch": 1}
    workers = [{**worker, "index": 0, "remote": False, "host": "local", "link": "ipc"}]
    if remote:
        reports = {
            1: {"remote": True, "worker_id": "east-1", "host": "east-1.example", "pid": 51,
                "link": "up", "lease_age_s": 0.25, "rtt_s": 0.002, "weight": 1.0,
                "failovers": 1, "failover_s": [0.5], "last_lost": "lease expired",
                "state": "ready"},
            2: {"remote": True, "worker_id": "west-7", "host": "?", "pid": None,
                "link": "away", "lease_age_s": None, "rtt_s": None, "weight": 1.0,
                "failovers": 3, "failover_s": [0.4, 0.6, 0.7], "last_lost": "lease expired",
                "state": "away"},
        }
        workers += [{**worker, **r, "index": i} for i, r in reports.items()]
        pool["remote"] = {
            "endpoint": "tcp://0.0.0.0:7100", "refused": 2, "auth_failures": 1,
            "impersonations": 4, "stray_frames": 5, "failovers": 4, "joins": 6,
            "workers": {str(i): r for i, r in reports.items()},
        }
    return {"pool": pool, "workers": workers, "placement": None, "ingress": ingress,
            "dead_letters": None}


def _collect(snap: dict[str, Any]) -> dict[str, Metric]:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from shardpool.metrics import SnapshotCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    text = generate_latest(registry).decode()
    return {m.name: m for m in text_string_to_metric_families(text)}


def test_remote_workers_host_link_lease_round_trip_and_counters() -> None:
    families = _collect(_synthetic_snapshot(remote=True))
    assert _naming_problems(families) == []
    info = {s.labels["worker"]: (s.labels["host"], s.value)
            for s in families["shardpool_worker_info"].samples}
    assert info == {"0": ("local", 1), "1": ("east-1.example", 1), "2": ("?", 1)}
    assert _by_worker(families["shardpool_worker_remote"]) == {"0": 0, "1": 1, "2": 1}
    assert _by_worker(families["shardpool_worker_link_up"]) == {"0": 1, "1": 1, "2": 0}
    # remote workers only, and only with a value (the away one has neither)
    assert _by_worker(families["shardpool_worker_lease_age_seconds"]) == {"1": 0.25}
    assert _by_worker(families["shardpool_worker_rtt_seconds"]) == {"1": 0.002}
    failovers = families["shardpool_worker_failovers"]
    assert failovers.type == "counter"
    assert _by_worker(failovers, "shardpool_worker_failovers_total") == {"1": 1, "2": 3}
    for key, value in (("refused", 2), ("auth_failures", 1), ("impersonations", 4),
                       ("joins", 6), ("failovers", 4), ("stray_frames", 5)):
        fam = families[f"shardpool_remote_{key}"]
        assert fam.type == "counter"
        assert [(s.name, s.value) for s in fam.samples] == [
            (f"shardpool_remote_{key}_total", value)]

    # No remote workers configured: every worker local and up, no remote series, no counters.
    local = _collect(_synthetic_snapshot(remote=False))
    assert _naming_problems(local) == []
    assert _by_worker(local["shardpool_worker_remote"]) == {"0": 0}
    assert _by_worker(local["shardpool_worker_link_up"]) == {"0": 1}
    for name in ("shardpool_worker_lease_age_seconds", "shardpool_worker_rtt_seconds",
                 "shardpool_worker_failovers"):
        assert not local.get(name) or not local[name].samples, name
    assert not any(name.startswith("shardpool_remote_") for name in local)


def test_remote_reports_come_from_the_summary_when_a_worker_lacks_them() -> None:
    """A snapshot whose workers carry no remote fields still gets them from the summary's
    reports (keyed by int indices, as in process)."""
    snap = _synthetic_snapshot(remote=True)
    remote = snap["pool"]["remote"]
    remote["workers"] = {int(i): r for i, r in remote["workers"].items()}
    for w in snap["workers"][1:]:
        for key in ("remote", "host", "link", "lease_age_s", "rtt_s", "failovers"):
            del w[key]
    families = _collect(snap)
    assert _by_worker(families["shardpool_worker_link_up"]) == {"0": 1, "1": 1, "2": 0}
    assert _by_worker(families["shardpool_worker_rtt_seconds"]) == {"1": 0.002}
