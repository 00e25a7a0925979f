"""Load testing: the scenario runner and report behind ``shardpool bench``.

One run of :func:`run_bench` answers the two questions shardpool exists for, on the same seeded
Lightning traffic (:mod:`shardpool.demo.traffic`):

* **Is the order kept?** The traffic goes through a pool running the BOLT #2 state machine
  (:class:`~shardpool.demo.handler.LightningHandler`). Every protocol violation the handler reports,
  every gap/duplicate/reorder the workers' sequence checks count, and every channel whose final
  state digest differs from a serial :func:`~shardpool.demo.channel.replay` of the stream is an
  order failure — all must be zero. The naive by-type dispatch (lnd issue 8393) runs on a prefix of
  the same traffic and shows what happens without the guarantee; shardpool runs the same prefix
  with the same per-message delay (an ``async`` handler) for the side-by-side count.
* **How fast?** Throughput (median of repeats) of the pool with the Lightning handler and with a
  trivial handler, next to the bare pyzmq+cbor2 ceiling harness and the naive
  ``multiprocessing.Queue``-per-worker pool from :mod:`shardpool.baselines`, fed the very same
  ``(channel_id, CBOR payload)`` pairs, interleaved repeat by repeat (pool, bare, queue, pool, …) so
  the noise of a shared machine hits all of them alike; the ratios are the figures to compare.
  Latency is the time from ``submit_bytes`` to the message's ``on_done`` callback (its result
  arriving back in the front), measured open-loop at a fraction of the measured capacity (every
  message timed) and, separately, on a 1-in-N sample of the closed-loop run, where it is mostly
  queueing in the in-flight window.

Every pool and baseline start-up happens before its clock starts. Every process started is reaped
before a function returns or raises (the pool by ``close``, the baselines by their own cleanup).
"""

from __future__ import annotations

import functools
import gc
import hashlib
import math
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import cbor2

from .demo.channel import ChannelState, replay
from .demo.handler import LightningHandler

__all__ = [
    "BenchOptions",
    "DigestLightningHandler",
    "PROBE_TYPE",
    "PoolRun",
    "Progress",
    "available_cpus",
    "calibrate_cost",
    "format_report",
    "latency_summary",
    "noop",
    "run_bench",
    "run_pool",
    "state_digest",
]

Mode = Literal["closed", "open"]
Stream = Sequence[tuple[bytes, bytes]]

LIGHTNING_HANDLER = "shardpool.loadtest:DigestLightningHandler"
"""The Lightning handler as the bench runs it: :class:`DigestLightningHandler`."""
TRIVIAL_HANDLER = "shardpool.loadtest:noop"
"""A handler that does nothing (the worker still decodes each CBOR payload, as the baselines do)."""

PROBE_TYPE = "_shardpool_digest"
"""Message type of the probe that asks :class:`DigestLightningHandler` for a channel's digest."""
_PROBE = cbor2.dumps({"type": PROBE_TYPE})

LATENCY_QUANTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
)


# --------------------------------------------------------------------------------------------
# handlers (module level: workers import them by name)


def noop(channel: Any, seq: int, message: Any, redelivered: bool) -> None:
    """The trivial handler: returns None (nothing to send back), does nothing."""
    return None


def calibrate_cost(cpu_cost_us: float, rounds: int = 3) -> int:
    """SHA-256 rounds that burn ``cpu_cost_us`` microseconds here, calibrated once (in the bench
    process, before any worker starts): the most of ``rounds`` calibrations, since a preempted
    one under-counts. 0 for no cost. Raises ValueError as :class:`LightningHandler`."""
    if cpu_cost_us <= 0:
        return 0
    best = 1
    for _ in range(max(1, rounds)):
        probe = LightningHandler(cpu_cost_us=cpu_cost_us)
        probe.setup(0)
        best = max(best, int(probe._cost_iters or 1))
    return best


def state_digest(state: ChannelState | None) -> str:
    """A short, stable hex digest of a channel's whole protocol state (``None``: no state yet).

    Stable across processes and runs: built from ``repr`` of :meth:`ChannelState.digest`, which
    holds only ints, bytes, strings, bools and None (no salted ``hash()``).
    """
    if state is None:
        return "-"
    return hashlib.sha256(repr(state.digest()).encode()).hexdigest()[:32]


class DigestLightningHandler(LightningHandler):
    """:class:`LightningHandler` that also answers a probe: a message ``{"type": PROBE_TYPE}``
    returns :func:`state_digest` of the channel's state instead of being applied, so the front
    can compare every channel's final state with a serial replay. Never raises.

    ``cost_iters`` fixes the SHA-256 rounds burnt per costly message (see :func:`calibrate_cost`)
    instead of calibrating in each worker: workers calibrating at start-up on a busy machine
    (all of them start at once) under-estimate the rounds, and two runs would do different work.
    """

    def __init__(
        self,
        cpu_cost_us: float = 0.0,
        cost_types: tuple[str, ...] = ("commitment_signed",),
        cost_iters: int | None = None,
    ) -> None:
        """Raises ValueError: ``cost_iters`` < 1, or as :class:`LightningHandler`."""
        super().__init__(cpu_cost_us, cost_types)
        if cost_iters is not None and (type(cost_iters) is not int or cost_iters < 1):
            raise ValueError(f"cost_iters must be an int >= 1 or None, got {cost_iters!r}")
        self.cost_iters = cost_iters

    def setup(self, worker_index: int) -> None:
        if self.cost_iters is None:
            super().setup(worker_index)
            return
        self.worker_index = worker_index
        # LightningHandler's own calibration result, set instead of measured.
        self._cost_iters = self.cost_iters

    def handle(
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | str | None:
        if type(message) is dict and message.get("type") == PROBE_TYPE:
            state = getattr(channel, "state", None)
            return state_digest(state if type(state) is ChannelState else None)
        return LightningHandler.handle(self, channel, seq, message, redelivered)


# --------------------------------------------------------------------------------------------
# options, progress, small helpers


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchOptions:
    """One bench scenario. Units are in the names; defaults run in well under a minute on 2 cores.

    Attributes:
        workers: pool (and baseline) worker processes.
        messages: messages in the traffic stream.
        channels: channel slots in the traffic (``peers`` × channels per peer, rounded up).
        peers: peer connections; None = ``channels // 10`` (at least 1).
        repeats: measured repeats of each throughput run; the report gives medians.
        cpu_cost_us: CPU burnt per ``commitment_signed`` by the Lightning handler (microseconds).
        mode: ``"closed"`` submits as fast as backpressure allows (max throughput);
            ``"open"`` paces the Lightning runs at ``rate`` msgs/s and times every message.
        rate: open-loop target rate in msgs/s (``mode="open"``; default 20,000).
        seed: traffic seed (same seed, same traffic).
        close_fraction: share of channels that close cooperatively within the stream.
        baselines: also run the bare pyzmq+cbor2, mp.Queue and trivial-handler comparisons.
        bytype_messages: prefix of the traffic run through the by-type dispatch (0 = skip it).
        bytype_delay_s: per-message handling time in the by-type workers and in shardpool's
            same-delay comparison run (seconds).
        latency_load: in closed mode, the open-loop latency phase runs at this fraction of the
            measured median throughput.
        latency_seconds: length of that phase (seconds of traffic at its rate).
        sample_every: in closed-loop runs, one message in this many is timed.
        batch_size, max_inflight: pool transport settings (as the config keys).
        config: a TOML config file for the pool (None: built-in defaults and environment).
        timeout_s: deadline of each single run (seconds).
    """

    workers: int = 2
    messages: int = 200_000
    channels: int = 2_000
    peers: int | None = None
    repeats: int = 3
    cpu_cost_us: float = 0.0
    mode: Mode = "closed"
    rate: float | None = None
    seed: int = 1
    close_fraction: float = 0.05
    baselines: bool = True
    bytype_messages: int = 6_000
    bytype_delay_s: float = 0.0002
    latency_load: float = 0.5
    latency_seconds: float = 2.0
    sample_every: int = 64
    batch_size: int = 256
    max_inflight: int = 16384
    config: str | None = None
    timeout_s: float = 120.0

    def check(self) -> None:
        """Raises ValueError naming the first option out of range."""
        ints = (
            ("workers", self.workers, 1),
            ("messages", self.messages, 1),
            ("channels", self.channels, 1),
            ("repeats", self.repeats, 1),
            ("bytype_messages", self.bytype_messages, 0),
            ("sample_every", self.sample_every, 1),
            ("batch_size", self.batch_size, 1),
            ("max_inflight", self.max_inflight, 1),
        )
        for name, value, lo in ints:
            if type(value) is not int or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
        if self.peers is not None and (type(self.peers) is not int or self.peers < 1):
            raise ValueError(f"peers must be an integer >= 1, got {self.peers!r}")
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode must be 'closed' or 'open', got {self.mode!r}")
        floats = (
            ("cpu_cost_us", self.cpu_cost_us, 0.0, False),
            ("bytype_delay_s", self.bytype_delay_s, 0.0, False),
            ("latency_load", self.latency_load, 0.0, True),
            ("latency_seconds", self.latency_seconds, 0.0, False),
            ("timeout_s", self.timeout_s, 0.0, True),
        )
        for name, value, lo, strict in floats:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            ok = ok and (value > lo if strict else value >= lo)
            if not ok:
                rel = ">" if strict else ">="
                raise ValueError(f"{name} must be a finite number {rel} {lo}, got {value!r}")
        if self.rate is not None and not (
            isinstance(self.rate, (int, float)) and math.isfinite(self.rate) and self.rate > 0
        ):
            raise ValueError(f"rate must be a finite number of msgs/s > 0, got {self.rate!r}")
        if not 0.0 <= self.close_fraction <= 1.0:
            raise ValueError(f"close_fraction must be within [0, 1], got {self.close_fraction!r}")

    @property
    def n_peers(self) -> int:
        return self.peers if self.peers is not None else max(1, self.channels // 10)

    @property
    def channels_per_peer(self) -> int:
        return max(1, -(-self.channels // self.n_peers))


class Progress:
    """Progress lines on a stream (stderr by default), each stamped with the seconds since start.

    ``enabled=False`` makes every call a no-op.
    """

    def __init__(self, enabled: bool = True, stream: Any = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)


def latency_summary(samples_ns: Sequence[int]) -> dict[str, float | int]:
    """Percentiles of latency samples given in nanoseconds, returned in microseconds.

    Keys: ``count``, ``p50``, ``p90``, ``p99``, ``p99.9``, ``max`` (nearest-rank percentiles; every
    value 0.0 and count 0 for no samples). Never raises for an empty input.
    """
    n = len(samples_ns)
    out: dict[str, float | int] = {"count": n}
    if n == 0:
        out.update({k: 0.0 for k, _ in LATENCY_QUANTILES})
        out["max"] = 0.0
        return out
    ordered = sorted(samples_ns)
    for key, q in LATENCY_QUANTILES:
        rank = max(1, math.ceil(q * n))
        out[key] = round(ordered[rank - 1] / 1000.0, 1)
    out["max"] = round(ordered[-1] / 1000.0, 1)
    return out


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def _paired(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Median of ``a[i] / b[i]`` over the pairs (None when there is none)."""
    pairs = [x / y for x, y in zip(a, b) if y > 0]
    return round(_median(pairs), 3) if pairs else None


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 and math.isfinite(a) and math.isfinite(b) else None


# --------------------------------------------------------------------------------------------
# one pool run


@dataclass
class PoolRun:
    """The outcome of one :func:`run_pool` call.

    ``elapsed_s`` (seconds) runs from the first submit to the return of ``drain`` (start-up and
    the digest probes excluded); ``msgs_per_s = messages / elapsed_s``. ``per_worker`` is what each
    worker's handler processed; ``latency_ns`` holds the timed messages' submit→result latencies
    (nanoseconds). ``violations_by_code`` counts protocol violations returned by the handler and
    ``violating_channels`` the channels they force-closed; ``sequence_errors`` sums the workers'
    gap/duplicate/reorder counters. ``digests`` maps channel id → final state digest when probed.
    ``worker_cpu_s`` is the CPU time (user + system, seconds) the worker processes used while
    the clock ran: with ``elapsed_s`` it tells a starved worker from a slow pool.
    """

    name: str
    workers: int
    messages: int
    elapsed_s: float
    msgs_per_s: float
    per_worker: list[int]
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
        probe: channels whose final :func:`state_digest` to fetch after the drain (the handler
            must be :class:`DigestLightningHandler`); in ``PoolRun.digests``.
        batch_size, max_inflight, config: pool settings.
        timeout_s: deadline for the drain and for the probes, each (seconds).
        many: closed-loop, untimed messages go in through ``submit_many_bytes`` (one lock per
            chunk) instead of one ``submit_bytes`` call each.
        payload: ``"cbor"`` (the worker decodes each payload for the handler) or ``"raw"`` (the
            handler gets the bytes).

    Raises:
        ShardPoolError subclasses from the pool (start failure, broken pool, DrainTimeout).
    """
    from .pool import ShardPool

    violations: Counter[str] = Counter()
    violating: set[bytes] = set()
    failures: list[Any] = []

    def on_result(cid: bytes, seq: int, value: Any) -> None:
        if type(value) is dict and "violation" in value:
            violations[value["violation"]] += 1
            violating.add(cid)

    n = len(stream)
    sent = [0] * (n // sample_every + 1 if sample_every else 0)
    lat: list[int] = []
    clock = time.perf_counter_ns

    def done(k: int, cid: bytes, value: Any, error: BaseException | None) -> None:
        lat.append(clock() - sent[k])
        if error is not None:
            failures.append(error)
        else:
            on_result(cid, 0, value)

    options: dict[str, Any] = {
        "workers": workers,
        "batch_size": batch_size,
        "max_inflight": max_inflight,
        "handler_options": dict(handler_options or {}),
        "payload": payload,
    }
    pool = ShardPool(
        handler, config=config, on_result=on_result, on_failure=failures.append, **options
    )
    try:
        procs = _worker_processes(pool)
        cpu0 = _cpu_seconds(procs)
        submit: Callable[..., int] = pool.submit_bytes
        submit_many: Callable[..., int] = pool.submit_many_bytes
        partial = functools.partial
        t0 = time.perf_counter()
        if rate is None:
            if sample_every:
                k = 0
                for j in range(0, n, sample_every):
                    cid, payload = stream[j]
                    sent[k] = clock()
                    submit(cid, payload, on_done=partial(done, k, cid))
                    k += 1
                    if many:
                        submit_many(stream[j + 1 : j + sample_every])
                    else:
                        for cid, payload in stream[j + 1 : j + sample_every]:
                            submit(cid, payload)
            elif many:
                submit_many(stream)
            else:
                for cid, payload in stream:
                    submit(cid, payload)
        else:
            _paced(stream, submit, rate, sample_every, sent, done)
        pool.drain(timeout_s)
        elapsed = time.perf_counter() - t0
        worker_cpu_s = _cpu_seconds(procs) - cpu0
        stats = pool.stats(timeout=min(10.0, timeout_s))
        digests: dict[bytes, str] = {}
        if probe:
            digests = _probe_digests(pool, probe, timeout_s)
    finally:
        pool.close(timeout=min(10.0, timeout_s))
    seq_errors = {"gaps": 0, "duplicates": 0, "reorders": 0}
    per_worker: list[int] = []
    hot: list[tuple[str, int]] = []
    for w in stats["workers"]:
        # Taken before the probes: only the traffic is counted.
        per_worker.append(int(w.get("processed", 0)))
        for key in seq_errors:
            seq_errors[key] += int(w.get(key, 0))
        hot.extend((bytes(c).hex()[:16], int(count)) for c, count in w.get("hot_channels", []))
    hot.sort(key=lambda h: -h[1])
    return PoolRun(
        name=name,
        workers=workers,
        messages=n,
        elapsed_s=elapsed,
        msgs_per_s=n / elapsed if elapsed > 0 else math.inf,
        per_worker=per_worker,
        target_rate=rate,
        violations_by_code=dict(sorted(violations.items())),
        violating_channels=len(violating),
        failures=len(failures),
        sequence_errors=seq_errors,
        hot_channels=hot[:5],
        latency_ns=lat,
        digests=digests,
        worker_cpu_s=worker_cpu_s,
    )


def _worker_processes(pool: Any) -> list[Any]:
    """psutil handles of the pool's worker processes (those that can be found)."""
    import psutil

    procs = []
    for pid in pool.worker_pids():
        if pid is not None:
            try:
                procs.append(psutil.Process(pid))
            except psutil.Error:
                pass
    return procs


def _cpu_seconds(procs: Sequence[Any]) -> float:
    """User + system CPU seconds of ``procs`` so far (a process gone counts 0)."""
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _paced(
    stream: Stream,
    submit: Callable[..., int],
    rate: float,
    sample_every: int,
    sent: list[int],
    done: Callable[..., None],
) -> None:
    """Submit ``stream`` open-loop at ``rate`` msgs/s, timing one message in ``sample_every``."""
    n = len(stream)
    every = max(1, sample_every)
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
                sent[k] = clock()
                submit(cid, payload, on_done=partial(done, k, cid))
            else:
                submit(cid, payload)
            i += 1
        if i < n:
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                # Pacing an open-loop producer, not synchronising with anything.
                time.sleep(wait)


def _probe_digests(pool: Any, channels: Sequence[bytes], timeout_s: float) -> dict[bytes, str]:
    """Ask every channel in ``channels`` for its state digest (in order behind its traffic)."""
    futures = [(cid, pool.request_bytes(cid, _PROBE)) for cid in channels]
    deadline = time.monotonic() + timeout_s
    out: dict[bytes, str] = {}
    for cid, fut in futures:
        out[cid] = fut.result(max(0.0, deadline - time.monotonic()))
    return out


# --------------------------------------------------------------------------------------------
# the whole scenario


def _traffic(opts: BenchOptions) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, Any]]]:
    """The scenario's traffic: ``(encoded stream, decoded stream)``, both in arrival order."""
    from .demo.traffic import generate

    was = gc.isenabled()
    gc.disable()
    try:
        decoded = generate(
            opts.n_peers, opts.channels_per_peer, opts.messages, opts.seed,
            close_fraction=opts.close_fraction,
        )
        dumps = cbor2.dumps
        encoded = [(cid, dumps(msg)) for cid, msg in decoded]
    finally:
        if was:
            gc.enable()
    return encoded, decoded


def _lightning_options(opts: BenchOptions, cost_iters: int) -> dict[str, Any]:
    options: dict[str, Any] = {"cpu_cost_us": float(opts.cpu_cost_us)}
    if cost_iters:
        options["cost_iters"] = cost_iters
    return options


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole scenario of ``opts`` and return the report (JSON-ready; see
    :func:`format_report` for its reading). ``report["ok"]`` is False if shardpool showed any order
    violation, sequence error, failure or digest mismatch.

    Raises:
        ValueError: an option is out of range.
        ShardPoolError / TimeoutError / RuntimeError: a pool or baseline run failed.
    """
    opts.check()
    say = progress or Progress(enabled=False)
    wall0 = time.perf_counter()
    say(
        f"traffic: {opts.messages:,} messages over {opts.n_peers * opts.channels_per_peer:,} "
        f"channel slots ({opts.n_peers:,} peers), seed {opts.seed}"
    )
    encoded, decoded = _traffic(opts)
    states, ref_violations = replay(decoded)
    if ref_violations:  # the generator promises a valid stream; anything else is a bug there
        raise RuntimeError(f"the traffic is not valid when replayed serially: {ref_violations}")
    reference = {cid: state_digest(st) for cid, st in states.items()}
    channel_ids = list(reference)
    mix = Counter(msg["type"] for _, msg in decoded)
    payload_avg = sum(len(p) for _, p in encoded) / len(encoded)
    say(f"traffic ready: {len(channel_ids):,} channel ids, payload {payload_avg:.0f} B on average")
    cost_iters = calibrate_cost(opts.cpu_cost_us)

    rate = opts.rate if opts.rate is not None else 20_000.0
    lightning_runs: list[PoolRun] = []
    trivial_runs: list[PoolRun] = []
    many_runs: list[PoolRun] = []
    bare_runs: list[Any] = []
    queue_runs: list[Any] = []
    common: dict[str, Any] = {
        "batch_size": opts.batch_size,
        "max_inflight": opts.max_inflight,
        "config": opts.config,
        "timeout_s": opts.timeout_s,
    }
    if opts.baselines:
        from .baselines import run_bare_zmq, run_mp_queue
    for r in range(opts.repeats):
        tag = f"repeat {r + 1}/{opts.repeats}"
        # Rotating the order each repeat spreads slow phases of the machine over all contenders.
        steps: list[str] = ["lightning"] + (
            ["trivial", "bare", "many", "queue"] if opts.baselines else []
        )
        shift = r % len(steps)
        for step in steps[shift:] + steps[:shift]:
            if step == "lightning":
                run = run_pool(
                    encoded, opts.workers, handler=LIGHTNING_HANDLER,
                    handler_options=_lightning_options(opts, cost_iters),
                    rate=rate if opts.mode == "open" else None,
                    sample_every=1 if opts.mode == "open" else opts.sample_every,
                    probe=channel_ids, name="shardpool", **common,
                )
                lightning_runs.append(run)
                bad = sum(1 for c in channel_ids if run.digests.get(c) != reference[c])
                run.digests = {}
                run.hot_channels = run.hot_channels[:3]
                run.digest_mismatches = bad
                say(
                    f"{tag}  shardpool LightningHandler  {run.msgs_per_s:>12,.0f} msgs/s  "
                    f"violations {run.violations}  digest mismatches {bad}"
                )
            elif step == "trivial":
                run = run_pool(encoded, opts.workers, handler=TRIVIAL_HANDLER,
                               name="shardpool_trivial", **common)
                trivial_runs.append(run)
                say(f"{tag}  shardpool trivial handler   {run.msgs_per_s:>12,.0f} msgs/s")
            elif step == "many":
                run = run_pool(encoded, opts.workers, handler=TRIVIAL_HANDLER, many=True,
                               name="shardpool_trivial_many", **common)
                many_runs.append(run)
                say(f"{tag}  shardpool trivial, batched  {run.msgs_per_s:>12,.0f} msgs/s")
            elif step == "bare":
                res = run_bare_zmq(encoded, opts.workers, batch_size=opts.batch_size,
                                   timeout=opts.timeout_s)
                bare_runs.append(res)
                say(f"{tag}  bare pyzmq+cbor2 ceiling    {res.msgs_per_s:>12,.0f} msgs/s")
            else:
                res = run_mp_queue(encoded, opts.workers, timeout=opts.timeout_s)
                queue_runs.append(res)
                say(f"{tag}  multiprocessing.Queue pool  {res.msgs_per_s:>12,.0f} msgs/s")

    lightning_median = _median([r.msgs_per_s for r in lightning_runs])
    latency: dict[str, Any]
    saturated: dict[str, Any] | None = None
    extra_runs: list[PoolRun] = []  # counted for order, not for throughput
    if opts.mode == "open":
        samples = [ns for run in lightning_runs for ns in run.latency_ns]
        latency = {"mode": "open", "rate": rate, "messages": len(samples),
                   "achieved_msgs_per_s": round(lightning_median, 1),
                   "sampled": "every message", "us": latency_summary(samples)}
    else:
        lat_rate = max(1.0, opts.latency_load * lightning_median)
        n = max(1, min(len(encoded), int(lat_rate * opts.latency_seconds)))
        say(f"latency: open-loop at {lat_rate:,.0f} msgs/s ({opts.latency_load:.0%} of the "
            f"median throughput), {n:,} messages, every one timed")
        lat_run = run_pool(
            encoded[:n], opts.workers, handler=LIGHTNING_HANDLER,
            handler_options=_lightning_options(opts, cost_iters), rate=lat_rate, sample_every=1,
            name="shardpool_latency", **common,
        )
        extra_runs.append(lat_run)
        latency = {
            "mode": "open", "rate": round(lat_rate, 1), "messages": n,
            "achieved_msgs_per_s": round(lat_run.msgs_per_s, 1), "sampled": "every message",
            "us": latency_summary(lat_run.latency_ns),
        }
        samples = [ns for run in lightning_runs for ns in run.latency_ns]
        saturated = {"mode": "closed", "sampled": f"1 in {opts.sample_every}",
                     "us": latency_summary(samples)}

    bytype: dict[str, Any] | None = None
    if opts.bytype_messages:
        bytype = _run_bytype(opts, encoded, decoded, say, common, cost_iters)

    # ---- assemble the report ------------------------------------------------------------------
    med_run = sorted(lightning_runs, key=lambda r: r.msgs_per_s)[len(lightning_runs) // 2]
    per_worker = med_run.per_worker
    total = sum(per_worker)
    shares = [round(p / total, 4) if total else 0.0 for p in per_worker]
    mean = total / len(per_worker) if per_worker else 0.0
    every_run = lightning_runs + extra_runs
    by_code: Counter[str] = Counter()
    seq_errors: Counter[str] = Counter()
    for run in every_run:
        by_code.update(run.violations_by_code)
        seq_errors.update(run.sequence_errors)
    digest_bad = sum(r.digest_mismatches for r in lightning_runs)
    failures = sum(r.failures for r in every_run)
    shardpool: dict[str, Any] = {
        "handler": f"LightningHandler(cpu_cost_us={opts.cpu_cost_us:g})",
        "cost_iters": cost_iters,
        "workers": opts.workers,
        "mode": opts.mode,
        "msgs_per_s": round(lightning_median, 1),
        "runs": [r.summary() for r in lightning_runs],
        "per_worker": per_worker,
        "balance": {
            "shares": shares,
            "max_over_mean": round(max(per_worker) / mean, 4) if mean else None,
        },
        "hot_channels": med_run.hot_channels,
        "violations": sum(by_code.values()),
        "violations_by_code": dict(sorted(by_code.items())),
        "force_closed_channels": sum(r.violating_channels for r in every_run),
        "failures": failures,
        "sequence_errors": {k: seq_errors.get(k, 0) for k in ("gaps", "duplicates", "reorders")},
        "digest": {
            "channels_checked": len(channel_ids) * len(lightning_runs),
            "mismatches": digest_bad,
        },
        "latency": latency,
        "latency_saturated": saturated,
    }
    report: dict[str, Any] = {
        "version": 1,
        "machine": {
            "cpus": available_cpus(),
            "python": platform.python_version(),
            "platform": platform.platform(terse=True),
        },
        "options": asdict(opts),
        "traffic": {
            "messages": len(encoded),
            "channel_slots": opts.n_peers * opts.channels_per_peer,
            "channel_ids": len(channel_ids),
            "peers": opts.n_peers,
            "seed": opts.seed,
            "payload_bytes_avg": round(payload_avg, 1),
            "mix": dict(mix.most_common()),
        },
        "shardpool": shardpool,
        "baselines": {},
        "ratios": {},
        "ratios_paired": {},
    }
    if opts.baselines:
        trivial = _median([r.msgs_per_s for r in trivial_runs])
        bare = _median([r.msgs_per_s for r in bare_runs])
        mpq = _median([r.msgs_per_s for r in queue_runs])
        many = _median([r.msgs_per_s for r in many_runs])
        report["shardpool_trivial"] = {
            "handler": "noop (payload decoded by the worker)",
            "submit": "submit_bytes, one call per message",
            "msgs_per_s": round(trivial, 1),
            "runs": [r.summary() for r in trivial_runs],
            "sequence_errors": _sum_seq(trivial_runs),
        }
        report["shardpool_trivial_many"] = {
            "handler": "noop (payload decoded by the worker)",
            "submit": "submit_many_bytes, the whole stream in one call",
            "msgs_per_s": round(many, 1),
            "runs": [r.summary() for r in many_runs],
            "sequence_errors": _sum_seq(many_runs),
        }
        report["baselines"]["bare_zmq"] = _baseline_summary(bare_runs, bare)
        report["baselines"]["mp_queue"] = _baseline_summary(queue_runs, mpq)
        report["ratios"] = {
            "pool_over_bare": _ratio(trivial, bare),
            "pool_over_mp_queue": _ratio(trivial, mpq),
            "pool_many_over_bare": _ratio(many, bare),
            "pool_many_over_mp_queue": _ratio(many, mpq),
            "lightning_over_bare": _ratio(lightning_median, bare),
            "lightning_over_mp_queue": _ratio(lightning_median, mpq),
        }
        # Per repeat (its runs ran back to back), then the median: steadier than the ratio of
        # the medians when the machine has slow spells.
        report["ratios_paired"] = {
            "pool_over_bare": _paired([r.msgs_per_s for r in trivial_runs],
                                      [r.msgs_per_s for r in bare_runs]),
            "pool_over_mp_queue": _paired([r.msgs_per_s for r in trivial_runs],
                                          [r.msgs_per_s for r in queue_runs]),
            "pool_many_over_bare": _paired([r.msgs_per_s for r in many_runs],
                                           [r.msgs_per_s for r in bare_runs]),
            "pool_many_over_mp_queue": _paired([r.msgs_per_s for r in many_runs],
                                               [r.msgs_per_s for r in queue_runs]),
        }
        shardpool["failures"] += sum(r.failures for r in trivial_runs + many_runs)
        for k, v in _sum_seq(trivial_runs + many_runs).items():
            shardpool["sequence_errors"][k] += v
    if bytype is not None:
        report["baselines"]["by_type"] = bytype
        shardpool["failures"] += bytype["shardpool_same_traffic"]["failures"]
        for k, v in bytype["shardpool_same_traffic"]["sequence_errors"].items():
            shardpool["sequence_errors"][k] += v
    same = bytype["shardpool_same_traffic"] if bytype is not None else {"violations": 0,
                                                                         "digest_mismatches": 0}
    report["ok"] = (
        shardpool["violations"] == 0
        and shardpool["failures"] == 0
        and digest_bad == 0
        and not any(shardpool["sequence_errors"].values())
        and same["violations"] == 0
        and same["digest_mismatches"] == 0
    )
    report["elapsed_s"] = round(time.perf_counter() - wall0, 2)
    say(f"done in {report['elapsed_s']:.1f} s")
    return report


def _sum_seq(runs: Sequence[PoolRun]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for r in runs:
        total.update(r.sequence_errors)
    return {k: total.get(k, 0) for k in ("gaps", "duplicates", "reorders")}


def _baseline_summary(runs: Sequence[Any], median: float) -> dict[str, Any]:
    return {
        "msgs_per_s": round(median, 1),
        "runs": [
            {"msgs_per_s": round(r.msgs_per_s, 1), "elapsed_s": round(r.elapsed_s, 4),
             "per_worker": list(r.per_worker)}
            for r in runs
        ],
    }


def _run_bytype(
    opts: BenchOptions,
    encoded: Sequence[tuple[bytes, bytes]],
    decoded: Sequence[tuple[bytes, Any]],
    say: Progress,
    common: dict[str, Any],
    cost_iters: int,
) -> dict[str, Any]:
    """The by-type dispatch on a prefix of the traffic, and shardpool on the same prefix with the
    same per-message delay (an async handler awaiting it)."""
    from .demo.bytype import run_by_type_dispatch

    n = min(opts.bytype_messages, len(decoded))
    prefix = list(decoded[:n])
    say(f"by-type dispatch (lnd 8393): first {n:,} messages, {opts.bytype_delay_s * 1e6:.0f} us "
        "per message")
    res = run_by_type_dispatch(prefix, delay_s=opts.bytype_delay_s, timeout=opts.timeout_s,
                               seed=opts.seed)
    states, _ = replay(prefix)
    channels = list(states)
    ours = run_pool(
        encoded[:n], opts.workers, handler="shardpool.loadtest:AsyncDigestLightningHandler",
        handler_options={"delay_s": opts.bytype_delay_s,
                         **_lightning_options(opts, cost_iters)},
        probe=channels, name="shardpool_same_traffic", **common,
    )
    mismatches = sum(1 for c in channels if ours.digests.get(c) != state_digest(states[c]))
    say(f"by-type: {res['violations']:,} violations, {res['force_closed_channels']:,}/"
        f"{res['channels']:,} channels force-closed; shardpool on the same traffic: "
        f"{ours.violations} violations, {mismatches} digest mismatches")
    return {
        "messages": res["messages"],
        "channels": res["channels"],
        "delay_s": opts.bytype_delay_s,
        "violations": res["violations"],
        "violations_by_code": res["violations_by_code"],
        "root_causes": res["root_causes"],
        "force_closed_channels": res["force_closed_channels"],
        "reordered_messages": res["reordered_messages"],
        "msgs_per_s": round(res["messages"] / res["elapsed_s"], 1) if res["elapsed_s"] else None,
        "shardpool_same_traffic": {
            "handler": f"AsyncLightningHandler(delay_s={opts.bytype_delay_s:g})",
            "violations": ours.violations,
            "force_closed_channels": ours.violating_channels,
            "digest_mismatches": mismatches,
            "failures": ours.failures,
            "sequence_errors": ours.sequence_errors,
            "msgs_per_s": round(ours.msgs_per_s, 1),
        },
    }


class AsyncDigestLightningHandler(DigestLightningHandler):
    """:class:`DigestLightningHandler` whose ``handle`` first awaits ``delay_s`` seconds (the
    same handling time the by-type workers spend per message); probes answer at once."""

    def __init__(self, delay_s: float = 0.0, cpu_cost_us: float = 0.0,
                 cost_types: tuple[str, ...] = ("commitment_signed",),
                 cost_iters: int | None = None) -> None:
        """Raises ValueError: ``delay_s`` negative or not finite, or as the parent class."""
        super().__init__(cpu_cost_us, cost_types, cost_iters)
        if not (isinstance(delay_s, (int, float)) and math.isfinite(delay_s) and delay_s >= 0):
            raise ValueError(f"delay_s must be a finite number >= 0, got {delay_s!r}")
        self.delay_s = float(delay_s)

    async def handle(  # type: ignore[override]
        self, channel: Any, seq: Any, message: Any, redelivered: Any
    ) -> dict[str, Any] | str | None:
        import asyncio

        if not (type(message) is dict and message.get("type") == PROBE_TYPE):
            await asyncio.sleep(self.delay_s)
        return DigestLightningHandler.handle(self, channel, seq, message, redelivered)


# --------------------------------------------------------------------------------------------
# the text report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report of :func:`run_bench` (a multi-line string)."""
    o = report["options"]
    t = report["traffic"]
    sp = report["shardpool"]
    m = report["machine"]
    lines: list[str] = []
    add = lines.append
    add(
        f"shardpool bench: {t['messages']:,} messages, {t['channel_ids']:,} channels "
        f"({t['peers']:,} peers, seed {t['seed']}, payload {t['payload_bytes_avg']:.0f} B avg), "
        f"{o['workers']} workers, {o['repeats']} repeats, "
        + ("closed-loop (max speed)" if o["mode"] == "closed"
           else f"open-loop at {sp['latency']['rate']:,.0f} msgs/s")
    )
    add(f"machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}")
    add("")
    add(f"{'throughput (same traffic, interleaved runs)':<50}{'median msgs/s':>14}   each run")
    rows: list[tuple[str, float, list[float]]] = [
        (f"shardpool, {sp['handler']}", sp["msgs_per_s"], [r["msgs_per_s"] for r in sp["runs"]]),
    ]
    if "shardpool_trivial" in report:
        st = report["shardpool_trivial"]
        rows.append(("shardpool, trivial handler, submit_bytes", st["msgs_per_s"],
                     [r["msgs_per_s"] for r in st["runs"]]))
    if "shardpool_trivial_many" in report:
        st = report["shardpool_trivial_many"]
        rows.append(("shardpool, trivial handler, submit_many_bytes", st["msgs_per_s"],
                     [r["msgs_per_s"] for r in st["runs"]]))
    b = report["baselines"]
    if "bare_zmq" in b:
        rows.append(("bare pyzmq+cbor2 harness (ceiling)", b["bare_zmq"]["msgs_per_s"],
                     [r["msgs_per_s"] for r in b["bare_zmq"]["runs"]]))
    if "mp_queue" in b:
        rows.append(("multiprocessing.Queue per worker (naive)", b["mp_queue"]["msgs_per_s"],
                     [r["msgs_per_s"] for r in b["mp_queue"]["runs"]]))
    for label, med, runs in rows:
        each = " ".join(f"{x / 1000:,.0f}k" for x in runs)
        add(f"  {label:<48}{med:>14,.0f}   {each}")
    r = report.get("ratios") or {}
    if r:
        add(
            f"  ratios, trivial handler: shardpool÷bare {r['pool_over_bare']} "
            f"(submit_many_bytes {r['pool_many_over_bare']})   shardpool÷mp.Queue "
            f"{r['pool_over_mp_queue']} (submit_many_bytes {r['pool_many_over_mp_queue']})"
        )
        rp = report.get("ratios_paired") or {}
        if rp:
            add(
                f"  same, median of per-repeat ratios: {rp['pool_over_bare']} "
                f"({rp['pool_many_over_bare']}) and {rp['pool_over_mp_queue']} "
                f"({rp['pool_many_over_mp_queue']})"
            )
        add(
            f"  ratios, LightningHandler: shardpool÷bare {r['lightning_over_bare']}   "
            f"shardpool÷mp.Queue {r['lightning_over_mp_queue']}"
        )
    add("")
    lat = sp["latency"]
    us = lat["us"]
    pct = "  ".join(f"{k} {us[k]:,.0f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
    add(f"latency submit→result, µs, open-loop at {lat['rate']:,.0f} msgs/s "
        f"({us['count']:,} messages, every one timed):")
    add(f"  {pct}")
    sat = sp.get("latency_saturated")
    if sat:
        us = sat["us"]
        pct = "  ".join(f"{k} {us[k]:,.0f}" for k in ("p50", "p90", "p99", "p99.9", "max"))
        add(f"latency at saturation, µs, closed-loop ({sat['sampled']} timed, "
            f"{us['count']:,} samples; mostly queueing in the in-flight window):")
        add(f"  {pct}")
    add("")
    bal = sp["balance"]
    shares = "  ".join(f"w{i} {s:.1%}" for i, s in enumerate(bal["shares"]))
    add(f"per-worker balance (median run): {shares}   max/mean {bal['max_over_mean']}")
    if sp["hot_channels"]:
        hot = ", ".join(f"{h}…={c}" for h, c in sp["hot_channels"][:3])
        add(f"  hottest channels: {hot}")
    se = sp["sequence_errors"]
    dg = sp["digest"]
    add(
        f"order: {sp['violations']} protocol violations, {sp['force_closed_channels']} "
        f"force-closed channels, {se['gaps']} gaps / {se['duplicates']} duplicates / "
        f"{se['reorders']} reorders, {sp['failures']} failures; final state = serial replay "
        f"on {dg['channels_checked'] - dg['mismatches']:,}/{dg['channels_checked']:,} "
        "channel checks"
    )
    bt = b.get("by_type")
    if bt:
        causes = ", ".join(f"{k} {v}" for k, v in sorted(bt["root_causes"].items(),
                                                            key=lambda kv: -kv[1]))
        same = bt["shardpool_same_traffic"]
        add(
            f"by-type dispatch (lnd 8393), first {bt['messages']:,} messages, "
            f"{bt['delay_s'] * 1e6:.0f} µs per message: {bt['violations']:,} violations, "
            f"{bt['force_closed_channels']:,}/{bt['channels']:,} channels force-closed"
        )
        if causes:
            add(f"  root causes: {causes}")
        add(
            f"  shardpool, same traffic, {same['handler']}: {same['violations']} violations, "
            f"{same['force_closed_channels']} force-closed, {same['digest_mismatches']} "
            "digest mismatches"
        )
    add("")
    add(f"verdict: {'OK - order kept' if report['ok'] else 'FAILED - order broken'}   "
        f"(bench took {report['elapsed_s']:.1f} s)")
    return "\n".join(lines)
