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
from typing import Any

from .client import Client
from .demo.traffic import encode_stream
from .loadtest import latency_summary


def run_remote(
    endpoint: str | None,
    *,
    messages: int,
    channels: int,
    peers: int,
    repeats: int,
    seed: int,
    timeout_s: float,
    progress: Any = None,
) -> dict[str, Any]:
    """Run ``repeats`` rounds of ``messages`` through the ingress at ``endpoint`` (None: the
    default config's) and return the report.

    Raises:
        NotRunning-style ShardPoolError / TimeoutError: the backend does not answer in time.
    """
    per_peer = -(-channels // peers)
    rates: list[float] = []
    lat_ns: list[int] = []
    statuses: dict[str, int] = {}
    violations = 0
    forced: set[bytes] = set()
    reordered = 0
    total = 0
    with Client(endpoint, timeout=timeout_s) as client:
        for r in range(repeats):
            stream = encode_stream(peers, per_peer, messages, seed + r)
            tally = _Tally()
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
            lat_ns.extend(tally.latencies)
            for k, v in tally.statuses.items():
                statuses[k] = statuses.get(k, 0) + v
            violations += tally.violations
            forced |= tally.forced
            reordered += tally.reordered
            if progress is not None:
                progress(f"remote repeat {r + 1}/{repeats}: {rates[-1]:,.0f} msgs/s")
    ok = statuses.get("ok", 0) == total and violations == 0 and reordered == 0
    return {
        "endpoint": client.endpoint,
        "messages": total,
        "repeats": repeats,
        "msgs_per_s": statistics.median(rates),
        "runs": rates,
        "latency_us": latency_summary(lat_ns),
        "statuses": statuses,
        "violations": violations,
        "force_closed_channels": len(forced),
        "reply_reorders": reordered,
        "ok": ok,
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
    """Replies of one repeat: latency from each send, statuses, violations, channel order."""

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

    def take(self, replies: list[Any]) -> None:
        now = time.perf_counter_ns()
        for rep in replies:
            if not rep.final:
                continue  # a "halted" notice: the final reply is still to come
            self.latencies.append(now - self.sent_at.pop(rep.corr))
            self.statuses[rep.status] = self.statuses.get(rep.status, 0) + 1
            cid = self.chan_of.pop(rep.corr)
            if rep.corr < self.last.get(cid, -1):
                self.reordered += 1  # correlation ids grow with each send
            self.last[cid] = rep.corr
            if rep.ok and isinstance(rep.value, dict) and "violation" in rep.value:
                self.violations += 1
                self.forced.add(cid)
