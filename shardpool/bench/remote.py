"""``shardpool bench --connect``: the Lightning load test against a running ``shardpool run``.

The traffic goes through the ingress like a node's peer-connection code would send it, from this
process as one producer. Each repeat uses a fresh seed, so its channels are new to the backend
(a channel's state persists there between repeats). Reported: throughput (median of repeats),
latency from send to reply (every message timed), reply statuses, the protocol violations the
backend's handler returned (each would force-close its channel), and whether every channel's
replies came back in the order its messages were sent.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from ..client import Client, Reply
from ..demo.traffic import encode_stream
from .options import BenchOptions
from .report import latency_summary

__all__ = ["format_remote", "run_remote"]


def run_remote(
    endpoint: str | None,
    opts: BenchOptions,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``opts.repeats`` rounds of ``opts.n_messages`` (over ``opts.n_channels`` channels of
    ``opts.n_peers`` peers, seeds from ``opts.seed`` on) through the ingress at ``endpoint``
    (None: the default config's) and return the report. Each wait is bounded by
    ``opts.timeout_s`` seconds; the other options do not apply.

    Raises:
        ValueError: ``opts.workload`` is not the synthetic one (the others need an embedded pool).
        ShardPoolError (NotRunning, BackendLost, ...) / TimeoutError: the backend does not
            answer in time.
    """
    if opts.workload != "synthetic":
        raise ValueError(f"--connect sends the synthetic traffic; --workload {opts.workload} "
                         f"runs an embedded pool (leave out --connect)")
    repeats, timeout_s = opts.repeats, opts.timeout_s
    rates: list[float] = []
    total = 0
    tally = _Tally()  # channel ids differ from repeat to repeat: one tally serves them all
    with Client(endpoint, timeout=timeout_s) as client:
        for r in range(repeats):
            stream = encode_stream(opts.n_peers, opts.channels_per_peer, opts.n_messages,
                                   opts.seed + r)
            t0 = time.perf_counter()
            for i, (cid, payload) in enumerate(stream):
                tally.sent(client.send_bytes(cid, payload), cid)
                if i % 256 == 255:
                    tally.take(client.poll(0.0))
            client.flush()
            deadline = time.monotonic() + timeout_s
            while tally.sent_at:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(tally.sent_at)} replies missing after {timeout_s} s")
                tally.take(client.poll(0.05))
            rates.append(len(stream) / (time.perf_counter() - t0))
            total += len(stream)
            if progress is not None:
                progress(f"remote repeat {r + 1}/{repeats}: {rates[-1]:,.0f} msgs/s")
    return {
        "endpoint": client.endpoint,
        "messages": total,
        "repeats": repeats,
        "msgs_per_s": statistics.median(rates),
        "runs": rates,
        "latency_us": latency_summary(tally.latencies),
        "statuses": tally.statuses,
        "violations": tally.violations,
        "force_closed_channels": len(tally.forced),
        "reply_reorders": tally.reordered,
        "ok": (tally.statuses.get("ok", 0) == total and tally.violations == 0
               and tally.reordered == 0),
    }


def format_remote(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    lat = report["latency_us"]
    runs = " ".join(f"{r / 1000:.0f}k" for r in report["runs"])
    statuses = ", ".join(f"{k} {v:,}" for k, v in sorted(report["statuses"].items()))
    return "\n".join(
        [
            f"shardpool bench --connect {report['endpoint']}: {report['messages']:,} messages in "
            f"{report['repeats']} repeats, one producer through the ingress",
            f"throughput: median {report['msgs_per_s']:,.0f} msgs/s  (each run: {runs})",
            f"latency send->reply, us: p50 {lat['p50']:,.0f}  p90 {lat['p90']:,.0f}  "
            f"p99 {lat['p99']:,.0f}  p99.9 {lat['p99.9']:,.0f}  max {lat['max']:,.0f}",
            "  (closed loop: the producer keeps up to the client's max_outstanding messages "
            "waiting, so this is mostly queueing)",
            f"replies: {statuses}",
            f"order: {report['violations']} protocol violations, "
            f"{report['force_closed_channels']} force-closed channels, "
            f"{report['reply_reorders']} replies out of channel order",
            f"verdict: {'OK - order kept' if report['ok'] else 'FAILED'}",
        ]
    )


class _Tally:
    """Replies: latency from each send, statuses, violations, channel order."""

    def __init__(self) -> None:
        self.sent_at: dict[int, int] = {}
        self.chan_of: dict[int, bytes] = {}
        self.last: dict[bytes, int] = {}
        self.latencies: list[int] = []
        self.statuses: dict[str, int] = {}
        self.violations = 0
        self.forced: set[bytes] = set()
        self.reordered = 0

    def sent(self, corr: int, cid: bytes) -> None:
        self.sent_at[corr] = time.perf_counter_ns()
        self.chan_of[corr] = cid

    def take(self, replies: list[Reply]) -> None:
        now = time.perf_counter_ns()
        for rep in replies:
            # A "halted" notice: the final reply is still to come. No corr: an item this client
            # never sends (one without a readable correlation id).
            if not rep.final or rep.corr is None:
                continue
            self.latencies.append(now - self.sent_at.pop(rep.corr))
            self.statuses[rep.status] = self.statuses.get(rep.status, 0) + 1
            cid = self.chan_of.pop(rep.corr)
            if rep.corr < self.last.get(cid, -1):
                self.reordered += 1  # correlation ids grow with each send
            self.last[cid] = rep.corr
            if rep.ok and isinstance(rep.value, dict) and "violation" in rep.value:
                self.violations += 1
                self.forced.add(cid)
