"""One pool run of the bench: start a pool, push a stream through the bytes fast path, drain,
collect the figures, close (:func:`run_pool`, giving a :class:`PoolRun`).

Start-up happens before the clock starts; the pool is closed (its workers reaped) before
:func:`run_pool` returns or raises.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from ..pool import ShardPool
from .handlers import PROBE, TRIVIAL_HANDLER

__all__ = ["ORDER_COUNTERS", "PoolRun", "RunResult", "Stream", "run_pool"]

Stream = Sequence[tuple[bytes, bytes]]
"""``(channel_id, CBOR payload)`` pairs in arrival order."""

ORDER_COUNTERS = ("gaps", "duplicates", "reorders")
"""The workers' per-channel sequence checks; all zero when the order was kept."""

# on_done(k, channel_id, value, error): message number k (of those timed) is finished.
Done = Callable[[int, bytes, Any, BaseException | None], None]


@dataclass(frozen=True, slots=True)
class RunResult:
    """The throughput of one run, of a pool or of a baseline: ``messages`` through ``workers``
    worker processes in ``elapsed_s`` seconds (``msgs_per_s = messages / elapsed_s``);
    ``per_worker[i]`` is how many messages the handler of worker ``i`` was called with."""

    name: str
    workers: int
    messages: int
    elapsed_s: float
    per_worker: list[int]

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.elapsed_s if self.elapsed_s > 0 else math.inf


@dataclass(frozen=True, slots=True)
class PoolRun(RunResult):
    """The outcome of one :func:`run_pool` call.

    ``elapsed_s`` (seconds) runs from the first submit to the return of ``drain`` (start-up and
    the digest probes excluded). ``latency_ns`` holds the timed messages' submit→result latencies
    (nanoseconds). ``violations_by_code`` counts protocol violations returned by the handler and
    ``violating_channels`` the channels they force-closed; ``sequence_errors`` sums the workers'
    gap/duplicate/reorder counters. ``digests`` maps channel id → final state digest when probed.
    ``worker_cpu_s`` is the CPU time (user + system, seconds) the worker processes used while
    the clock ran: with ``elapsed_s`` it tells a starved worker from a slow pool.
    """

    target_rate: float | None = None
    violations_by_code: dict[str, int] = field(default_factory=dict)
    violating_channels: int = 0
    failures: int = 0
    sequence_errors: dict[str, int] = field(default_factory=dict)
    hot_channels: list[tuple[str, int]] = field(default_factory=list)
    latency_ns: list[int] = field(default_factory=list, repr=False)
    digests: dict[bytes, str] = field(default_factory=dict, repr=False)
    digest_mismatches: int = 0
    worker_cpu_s: float = 0.0

    @property
    def violations(self) -> int:
        """Protocol violations the handler returned, all codes together."""
        return sum(self.violations_by_code.values())

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures of this run (no per-message data)."""
        return {
            "msgs_per_s": round(self.msgs_per_s, 1),
            "elapsed_s": round(self.elapsed_s, 4),
            "messages": self.messages,
            "target_rate": self.target_rate,
            "per_worker": self.per_worker,
            "violations": self.violations,
            "force_closed_channels": self.violating_channels,
            "failures": self.failures,
            "sequence_errors": self.sequence_errors,
            "digest_mismatches": self.digest_mismatches,
            "worker_cpu_s": round(self.worker_cpu_s, 3),
        }


class _Outcomes:
    """What comes back from the pool: protocol violations in results, failures, latencies."""

    def __init__(self, timed: int) -> None:
        self.violations: Counter[str] = Counter()
        self.violating: set[bytes] = set()
        self.failures: list[BaseException] = []
        self.sent_ns = [0] * timed  # submit time of timed message k
        self.latency_ns: list[int] = []

    def on_result(self, cid: bytes, seq: int, value: Any) -> None:
        if type(value) is dict and "violation" in value:
            self.violations[value["violation"]] += 1
            self.violating.add(cid)

    def on_failure(self, error: BaseException) -> None:
        self.failures.append(error)

    def done(self, k: int, cid: bytes, value: Any, error: BaseException | None) -> None:
        self.latency_ns.append(time.perf_counter_ns() - self.sent_ns[k])
        if error is not None:
            self.failures.append(error)
        else:
            self.on_result(cid, 0, value)


def run_pool(
    stream: Stream,
    workers: int,
    *,
    handler: str = TRIVIAL_HANDLER,
    handler_options: dict[str, Any] | None = None,
    rate: float | None = None,
    sample_every: int = 0,
    probe: Sequence[bytes] = (),
    batch_size: int = 256,
    max_inflight: int = 16384,
    config: str | None = None,
    timeout_s: float = 120.0,
    name: str = "shardpool",
    many: bool = False,
    payload: str = "cbor",
    probe_message: bytes = PROBE,
) -> PoolRun:
    """Start a pool, push ``stream`` through the bytes fast path, drain, report, close.

    Args:
        stream: ``(channel_id, CBOR payload)`` pairs in arrival order.
        workers: worker processes.
        handler, handler_options: as :class:`~shardpool.pool.ShardPool`.
        rate: None submits closed-loop (as fast as backpressure allows); a number paces the
            submits open-loop at that many msgs/s (a schedule: a late producer catches up in a
            burst rather than shifting every later message).
        sample_every: time one message in this many (0: none; open-loop: 1 times every message).
        probe: channels whose final :func:`~shardpool.bench.handlers.state_digest` to fetch after
            the drain (the handler must be a ``DigestLightningHandler``); in ``PoolRun.digests``.
        batch_size, max_inflight, config: pool settings.
        timeout_s: deadline for the drain and for the probes, each (seconds).
        many: closed-loop, untimed messages go in through ``submit_many_bytes`` (one lock per
            chunk) instead of one ``submit_bytes`` call each.
        payload: ``"cbor"`` (the worker decodes each payload for the handler) or ``"raw"`` (the
            handler gets the bytes).
        probe_message: the payload that asks the handler for a channel's digest
            (:data:`~shardpool.bench.handlers.WIRE_PROBE` for the real traffic's handler).

    Raises:
        ShardPoolError subclasses from the pool (start failure, broken pool, DrainTimeout).
    """
    n = len(stream)
    out = _Outcomes(n // sample_every + 1 if sample_every else 0)
    pool = ShardPool(
        handler, config=config, on_result=out.on_result, on_failure=out.on_failure,
        workers=workers, batch_size=batch_size, max_inflight=max_inflight,
        handler_options=dict(handler_options or {}), payload=payload,
    )
    try:
        procs = _worker_processes(pool)
        cpu0 = _cpu_seconds(procs)
        t0 = time.perf_counter()
        if rate is None:
            _submit_closed(pool, stream, sample_every, many, out)
        else:
            _submit_paced(pool, stream, rate, sample_every, out)
        pool.drain(timeout_s)
        elapsed = time.perf_counter() - t0
        worker_cpu_s = _cpu_seconds(procs) - cpu0
        # Taken before the probes: only the traffic is counted.
        stats = pool.stats(timeout=min(10.0, timeout_s))
        digests = _probe_digests(pool, probe, timeout_s, probe_message) if probe else {}
    finally:
        pool.close(timeout=min(10.0, timeout_s))
    per_worker, seq_errors, hot = _worker_figures(stats["workers"])
    return PoolRun(
        name=name,
        workers=workers,
        messages=n,
        elapsed_s=elapsed,
        per_worker=per_worker,
        target_rate=rate,
        violations_by_code=dict(sorted(out.violations.items())),
        violating_channels=len(out.violating),
        failures=len(out.failures),
        sequence_errors=seq_errors,
        hot_channels=hot[:5],
        latency_ns=out.latency_ns,
        digests=digests,
        worker_cpu_s=worker_cpu_s,
    )


def _worker_figures(
    workers: list[dict[str, Any]],
) -> tuple[list[int], dict[str, int], list[tuple[str, int]]]:
    """Per-worker processed counts, summed sequence errors, and the hottest channels (hex
    prefix, count; hottest first) from the pool's per-worker stats."""
    seq_errors = dict.fromkeys(ORDER_COUNTERS, 0)
    per_worker: list[int] = []
    hot: list[tuple[str, int]] = []
    for w in workers:
        per_worker.append(int(w.get("processed", 0)))
        for key in seq_errors:
            seq_errors[key] += int(w.get(key, 0))
        hot.extend((bytes(c).hex()[:16], int(count)) for c, count in w.get("hot_channels", []))
    hot.sort(key=lambda h: -h[1])
    return per_worker, seq_errors, hot


def _worker_processes(pool: ShardPool) -> list[psutil.Process]:
    """psutil handles of the pool's worker processes (those that can be found)."""
    procs = []
    for pid in pool.worker_pids():
        if pid is not None:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(pid))
    return procs


def _cpu_seconds(procs: Sequence[psutil.Process]) -> float:
    """User + system CPU seconds of ``procs`` so far (a process gone counts 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _submit_closed(
    pool: ShardPool, stream: Stream, sample_every: int, many: bool, out: _Outcomes
) -> None:
    """Submit ``stream`` as fast as backpressure allows, timing one message in ``sample_every``
    (none for 0)."""
    submit = pool.submit_bytes
    submit_many = pool.submit_many_bytes
    if not sample_every:
        if many:
            submit_many(stream)
        else:
            for cid, payload in stream:
                submit(cid, payload)
        return
    partial = functools.partial
    clock = time.perf_counter_ns
    for k, j in enumerate(range(0, len(stream), sample_every)):
        cid, payload = stream[j]
        out.sent_ns[k] = clock()
        submit(cid, payload, on_done=partial(out.done, k, cid))
        rest = stream[j + 1 : j + sample_every]
        if many:
            submit_many(rest)
        else:
            for cid, payload in rest:
                submit(cid, payload)


def _submit_paced(
    pool: ShardPool, stream: Stream, rate: float, sample_every: int, out: _Outcomes
) -> None:
    """Submit ``stream`` open-loop at ``rate`` msgs/s, timing one message in ``sample_every``."""
    n = len(stream)
    every = max(1, sample_every)
    submit = pool.submit_bytes
    clock = time.perf_counter_ns
    partial = functools.partial
    start = time.perf_counter()
    i = 0
    while i < n:
        # Everything due by now goes out at once: the schedule, not the last submit, sets the
        # pace, so a producer delayed by the OS does not silently lower the offered load.
        due = min(n, int((time.perf_counter() - start) * rate) + 1)
        while i < due:
            cid, payload = stream[i]
            if i % every == 0:
                k = i // every
                out.sent_ns[k] = clock()
                submit(cid, payload, on_done=partial(out.done, k, cid))
            else:
                submit(cid, payload)
            i += 1
        if i < n:
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                # Pacing an open-loop producer, not synchronising with anything.
                time.sleep(wait)


def _probe_digests(
    pool: ShardPool, channels: Sequence[bytes], timeout_s: float, message: bytes
) -> dict[bytes, str]:
    """Ask every channel in ``channels`` for its state digest (in order behind its traffic)."""
    futures = [(cid, pool.request_bytes(cid, message)) for cid in channels]
    deadline = time.monotonic() + timeout_s
    return {cid: fut.result(max(0.0, deadline - time.monotonic())) for cid, fut in futures}
