"""Prometheus metrics of ``shardpool run`` (prometheus-client), off unless ``metrics.enabled``.

The figures are those of ``shardpool status``, read from one snapshot per scrape (a custom
collector, so nothing is double-counted or kept in sync by hand), plus the front process's own
``process_*`` series (prometheus-client's ``ProcessCollector``: CPU seconds, resident and virtual
memory, open file descriptors, start time). Served at ``/metrics``; any other path answers 404.

Naming follows Prometheus' rules: ``shardpool_*``, base units in the name (``_seconds``,
``_bytes``), counters end ``_total``, ratios are 0..1, and every label has a bounded set of
values: ``worker`` (the worker index, bounded by the worker count), ``host`` (a worker's host:
"local", or a remote worker's host name; one per worker), ``result`` (committed,
aborted), ``error`` (the ingress protocol's error codes), ``status`` (the reply statuses),
``version`` and ``python``. No series is labelled by channel: the hottest and the saturated
channels change with the traffic, so ``shardpool status`` lists them and the metrics count them.
Worker counters restart at 0 when a worker is restarted, which Prometheus' ``rate()`` handles as a
counter reset; per-worker series come and go with their worker when a resize changes the count.

* identity: ``shardpool_up`` (1 if the scrape got a snapshot), ``shardpool_build_info{version,
  python}`` (always 1);
* pool (front counters): ``shardpool_messages_submitted_total``,
  ``shardpool_messages_acknowledged_total``, ``shardpool_results_total``,
  ``shardpool_failures_total``, ``shardpool_restarts_total``, ``shardpool_replayed_total``,
  ``shardpool_quarantined_total``, ``shardpool_forgotten_total``; gauges ``shardpool_inflight``,
  ``shardpool_halted_channels``, ``shardpool_channels``;
* per worker (``worker`` label): counters ``shardpool_worker_processed_total``, ``_failed_total``,
  ``_retried_total``, ``_redelivered_total``, ``_gaps_total``, ``_duplicates_total``,
  ``_reorders_total`` (order violations: 0 when healthy), ``_restarts_total``,
  ``_cpu_seconds_total`` (user + system CPU of the worker process); gauges
  ``shardpool_worker_channels``, ``_queued``, ``_inflight``, ``_busy_channels``,
  ``_halted_channels``, ``_loop_lag_seconds``, ``_rss_bytes``, ``_epoch``, ``_ready``,
  ``_oldest_unacked_age_seconds`` (how long the oldest message sent to the worker and not yet
  finished has waited: a time-based lag, as Kafka's records-lag; 0 when nothing is in flight;
  messages parked behind a halted channel count, so a halted channel keeps it growing until it is
  resumed or skipped);
* where each worker lives: ``shardpool_worker_info{worker, host}`` (always 1; host "local" for a
  local worker), gauges ``shardpool_worker_remote`` (1 for a remote worker, 0 for a local one),
  ``shardpool_worker_link_up`` (1 while the link is up; 0 for a remote worker away; local workers
  1), ``shardpool_worker_lease_age_seconds`` (since the front last heard a remote worker; absent
  while away) and ``shardpool_worker_rtt_seconds`` (heartbeat to lease round trip measured by a
  remote worker; absent until measured), and the counter ``shardpool_worker_failovers_total``
  (failovers of a remote worker: its channels taken over after it went away); remote workers only
  except ``_info``, ``_remote`` and ``_link_up``;
* latency: the histogram ``shardpool_batch_latency_seconds{worker}`` (``_bucket{le}``, ``_sum``,
  ``_count``): from a batch's seal to its last message finished, counted once for each message of
  the batch. Timed per batch, not per message (the producer's path reads no clock): each message
  is counted at its batch's completion, an upper bound of its send → result time that leaves out
  the linger before the seal (at most ``transport.batch_linger_ms``);
* placement: ``shardpool_workers``, ``shardpool_worker_slots``, ``shardpool_worker_load`` (share
  of a core), ``shardpool_worker_load_share`` (of the pool's measured load, 0..1),
  ``shardpool_moves_in_progress``, ``shardpool_moves_total{result}``,
  ``shardpool_move_pause_p50_seconds`` / ``_p99_seconds`` (over the recent moves),
  ``shardpool_pinned_channels``, ``shardpool_saturated_channels`` (channels that keep a core
  busy: order forbids splitting them), ``shardpool_resize_in_progress``,
  ``shardpool_resize_target_workers``;
* ingress: counters ``shardpool_ingress_frames_total``, ``_messages_total``, ``_accepted_total``,
  ``_frame_errors_total``, ``_backpressure_waits_total``, ``_auth_failures_total``,
  ``_undeliverable_total``, ``_internal_errors_total``, ``_refused_frames_total``,
  ``_refused_messages_total``, ``_stalled_sends_total``, ``_rejected_total{error}``,
  ``_replies_total{status}``; gauges ``shardpool_ingress_producers``, ``_held_replies``,
  ``_stalled_producers``;
* remote workers (only when some are configured): counters ``shardpool_remote_joins_total``,
  ``_failovers_total``, ``_refused_total`` (joins refused),
  ``_auth_failures_total``, ``_impersonations_total`` (frames from a peer claiming another
  worker's identity), ``_stray_frames_total``;
* dead letters (only with ``deadletters.enabled``): the gauge ``shardpool_dead_letters`` (entries
  stored) and the counter ``shardpool_dead_letters_dropped_total`` (dropped to keep
  ``deadletters.max_entries``, since the backend started).
"""


from __future__ import annotations

import logging
import platform
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import ProcessCollector, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .front.window import LATENCY_BOUNDS
from .status import remote_summary, worker_rows

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

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
    ("rss_bytes", "rss_bytes", "resident memory of the worker process"),
    ("epoch", "epoch", "incarnation number of the worker"),
    (
        "oldest_unacked_s",
        "oldest_unacked_age_seconds",
        "age of the oldest message sent to this worker and not finished (0: none in flight)",
    ),
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


def _build_info() -> Metric:
    info = GaugeMetricFamily(
        "shardpool_build_info", "the shardpool and Python versions (always 1)",
        labels=["version", "python"],
    )
    info.add_metric([__version__, platform.python_version()], 1)
    return info


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
        "shardpool_worker_cpu_seconds",
        "user + system CPU time of the worker process (restarts at 0 with the process)",
        labels=["worker"],
    )
    for w in workers:
        if w.get("cpu_seconds") is not None:
            c.add_metric([str(w["index"])], w["cpu_seconds"])
    yield c
    yield _latency(workers)
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


_REMOTE_COUNTERS = (
    ("joins", "remote workers that joined (a first join or a rejoin)"),
    ("failovers", "remote workers lost and their channels failed over"),
    ("refused", "remote workers' joins refused (unknown, not failed over yet, pool not running)"),
    ("auth_failures", "remote peers that failed the CURVE handshake"),
    ("impersonations", "frames from a remote peer claiming another worker's identity"),
    ("stray_frames", "remote frames from no current session (ignored)"),
)


def _where_workers_live(workers: list[dict[str, Any]]) -> Iterator[Metric]:
    """Where each worker lives: host, remote or not, link, lease age, round trip, failovers."""
    g = GaugeMetricFamily(
        "shardpool_worker_info",
        "the host the worker runs on (always 1; host \"local\" for a local worker)",
        labels=["worker", "host"],
    )
    for w in workers:
        g.add_metric([str(w["index"]), str(w.get("host") or "?")], 1)
    yield g
    g = GaugeMetricFamily(
        "shardpool_worker_remote", "1 for a worker on another host, 0 for a local one",
        labels=["worker"],
    )
    for w in workers:
        g.add_metric([str(w["index"])], 1 if w.get("remote") else 0)
    yield g
    g = GaugeMetricFamily(
        "shardpool_worker_link_up",
        "1 while the front's link to the worker is up (always for a local one), 0 while away",
        labels=["worker"],
    )
    for w in workers:
        g.add_metric([str(w["index"])], 0 if w.get("link") == "away" else 1)
    yield g
    remote = [w for w in workers if w.get("remote")]
    for key, name, doc in (
        ("lease_age_s", "lease_age_seconds", "since the front last heard the remote worker"),
        ("rtt_s", "rtt_seconds", "heartbeat to lease round trip measured by the remote worker"),
    ):
        g = GaugeMetricFamily(f"shardpool_worker_{name}", doc, labels=["worker"])
        for w in remote:
            if w.get(key) is not None:
                g.add_metric([str(w["index"])], w[key])
        yield g
    c = CounterMetricFamily(
        "shardpool_worker_failovers",
        "times the remote worker was lost and its channels failed over",
        labels=["worker"],
    )
    for w in remote:
        c.add_metric([str(w["index"])], w.get("failovers") or 0)
    yield c


def _remote_metrics(remote: dict[str, Any]) -> Iterator[Metric]:
    for key, doc in _REMOTE_COUNTERS:
        yield _counter(f"shardpool_remote_{key}", doc, remote.get(key) or 0)


def _latency(workers: list[dict[str, Any]]) -> Metric:
    h = HistogramMetricFamily(
        "shardpool_batch_latency_seconds",
        "from a batch's seal to its last message finished, counted once per message of the batch "
        "(an upper bound of each message's send-to-result time, the batch linger left out)",
        labels=["worker"],
    )
    les = [*(repr(b) for b in LATENCY_BOUNDS), "+Inf"]
    for w in workers:
        counts = w.get("latency_buckets")
        if not counts or len(counts) != len(les):
            continue
        cumulative: list[tuple[str, float]] = []
        total = 0
        for le, n in zip(les, counts, strict=True):
            total += n
            cumulative.append((le, total))
        h.add_metric([str(w["index"])], cumulative, float(w.get("latency_sum_s", 0.0)))
    return h


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
    yield _gauge(
        "shardpool_saturated_channels",
        "channels that keep a whole core busy (their order forbids splitting them; shardpool "
        "status lists them)",
        len(levelling.get("saturated") or ()),
    )
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
        yield _build_info()
        yield from _pool_metrics(snap["pool"])
        yield from _worker_metrics(snap["workers"])
        yield from _where_workers_live(worker_rows(snap))
        remote = remote_summary(snap)
        if remote is not None:
            yield from _remote_metrics(remote)
        if snap.get("placement"):
            yield from _placement_metrics(snap["placement"])
        yield from _ingress_metrics(snap["ingress"])
        if snap.get("dead_letters"):
            dead = snap["dead_letters"]
            yield _gauge("shardpool_dead_letters", "entries in the dead-letter store",
                         dead["count"])
            yield _counter(
                "shardpool_dead_letters_dropped",
                "dead letters dropped to keep deadletters.max_entries",
                dead["dropped"],
            )


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request, none of them keeping the process alive."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr (a scrape every few seconds)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def metrics_app(registry: CollectorRegistry) -> WSGIApplication:
    """The WSGI app: ``/metrics`` is prometheus-client's exposition (content negotiation, gzip,
    ``name[]`` filters); every other path answers 404 naming where the metrics are."""
    exposition = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in ("/metrics", "/metrics/"):
            result: Iterable[bytes] = exposition(environ, start_response)
            return result
        body = b"404 not found: the metrics are at /metrics\n"
        start_response(
            "404 Not Found",
            [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        )
        return [body]

    return app


class MetricsServer:
    """The HTTP endpoint (``/metrics``, 404 elsewhere) on ``host:port``, served from a thread."""

    def __init__(self, snapshot: Snapshot, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        # The front process itself (process_cpu_seconds_total, process_resident_memory_bytes,
        # process_open_fds, ...); yields nothing where /proc is not there.
        ProcessCollector(registry=self.registry)
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
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
        infos = socket.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )

        class Server(_Server):
            address_family = infos[0][0]

        server = make_server(
            str(infos[0][4][0]), self.port, metrics_app(self.registry), Server, _QuietHandler
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name="shardpool-metrics", daemon=True
        )
        self._thread.start()
        # Port 0 (tests) picks a free port; report the real one.
        self.port = int(server.server_address[1])
        return self.url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(5.0)
            self._server = None
