"""Prometheus metrics of ``shardpool run`` (prometheus-client), off unless ``metrics.enabled``.

The figures are those of ``shardpool status``, read from one snapshot per scrape (a custom
collector, so nothing is double-counted or kept in sync by hand). Names are ``shardpool_*``;
per-worker series carry a ``worker`` label, ingress rejections an ``error`` label (the protocol's
error code), replies a ``status`` label. Worker counters restart at 0 when a worker is restarted,
which Prometheus' ``rate()`` handles as a counter reset.

Placement (the worker count changes with a resize: per-worker series come and go with their
worker): ``shardpool_workers``, ``shardpool_worker_slots``, ``shardpool_worker_load`` (share of
a core), ``shardpool_worker_load_share`` (of the pool's measured load),
``shardpool_moves_in_progress``, ``shardpool_moves_total{result}`` (committed, aborted),
``shardpool_move_pause_p50_seconds`` / ``_p99_seconds`` (over the recent moves),
``shardpool_pinned_channels``, ``shardpool_channel_saturated{channel}`` (1 for each channel that
keeps a core busy), ``shardpool_resize_in_progress`` and ``shardpool_resize_target_workers``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("shardpool.metrics")

__all__ = ["MetricsServer", "SnapshotCollector"]

Snapshot = Callable[[], dict[str, Any]]

_POOL_COUNTERS = (
    ("submitted", "messages accepted by the front"),
    ("acknowledged", "messages finished (processed, or failed for good)"),
    ("results", "messages whose handler returned a value"),
    ("failures", "handler failures reported"),
    ("restarts", "worker restarts"),
    ("replayed", "messages re-sent to a restarted worker"),
    ("quarantined", "channels quarantined because their worker kept dying on one message"),
    ("forgotten", "channel records dropped (ended, or idle past pool.channel_idle_expiry_s)"),
)
_WORKER_COUNTERS = (
    ("processed", "messages processed by this worker incarnation"),
    ("failed", "handler failures"),
    ("retried", "handler retries"),
    ("redelivered", "messages received marked redelivered"),
    ("gaps", "per-channel sequence gaps seen (order violation; 0 when healthy)"),
    ("duplicates", "per-channel duplicate sequence numbers seen (0 when healthy)"),
    ("reorders", "per-channel out-of-order sequence numbers seen (0 when healthy)"),
)
_WORKER_GAUGES = (
    ("channels", "channels", "channels this worker has seen"),
    ("queued", "queued", "messages waiting in per-channel queues"),
    ("inflight", "inflight", "messages sent to this worker and not acknowledged"),
    ("busy_channels", "busy_channels", "channels with a handler call running"),
    ("halted_channels", "halted_channels", "channels parked after a failure"),
    ("loop_lag_s", "loop_lag_seconds", "event-loop lag at the last heartbeat"),
    ("cpu_percent", "cpu_percent", "CPU use of the worker process (100 = one core)"),
    ("rss_bytes", "rss_bytes", "resident memory of the worker process"),
    ("epoch", "epoch", "incarnation number of the worker"),
)
_INGRESS_COUNTERS = (
    ("frames", "frames received"),
    ("messages", "message items received"),
    ("accepted", "messages accepted into the pool"),
    ("frame_errors", "frames refused as unreadable"),
    ("backpressure_waits", "times the ingress stopped reading because a window was full"),
    ("auth_failures", "producers that failed the CURVE handshake"),
    ("undeliverable", "replies whose producer had gone"),
    ("internal_errors", "frames or items whose handling failed (answered internal_error, logged)"),
    ("refused_frames", "frames refused whole: their producer reads none of its replies"),
    ("refused_messages", "messages in frames refused whole"),
    ("stalled_sends", "reply frames ZeroMQ could not take yet (the producer reads slowly)"),
)


def _up(value: int) -> Metric:
    up = GaugeMetricFamily("shardpool_up", "1 if the backend answered the scrape")
    up.add_metric([], value)
    return up


def _counter(name: str, doc: str, value: float) -> Metric:
    c = CounterMetricFamily(name, doc)
    c.add_metric([], value)
    return c


def _gauge(name: str, doc: str, value: float) -> Metric:
    g = GaugeMetricFamily(name, doc)
    g.add_metric([], value)
    return g


def _pool_metrics(pool: dict[str, Any]) -> Iterator[Metric]:
    for key, doc in _POOL_COUNTERS:
        messages = key in ("submitted", "acknowledged")
        yield _counter(f"shardpool_messages_{key}" if messages else f"shardpool_{key}", doc,
                       pool[key])
    for key, doc in (
        ("inflight", "messages in flight"),
        ("halted_channels", "halted channels (quarantined ones included)"),
        ("channels", "channel records the front holds"),
    ):
        yield _gauge(f"shardpool_{key}", doc, pool[key])


def _worker_metrics(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    for key, doc in _WORKER_COUNTERS:
        c = CounterMetricFamily(f"shardpool_worker_{key}", doc, labels=["worker"])
        for w in workers:
            c.add_metric([str(w["index"])], w.get(key, 0))
        yield c
    for key, name, doc in _WORKER_GAUGES:
        g = GaugeMetricFamily(f"shardpool_worker_{name}", doc, labels=["worker"])
        for w in workers:
            if w.get(key) is not None:
                g.add_metric([str(w["index"])], w[key])
        yield g
    c = CounterMetricFamily(
        "shardpool_worker_restarts", "restarts of this worker slot", labels=["worker"]
    )
    for w in workers:
        c.add_metric([str(w["index"])], w["restarts"])
    yield c
    g = GaugeMetricFamily("shardpool_worker_ready", "1 if the worker is ready", labels=["worker"])
    for w in workers:
        g.add_metric([str(w["index"])], 1 if w["state"] == "ready" else 0)
    yield g


def _placement_metrics(place: dict[str, Any]) -> Iterator[Metric]:
    moves, resize = place["moves"], place["resize"]
    levelling = place.get("levelling") or {}
    yield _gauge("shardpool_workers", "worker processes (changes with a resize)", place["workers"])
    g = GaugeMetricFamily(
        "shardpool_worker_slots", "routing slots this worker owns", labels=["worker"]
    )
    for i, n in enumerate(place["slots_per_worker"]):
        g.add_metric([str(i)], n)
    yield g
    for key, name, doc in (
        ("load", "load", "measured load of the slots this worker owns, in shares of a core"),
        ("load_share", "load_share", "this worker's share of the pool's measured load (0..1)"),
    ):
        g = GaugeMetricFamily(f"shardpool_worker_{name}", doc, labels=["worker"])
        for i, x in enumerate(levelling.get(key) or ()):
            g.add_metric([str(i)], x)
        yield g
    yield _gauge("shardpool_moves_in_progress", "slot or channel moves under way",
                 len(moves["in_progress"]))
    c = CounterMetricFamily("shardpool_moves", "moves ended, by result", labels=["result"])
    for result in ("committed", "aborted"):
        c.add_metric([result], moves[result])
    yield c
    for q, key in (("p50", "pause_p50_s"), ("p99", "pause_p99_s")):
        g = GaugeMetricFamily(
            f"shardpool_move_pause_{q}_seconds",
            f"{q} of how long the recent moves held their channels' messages (fence to commit)",
        )
        if moves.get(key) is not None:
            g.add_metric([], moves[key])
        yield g
    yield _gauge("shardpool_pinned_channels", "channels pinned to a worker ahead of the slot table",
                 len(place.get("pins") or ()))
    g = GaugeMetricFamily(
        "shardpool_channel_saturated",
        "1 for a channel that keeps a whole core busy (its order forbids splitting it)",
        labels=["channel"],
    )
    for cid in levelling.get("saturated") or ():
        g.add_metric([str(cid)], 1)
    yield g
    yield _gauge("shardpool_resize_in_progress", "1 while the worker count is changing",
                 1 if resize["in_progress"] else 0)
    yield _gauge("shardpool_resize_target_workers", "the worker count the last resize aims for",
                 resize["target"])


def _ingress_metrics(ing: dict[str, Any]) -> Iterator[Metric]:
    for key, doc in _INGRESS_COUNTERS:
        yield _counter(f"shardpool_ingress_{key}", doc, ing[key])
    c = CounterMetricFamily(
        "shardpool_ingress_rejected", "messages or frames refused, by error code", labels=["error"]
    )
    for code, n in sorted(ing.get("errors", {}).items()):
        c.add_metric([code], n)
    yield c
    c = CounterMetricFamily(
        "shardpool_ingress_replies", "replies sent to producers, by status", labels=["status"]
    )
    for status in ("ok", "failed", "closed", "in_doubt", "halted", "rejected"):
        c.add_metric([status], ing[status])
    yield c
    for key, doc in (
        ("producers", "producers connected"),
        ("held_replies", "replies held for producers that have not read them yet"),
        ("stalled_producers", "producers whose replies ZeroMQ cannot take at the moment"),
    ):
        yield _gauge(f"shardpool_ingress_{key}", doc, ing[key])


class SnapshotCollector(Collector):
    """Turns one status snapshot into metric families on every scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self._snapshot()
        except Exception:  # noqa: BLE001 - a scrape must not kill the server thread
            log.exception("metrics snapshot failed")
            yield _up(0)
            return
        yield _up(1)
        yield from _pool_metrics(snap["pool"])
        yield from _worker_metrics(snap["workers"])
        if snap.get("placement"):
            yield from _placement_metrics(snap["placement"])
        yield from _ingress_metrics(snap["ingress"])
        g = GaugeMetricFamily(
            "shardpool_hot_channel_messages",
            "messages of the hottest channels since their worker started",
            labels=["channel", "worker"],
        )
        for cid, count, worker in snap.get("hot_channels") or ():
            g.add_metric([cid, str(worker)], count)
        yield g


class MetricsServer:
    """The HTTP endpoint (``/metrics``) on ``host:port``, served by prometheus-client's thread."""

    def __init__(self, snapshot: Snapshot, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def start(self) -> str:
        """Start serving; returns the URL.

        Raises:
            OSError: the address cannot be bound (in use, not local).
        """
        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self.registry
        )
        # Port 0 (tests) picks a free port; report the real one.
        self.port = self._server.server_address[1]
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5.0)
            self._server = None
