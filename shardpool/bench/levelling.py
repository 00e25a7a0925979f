"""``shardpool bench --workload levelling``: does load levelling pay, and what does a move cost.

Every pool here runs :class:`~shardpool.bench.handlers.CountingSpinHandler` (``payload = "raw"``):
a fixed CPU cost per message (``--message-cost-us``, calibrated once in this process and handed
to every worker as SHA-256 rounds) and an order check on each channel's message number. Three
phases (``--phases``):

* **zipf** — closed-loop traffic (as fast as backpressure allows) whose channel rates follow a
  Zipf law (``--zipf-s`` over ``--channels``), for ``--run-seconds``, with ``pool.rebalance =
  "off"`` and ``"auto"`` interleaved repeat by repeat in a rotating order. Sampled every
  :data:`SAMPLE_S`: each worker's CPU time (psutil, out of band), the messages submitted, the
  front's levelling figures and the slot table. Reported per mode (medians of the repeats):
  messages/s (whole run, and ``steady``: the second half), max/mean of the workers' CPU early
  (first third of the run) and late (last third), the committed moves and moved slots, slots
  moved back (ping-pong), the time of the last move and the time max/mean settled; then the
  ratios auto ÷ off (of the medians and per repeat).
* **hot** — one channel carrying ``--hot-share`` of the traffic, the rest spread evenly over the
  other channels, open loop. Every message is timed (submit → done). In each repeat, a run with
  ``rebalance = "off"`` first calibrates its rate (see below) so that the hot channel's worker is
  ``--hot-load`` busy, measures the latencies of the hot channel's *neighbours* (the other
  channels on its worker) in a "before" window, pins the channel with ``pool.pin`` and measures
  them again in an "after" window; then a run with ``rebalance = "auto"`` at the same rate
  starts on even traffic, turns the channel hot and lets the balancer pin it on its own
  (``pool.hot_channel_share``). Reported: p50/p99 of the neighbours, of the other channels and
  of the hot channel, before and after; the neighbours' p99 ratio before ÷ after; each worker's
  busy share in the windows; and whether the "before" queue kept growing (:func:`saturated`: then
  the ratio is not a measurement).
* **pause** — uniform traffic, open loop with the workers :data:`PAUSE_LOAD` busy on average,
  ``rebalance = "off"``; ``--pause-moves`` moves of 1 slot and as many of 64 slots (slots that
  carry traffic), alternating, each through ``pool.move_slots``. Reported per size: p50/p99 of
  the pause (fence to commit, ``Move.pause_s``: how long the moved channels' messages were held
  at the front), of the call as the caller sees it, and the messages held.

Open-loop rates are calibrated, not derived: each open-loop phase first measures the pool's
closed-loop capacity (:func:`capacity_run`), starts at a fraction of it (:data:`PROBE_LOAD`),
measures the workers' CPU for :data:`PROBE_S` and scales the rate to the target load, within what
the machine has free (:func:`calibrated_rate`). A closed-loop figure alone would overload the
pool: at moderate open-loop rates messages travel in small frames, and each frame costs the front
and its worker thread wake-ups that a full frame shares among hundreds of messages. Every run
reports the CPUs the machine spent on other work meanwhile (:class:`MachineMeter`).

Every run is checked for order: the handler's order check, the workers' sequence counters, and
after the drain every channel's last message number against what was submitted. The figures are
measured on whatever machine runs this; on a shared 2-core machine the front and the workers
share both cores, which is stated in the report.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ..config import load_config
from ..pool import ShardPool
from ..routing import slot_of
from .handlers import COUNT_PROBE, SPIN_HANDLER, calibrate_cost
from .options import BenchOptions, available_cpus
from .report import Progress, latency_summary, machine_info, median, paired, ratio
from .runs import ORDER_COUNTERS

__all__ = [
    "MOVE_SIZES",
    "CAPACITY_S",
    "EFFICIENCY_TARGET",
    "MAX_OFFERED",
    "PAUSE_LOAD",
    "SAMPLE_S",
    "Setup",
    "format_levelling_report",
    "backlog_trend",
    "capacity_run",
    "efficiency_points",
    "efficiency_targets",
    "format_scaling",
    "hot_rate",
    "hot_run",
    "ideal_max_over_mean",
    "pause_run",
    "run_levelling_bench",
    "saturated",
    "settled_at",
    "static_shares",
    "zipf_run",
    "zipf_weights",
]

SAMPLE_S = 0.5
"""Seconds between two samples of the workers' CPU, the front's figures and the slot table."""
CAPACITY_S = 4.0
"""Seconds of the closed-loop run that measures what the pool delivers before an open-loop phase."""
MAX_OFFERED = 0.85
"""The hot phase never offers more than this share of the measured capacity."""
PACE_S = 0.002
"""The open-loop producer submits what is due at most every this many seconds: a wake-up per
message would cost the front, the ZeroMQ I/O threads and the workers a wake-up each (on the 2-core
VM ~35-50 µs of CPU apiece, several per message); small bursts share them. Latency is timed from
each message's own submit, so the pacing does not enter it."""
PROBE_S = 2.0
"""Seconds an open-loop run measures the workers' CPU at its start rate before calibrating."""
PROBE_LOAD = 0.3
"""The open-loop runs start at this share of one worker's closed-loop capacity (on the busiest)."""
HEADROOM = 0.85
"""A calibrated rate keeps this bench under this share of the CPUs other work leaves free."""
GROWTH = 3.0
GROWTH_FLOOR_US = 20_000.0
"""A hot run's "before" window counts as saturated when its neighbours' p50 in the last third is
over ``GROWTH`` × the first third's and over ``GROWTH_FLOOR_US`` (see :func:`saturated`)."""
PAUSE_LOAD = 0.5
"""The pause phase's load: the workers busy this share of a CPU on average (calibrated as the hot
runs are; steady, not saturated)."""
MOVE_SIZES = (1, 64)
"""Slots per move in the pause phase."""
_CHUNK = 256  # messages per submit_many_bytes call in the closed-loop runs
_WARMUP_S = 1.0  # open-loop runs: traffic before the first measured window
_SETTLE_S = 1.0  # hot runs: from the pin's commit to the "after" window
_HOT_AFTER_S = 2.0  # auto hot runs: even traffic this long, then the hot channel turns hot
_BEFORE_AFTER_HOT_S = 0.25  # ... and the "before" window opens this long after
_SETTLED_TOL = 0.05  # max/mean within this of its final level counts as settled
_SEQUENCE = 1 << 18  # pre-drawn channel indexes, cycled through


# ---------------------------------------------------------------------------------- the traffic


def channel_ids(n: int, seed: int, tag: str) -> list[bytes]:
    """``n`` stable 32-byte channel ids (the same for a seed and tag everywhere)."""
    return [hashlib.sha256(f"levelling:{tag}:{seed}:{i}".encode()).digest() for i in range(n)]


def zipf_weights(n: int, s: float) -> list[float]:
    """Shares of the traffic of channels 1..n under a Zipf law of exponent ``s`` (sum 1)."""
    raw = [k ** -s for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def static_shares(cids: Sequence[bytes], weights: Sequence[float], workers: int,
                  slots: int) -> list[float]:
    """Each worker's share of the traffic under the pool's initial slot table (slot ``s`` →
    worker ``s % workers``), before anything moves."""
    out = [0.0] * workers
    for cid, w in zip(cids, weights, strict=True):
        out[slot_of(cid, slots) % workers] += w
    return out


def ideal_max_over_mean(weights: Sequence[float], workers: int) -> float:
    """The best max/mean a placement can reach: a channel is never split, so the busiest worker
    carries at least the hottest channel (a lower bound; 1.0 when that channel fits)."""
    return round(max(1.0, workers * max(weights)), 3)


def _draw(weights: Sequence[float], seed: int, n: int = _SEQUENCE) -> list[int]:
    """``n`` channel indexes drawn with ``weights`` (seeded)."""
    return random.Random(seed).choices(range(len(weights)), weights=weights, k=n)


# ------------------------------------------------------------------------------ shared machinery


@dataclass
class Setup:
    """What every phase shares: the options, the calibrated cost, the progress line, the
    workers' measured CPU per message (µs, from the zipf runs; reported) and the pool's measured
    capacity (msgs/s, closed loop, from :func:`capacity_run`: the open-loop phases set their rate
    by it)."""

    opts: BenchOptions
    cost_iters: int
    say: Progress
    cpu_us_per_msg: float = 0.0
    capacity: float = 0.0
    slots: int = 4096

    def pool(self, workers: int, rebalance: str, ledger: Ledger, **extra: Any) -> ShardPool:
        o = self.opts
        pool = ShardPool(
            SPIN_HANDLER, config=o.config, on_result=ledger.on_result,
            on_failure=ledger.on_failure, workers=workers, payload="raw",
            handler_options={"cost_iters": self.cost_iters}, batch_size=o.batch_size,
            max_inflight=o.window, rebalance=rebalance,
            rebalance_interval_s=o.rebalance_interval_s, rebalance_grace_s=o.rebalance_grace_s,
            **extra,
        )
        self.slots = pool.config.pool.slots
        return pool


class Ledger:
    """What was submitted per channel and what came back: order violations, failures; after the
    drain, :meth:`check` compares every channel's last message number with the count sent."""

    def __init__(self, cids: Sequence[bytes]) -> None:
        self.cids = list(cids)
        self.sent = [0] * len(cids)
        self.violations: list[Any] = []
        self.failures: list[str] = []

    def next_payload(self, i: int) -> bytes:
        """The next message of channel ``i``: its number, 8 bytes big-endian."""
        k = self.sent[i] = self.sent[i] + 1
        return k.to_bytes(8, "big")

    def on_result(self, cid: bytes, seq: int, value: Any) -> None:
        if type(value) is dict and "violation" in value:
            self.violations.append(value)

    def on_failure(self, error: BaseException) -> None:
        self.failures.append(f"{type(error).__name__}: {error}")

    def done(self, value: Any, error: BaseException | None) -> None:
        """A timed message's ``on_done`` outcome (results and failures as above)."""
        if error is not None:
            self.on_failure(error)
        elif type(value) is dict and "violation" in value:
            self.violations.append(value)

    def check(self, pool: ShardPool, timeout_s: float) -> dict[str, Any]:
        """After the drain: the workers' sequence counters, then every channel's last number."""
        stats = pool.stats(timeout=min(10.0, timeout_s))
        seq = dict.fromkeys(ORDER_COUNTERS, 0)
        for w in stats["workers"]:
            for k in seq:
                seq[k] += int(w.get(k, 0))
        futures = [pool.request_bytes(cid, COUNT_PROBE) for cid in self.cids]
        deadline = time.monotonic() + timeout_s
        last = [f.result(max(0.0, deadline - time.monotonic())) for f in futures]
        lost = sum(1 for n, got in zip(self.sent, last, strict=True) if got != n)
        return {
            "messages": sum(self.sent),
            "violations": len(self.violations),
            "failures": len(self.failures),
            "sequence_errors": seq,
            "channels_checked": len(self.cids),
            "channels_mismatched": lost,
            "first_problems": [str(v) for v in self.violations[:3]] + self.failures[:3],
        }


def _order_ok(order: dict[str, Any]) -> bool:
    return (order["violations"] == 0 and order["failures"] == 0
            and order["channels_mismatched"] == 0 and not any(order["sequence_errors"].values()))


class CpuMeter:
    """The workers' CPU time, read out of band through psutil (a restarted worker's new process
    is picked up; its predecessor's time is lost, which only under-counts)."""

    def __init__(self, pool: ShardPool) -> None:
        self.pool = pool
        self.procs: dict[int, psutil.Process] = {}
        self.last = self.read()
        self.t = time.perf_counter()

    def read(self) -> list[float]:
        out = []
        for pid in self.pool.worker_pids():
            if pid is None:
                out.append(0.0)
                continue
            try:
                proc = self.procs.get(pid) or self.procs.setdefault(pid, psutil.Process(pid))
                t = proc.cpu_times()
                out.append(t.user + t.system)
            except psutil.Error:
                out.append(0.0)
        return out

    def busy(self) -> list[float]:
        """Each worker's share of a core since the previous call."""
        now, cpu = time.perf_counter(), self.read()
        dt = max(1e-9, now - self.t)
        prev = self.last + [0.0] * (len(cpu) - len(self.last))
        out = [max(0.0, (c - p) / dt) for c, p in zip(cpu, prev, strict=False)]
        self.last, self.t = cpu, now
        return out


class MachineMeter:
    """What the whole machine's CPUs did during a run against what this bench used (this process:
    the producer and the front; and the pool's workers): on a shared machine, ``other_cpus`` is
    what other work took (in CPUs, averaged over the run)."""

    def __init__(self, pool: ShardPool) -> None:
        self.workers = CpuMeter(pool)
        self.me = psutil.Process()
        self.t = time.perf_counter()
        self.busy0 = _busy_s(psutil.cpu_times())
        self.front0, self.workers0 = self._own()

    def _own(self) -> tuple[float, float]:
        t = self.me.cpu_times()
        return t.user + t.system, sum(self.workers.read())

    def result(self) -> dict[str, float]:
        dt = max(1e-9, time.perf_counter() - self.t)
        busy = (_busy_s(psutil.cpu_times()) - self.busy0) / dt
        front, workers = self._own()
        front, workers = (front - self.front0) / dt, (workers - self.workers0) / dt
        return {"machine_busy_cpus": round(busy, 3), "bench_cpus": round(front + workers, 3),
                "front_cpus": round(front, 3), "workers_cpus": round(workers, 3),
                "other_cpus": round(max(0.0, busy - front - workers), 3)}


def _busy_s(t: Any) -> float:
    """Busy CPU seconds of a ``psutil.cpu_times()`` (guest time is already in user time)."""
    return float(t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0)
                 + getattr(t, "softirq", 0.0))


def _others(runs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Median and most of the other work's CPUs over ``runs``."""
    xs = [r["machine"]["other_cpus"] for r in runs if "machine" in r]
    return {"other_cpus_median": round(median(xs), 3) if xs else None,
            "other_cpus_max": round(max(xs), 3) if xs else None}


def max_over_mean(values: Sequence[float]) -> float | None:
    mean = sum(values) / len(values) if values else 0.0
    return round(max(values) / mean, 4) if mean > 0 else None


def settled_at(series: Sequence[tuple[float, float]], tol: float = _SETTLED_TOL) -> float | None:
    """When a max/mean series stopped improving: the first time after which its rolling median
    of three stays within ``tol`` of the final level (the median of its last third). None for
    fewer than three points."""
    if len(series) < 3:
        return None
    values = [v for _, v in series]
    final = median(values[-max(1, len(values) // 3):])
    smooth = [median(values[max(0, i - 1): i + 2]) for i in range(len(values))]
    at = series[-1][0]
    for i in range(len(smooth) - 1, -1, -1):
        if smooth[i] > final + tol:
            break
        at = series[i][0]
    return round(at, 2)


def _pct(samples_us: Sequence[float], q: float) -> float | None:
    if not samples_us:
        return None
    ordered = sorted(samples_us)
    return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))], 3)


# ---------------------------------------------------------------------------------- phase: zipf


@dataclass
class _ZipfTrace:
    """What one zipf run sampled."""

    t: list[float] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    busy: list[list[float]] = field(default_factory=list)
    front_load: list[list[float]] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)
    slot_moves: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, slot, from, to


def _table(pool: ShardPool, slots: int) -> list[int]:
    return [pool.worker_of_slot(s) for s in range(slots)]


def _sample(pool: ShardPool, meter: CpuMeter, trace: _ZipfTrace, t: float, sent: int,
            table: list[int], slots: int) -> list[int]:
    """One sample of a zipf run; returns the slot table now."""
    trace.t.append(round(t, 3))
    trace.sent.append(sent)
    trace.busy.append([round(b, 4) for b in meter.busy()])
    placement = pool.placement()
    trace.front_load.append(list(placement["levelling"]["load"]))
    trace.committed.append(int(placement["moves"]["committed"]))
    now = _table(pool, slots)
    trace.slot_moves += [(round(t, 3), s, a, b) for s, (a, b) in enumerate(zip(table, now,
                                                                               strict=True))
                         if a != b]
    return now


def zipf_run(setup: Setup, workers: int, mode: str, seed: int | None = None) -> dict[str, Any]:
    """One closed-loop Zipf run of ``setup.opts.run_s`` seconds with ``pool.rebalance = mode``;
    its figures (see the module docstring)."""
    o = setup.opts
    cids = channel_ids(o.n_channels, o.seed if seed is None else seed, "zipf")
    return _closed_run(setup, workers, mode, cids, zipf_weights(o.n_channels, o.zipf_s), o.run_s)


def capacity_run(setup: Setup, workers: int) -> dict[str, Any]:
    """What the pool delivers on this machine now: :data:`CAPACITY_S` seconds of closed-loop
    traffic spread evenly over ``--channels`` (``rebalance = "off"``), submitted the way the
    open-loop phases submit (one ``submit_bytes`` per message, each timed through ``on_done``),
    so that the front's cost per message is counted. The open-loop phases set their rates from
    its steady messages/s (the second half) rather than from the workers' CPU per message: on a
    shared machine a worker does not get a whole core (the front, the producer and other work
    take their share), and a rate set for one would overload the pool."""
    o = setup.opts
    n = max(2, o.n_channels)
    cids = channel_ids(n, o.seed, "capacity")
    draws = _draw([1.0 / n] * n, o.seed + 3)
    ledger = Ledger(cids)
    pool = setup.pool(workers, "off", ledger)
    try:
        machine = MachineMeter(pool)
        meter = CpuMeter(pool)
        cpu0 = sum(meter.last)
        timed = _Timed(time.perf_counter())
        submit, payload, done = pool.submit_bytes, ledger.next_payload, timed.done
        clock, partial, nd = time.perf_counter, functools.partial, len(draws)
        t0 = timed.t0
        i, mark = 0, (t0, 0)
        while True:
            for _ in range(64):
                c = draws[i % nd]
                i += 1
                submit(cids[c], payload(c), on_done=partial(done, clock(), 0, ledger))
            now = clock()
            if mark[1] == 0 and now - t0 >= CAPACITY_S / 2:
                mark = (now, i)
            if now - t0 >= CAPACITY_S:
                break
        pool.drain(o.timeout_s)
        elapsed = clock() - t0
        cpu_s = sum(meter.read()) - cpu0
        used = machine.result()
        order = ledger.check(pool, o.timeout_s)
    finally:
        pool.close(timeout=min(10.0, o.timeout_s))
    steady = (i - mark[1]) / (now - mark[0]) if now > mark[0] and mark[1] else i / (now - t0)
    out = {
        "workers": workers,
        "messages": i,
        "elapsed_s": round(elapsed, 3),
        "capacity_msgs_per_s": round(steady, 1),
        "worker_cpu_us_per_message": round(cpu_s / i * 1e6, 1) if i else None,
        "latency_us": _lat([lat * 1e6 for _, lat, _ in timed.rows]),
        "machine": used,
        "order": order,
    }
    setup.say(f"capacity ({workers} workers, uniform, closed loop {CAPACITY_S:g} s): "
              f"{steady:,.0f} msgs/s, workers' CPU {out['worker_cpu_us_per_message']} µs/msg, "
              f"other work {used['other_cpus']:.2f} CPUs, "
              f"order {'ok' if _order_ok(order) else 'BROKEN'}")
    return out


def _closed_run(setup: Setup, workers: int, mode: str, cids: list[bytes],
                weights: Sequence[float], run_s: float) -> dict[str, Any]:
    """Closed-loop traffic (as fast as backpressure allows) drawn with ``weights`` over
    ``cids`` for ``run_s`` seconds, sampled every :data:`SAMPLE_S`; drained and checked."""
    o = setup.opts
    draws = _draw(weights, o.seed)
    ledger = Ledger(cids)
    pool = setup.pool(workers, mode, ledger)
    try:
        machine = MachineMeter(pool)
        meter = CpuMeter(pool)
        cpu0 = sum(meter.last)
        trace = _ZipfTrace()
        table = _table(pool, setup.slots)
        payload = ledger.next_payload
        sent, pos = 0, 0
        t0 = time.perf_counter()
        due = t0 + SAMPLE_S
        while True:
            chunk = [(cids[i], payload(i)) for i in draws[pos: pos + _CHUNK]]
            pos = (pos + _CHUNK) % len(draws)
            pool.submit_many_bytes(chunk)
            sent += len(chunk)
            now = time.perf_counter()
            if now >= due:
                table = _sample(pool, meter, trace, now - t0, sent, table, setup.slots)
                due += SAMPLE_S
                if now - t0 >= run_s:
                    break
        pool.drain(o.timeout_s)
        elapsed = time.perf_counter() - t0
        cpu_s = sum(meter.read()) - cpu0
        used = machine.result()
        # Moves that committed during the drain count too (a move waits for its old worker's
        # backlog, so one started near the end commits after the last sample).
        trace.slot_moves += [(round(elapsed, 3), s, a, b) for s, (a, b)
                             in enumerate(zip(table, _table(pool, setup.slots), strict=True))
                             if a != b]
        moves = pool.placement()["moves"]
        order = ledger.check(pool, o.timeout_s)
    finally:
        pool.close(timeout=min(10.0, o.timeout_s))
    return {**_zipf_summary(o, workers, mode, trace, sent, elapsed, cpu_s, moves, order),
            "machine": used}


def _zipf_summary(o: BenchOptions, workers: int, mode: str, trace: _ZipfTrace, sent: int,
                  elapsed: float, cpu_s: float, moves: dict[str, Any],
                  order: dict[str, Any]) -> dict[str, Any]:
    n = len(trace.t)
    third = max(1, n // 3)
    mom = [(t, m) for t, b in zip(trace.t, trace.busy, strict=True)
           if (m := max_over_mean(b)) is not None]
    early = [m for t, m in mom if t <= trace.t[min(n - 1, third)]]
    late = [m for t, m in mom if t >= trace.t[n - third]]
    half = n // 2
    steady = ((trace.sent[-1] - trace.sent[half]) / (trace.t[-1] - trace.t[half])
              if n > 2 and trace.t[-1] > trace.t[half] else None)
    moved: dict[int, list[int]] = {}
    for _, s, a, b in trace.slot_moves:
        moved.setdefault(s, [a]).append(b)
    back = sum(1 for owners in moved.values() if len(owners) != len(set(owners)))
    last_move = max((t for t, *_ in trace.slot_moves), default=None)
    return {
        "mode": mode,
        "workers": workers,
        "messages": sent,
        "elapsed_s": round(elapsed, 3),
        "msgs_per_s": round(sent / elapsed, 1),
        "steady_msgs_per_s": round(steady, 1) if steady else None,
        "worker_cpu_us_per_message": round(cpu_s / sent * 1e6, 1) if sent else None,
        "worker_utilisation": round(cpu_s / elapsed / workers, 3),
        "cpu_max_over_mean_early": round(median(early), 4) if early else None,
        "cpu_max_over_mean_late": round(median(late), 4) if late else None,
        "busy_late": [round(median([b[i] for b in trace.busy[n - third:]]), 3)
                      for i in range(workers)],
        "front_load_max_over_mean_end": max_over_mean(trace.front_load[-1]) if n else None,
        "moves_committed": int(moves["committed"]),
        "moves_aborted": int(moves["aborted"]),
        "pause_p50_s": moves["pause_p50_s"],
        "pause_p99_s": moves["pause_p99_s"],
        "slots_moved": len(moved),
        "slot_moves": len(trace.slot_moves),
        "slots_moved_back": back,
        "last_move_s": last_move,
        "moving_at_end": bool(last_move is not None and trace.t
                              and last_move >= trace.t[n - third]),
        "settled_s": settled_at(mom),
        "series": {"t": trace.t, "cpu_max_over_mean": [m for _, m in mom],
                   "busy": trace.busy, "front_load": trace.front_load,
                   "moves_committed": trace.committed},
        "order": order,
    }


def zipf_phase(setup: Setup, workers: int) -> dict[str, Any]:
    """The off and auto runs, interleaved in a rotating order; medians and ratios."""
    o = setup.opts
    weights = zipf_weights(o.n_channels, o.zipf_s)
    static = static_shares(channel_ids(o.n_channels, o.seed, "zipf"), weights, workers,
                           setup.slots)
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "auto": []}
    modes = list(runs)
    for r in range(o.repeats):
        for mode in modes[r % 2:] + modes[: r % 2]:
            run = zipf_run(setup, workers, mode)
            runs[mode].append(run)
            setup.say(
                f"zipf repeat {r + 1}/{o.repeats}  rebalance={mode:<4} {run['msgs_per_s']:>9,.0f}"
                f" msgs/s  CPU max/mean {run['cpu_max_over_mean_early']} → "
                f"{run['cpu_max_over_mean_late']}  moves {run['moves_committed']} "
                f"({run['slots_moved']} slots)  order "
                f"{'ok' if _order_ok(run['order']) else 'BROKEN'}"
            )
    cpu_us = [r["worker_cpu_us_per_message"] for r in runs["off"] if r["messages"]]
    if cpu_us:
        setup.cpu_us_per_msg = median(cpu_us)
    return _zipf_section(o, workers, weights, static, runs)


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return round(median(vals), 4) if vals else None

    keys = ("msgs_per_s", "steady_msgs_per_s", "cpu_max_over_mean_early",
            "cpu_max_over_mean_late", "front_load_max_over_mean_end", "moves_committed",
            "slots_moved", "slots_moved_back", "last_move_s", "settled_s", "pause_p50_s",
            "pause_p99_s", "worker_cpu_us_per_message", "worker_utilisation")
    return {k: med(k) for k in keys}


def _zipf_section(o: BenchOptions, workers: int, weights: list[float], static: list[float],
                  runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    off, auto = runs["off"], runs["auto"]
    m_off, m_auto = {**_medians(off), **_others(off)}, {**_medians(auto), **_others(auto)}
    rate = {k: [r["msgs_per_s"] for r in v] for k, v in runs.items()}
    steady = {k: [r["steady_msgs_per_s"] or 0.0 for r in v] for k, v in runs.items()}
    late = {k: [r["cpu_max_over_mean_late"] or 0.0 for r in v] for k, v in runs.items()}
    return {
        "workers": workers,
        "channels": o.n_channels,
        "zipf_s": o.zipf_s,
        "hottest_channel_share": round(max(weights), 4),
        "static_max_over_mean": max_over_mean(static),
        "ideal_max_over_mean": ideal_max_over_mean(weights, workers),
        "off": m_off,
        "auto": m_auto,
        "ratios": {
            "msgs_per_s_auto_over_off": ratio(m_auto["msgs_per_s"], m_off["msgs_per_s"]),
            "msgs_per_s_paired": paired(rate["auto"], rate["off"]),
            "steady_msgs_per_s_auto_over_off": ratio(m_auto["steady_msgs_per_s"],
                                                     m_off["steady_msgs_per_s"]),
            "steady_msgs_per_s_paired": paired(steady["auto"], steady["off"]),
            "cpu_max_over_mean_late_auto_over_off": ratio(m_auto["cpu_max_over_mean_late"],
                                                          m_off["cpu_max_over_mean_late"]),
            "cpu_max_over_mean_late_paired": paired(late["auto"], late["off"]),
        },
        "runs": runs,
    }


# ----------------------------------------------------------------------------------- phase: hot


@dataclass
class _Timed:
    """Latencies of timed messages: (submit time since t0, latency, group)."""

    t0: float
    rows: list[tuple[float, float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def done(self, sent: float, group: int, ledger: Ledger, value: Any,
             error: BaseException | None) -> None:
        now = time.perf_counter()
        self.rows.append((sent - self.t0, now - sent, group))  # list.append is atomic
        ledger.done(value, error)

    def window(self, start: float, end: float, group: int) -> list[float]:
        """Latencies (µs) of the messages of ``group`` submitted in [start, end)."""
        return [lat * 1e6 for t, lat, g in self.rows if g == group and start <= t < end]


_GROUPS = ("hot", "neighbours", "others")


def _hot_groups(pool: ShardPool, cids: list[bytes]) -> tuple[list[int], float]:
    """Each channel's group (0: the hot one, ``cids[0]``; 1: a neighbour on its worker; 2: the
    others) and the neighbours' share of the other channels."""
    home = [pool.worker_of(c) for c in cids]
    group = [0] + [1 if home[i] == home[0] else 2 for i in range(1, len(cids))]
    return group, sum(1 for g in group[1:] if g == 1) / (len(cids) - 1)


class _Paced:
    """An open-loop producer at ``rate`` msgs/s (changed with :meth:`set_rate`), timing every
    message; runs in the caller's thread until :meth:`stop` (or its ``until`` returns True)."""

    def __init__(self, pool: ShardPool, ledger: Ledger, draws: list[int], group: list[int],
                 rate: float, timed: _Timed) -> None:
        self.pool, self.ledger, self.draws, self.group = pool, ledger, draws, group
        self.rate, self.timed = rate, timed
        self.i = 0
        self.base_t, self.base_i = 0.0, 0  # when (s since t0) and at which message it last changed
        self.stopped = threading.Event()

    def set_rate(self, rate: float) -> None:
        """Go on at ``rate`` msgs/s from now (no catching up at the new rate)."""
        self.base_t, self.base_i, self.rate = time.perf_counter() - self.timed.t0, self.i, rate

    def run(self, until: Callable[[float], bool]) -> None:
        pool, ledger, draws, group, timed = (self.pool, self.ledger, self.draws, self.group,
                                             self.timed)
        cids, payload, submit = ledger.cids, ledger.next_payload, pool.submit_bytes
        clock, partial, n = time.perf_counter, functools.partial, len(draws)
        start = timed.t0
        while not self.stopped.is_set():
            now = clock()
            if until(now - start):
                return
            rate, base_t, base_i = self.rate, self.base_t, self.base_i
            due = base_i + int((now - start - base_t) * rate) + 1
            while self.i < due:
                c = draws[self.i % n]
                sent = clock()
                submit(cids[c], payload(c),
                       on_done=partial(timed.done, sent, group[c], ledger))
                self.i += 1
            wait = start + base_t + (self.i - base_i) / rate - clock()
            if wait > 0:  # pacing: submit what is due every PACE_S at most (see PACE_S)
                time.sleep(min(max(wait, PACE_S), 0.01))

    def stop(self) -> None:
        self.stopped.set()


def hot_rate(capacity: float, workers: int, cpus: int, hot_share: float, hot_load: float,
             neighbour_share: float) -> float:
    """Messages/s that give the hot channel's worker ``hot_load`` of one worker's closed-loop
    capacity: it carries the hot channel's share and ``neighbour_share`` of the rest. One
    worker's capacity is ``capacity / min(workers, cpus)`` (with more workers than CPUs a lone
    busy worker still gets about a CPU); the whole rate stays under :data:`MAX_OFFERED` of
    ``capacity``. The hot runs start at this rate with ``hot_load =`` :data:`PROBE_LOAD`, then
    calibrate (:func:`calibrated_rate`)."""
    share = hot_share + (1 - hot_share) * neighbour_share
    return min(MAX_OFFERED * capacity,
               hot_load * capacity / max(1, min(workers, cpus)) / share)


def _capacity(setup: Setup) -> float:
    """The measured capacity, or an estimate from the cost per message when none was measured."""
    o = setup.opts
    return setup.capacity or o.workers / ((setup.cpu_us_per_msg or o.message_cost_us * 1.2)
                                          * 1e-6)


def calibrated_rate(rate0: float, busy: float, target: float, bench_cpus: float,
                    other_cpus: float, cpus: int) -> tuple[float, str]:
    """The open-loop rate that makes ``busy`` — the share of a CPU a worker used at ``rate0``
    (msgs/s) — reach ``target``, unless the machine has less to give: at ``rate0`` this bench
    used ``bench_cpus`` and other work ``other_cpus`` of the ``cpus``, and the rate keeps this
    bench under :data:`HEADROOM` of what is left. The scale is kept within ¼..4 of ``rate0``.
    Returns the rate and what limited it: ``"load"`` or ``"machine"``.

    Why not a closed-loop figure: in an open loop at a moderate rate messages travel in small
    frames, and a frame costs its worker and the front a fixed CPU time (thread wake-ups) that
    full frames share among hundreds of messages; a rate set from a closed loop overloads."""
    by_load = target / busy if busy > 0 else 4.0
    free = max(0.0, cpus - other_cpus)
    by_machine = HEADROOM * free / bench_cpus if bench_cpus > 0 else 4.0
    scale = max(0.25, min(by_load, by_machine, 4.0))
    return rate0 * scale, ("load" if by_load <= by_machine else "machine")


def _probe(pool: ShardPool, producer: _Paced, start_s: float) -> tuple[list[float],
                                                                        dict[str, float]]:
    """Run ``producer`` to ``start_s``, then :data:`PROBE_S` more seconds: each worker's share of
    a CPU and the machine's CPUs over the latter."""
    producer.run(lambda t: t >= start_s)
    meter, machine = CpuMeter(pool), MachineMeter(pool)
    producer.run(lambda t: t >= start_s + PROBE_S)
    return meter.busy(), machine.result()


def hot_run(setup: Setup, workers: int, how: str, rate: float | None = None) -> dict[str, Any]:
    """One hot-channel run: ``how = "pin"`` pins it with ``pool.pin`` after the "before" window
    (``rebalance = "off"``); ``"auto"`` lets ``rebalance = "auto"`` pin it. Without ``rate`` the
    run calibrates it first (:func:`calibrated_rate`: the hot worker ``--hot-load`` busy); an
    auto run is given its pin run's rate (the balancer would pin during a calibration)."""
    o = setup.opts
    n = max(2, o.n_channels)
    cids = channel_ids(n, o.seed, "hot")
    draws = _draw([o.hot_share] + [(1 - o.hot_share) / (n - 1)] * (n - 1), o.seed + 1)
    ledger = Ledger(cids)
    pool = setup.pool(workers, "off" if how == "pin" else "auto", ledger)
    hot = cids[0]
    window = o.run_s / 2
    cpus = available_cpus()
    try:
        group, neighbour_share = _hot_groups(pool, cids)
        home = pool.worker_of(hot)
        marks = _HotMarks(home=home)
        machine = MachineMeter(pool)
        meter = CpuMeter(pool)
        timed = _Timed(time.perf_counter())
        if rate is None:
            rate0 = hot_rate(_capacity(setup), workers, cpus, o.hot_share, PROBE_LOAD,
                             neighbour_share)
            producer = _Paced(pool, ledger, draws, group, rate0, timed)
            busy, used = _probe(pool, producer, _WARMUP_S / 2)
            rate, marks.limited_by = calibrated_rate(rate0, busy[home], o.hot_load,
                                                     used["bench_cpus"], used["other_cpus"], cpus)
            marks.probe = {"rate": round(rate0, 1), "busy": [round(b, 3) for b in busy],
                           **used}
            producer.set_rate(rate)
            marks.before0 = producer.base_t + _SETTLE_S
        else:
            # The pool warms up on even traffic, then the channel turns hot: the balancer's
            # reaction time is measured from there, and the "before" window is not the start-up.
            even = _draw([1.0 / n] * n, o.seed + 4)
            producer = _Paced(pool, ledger, even, group, rate, timed)
            producer.run(lambda t: t >= _HOT_AFTER_S)
            producer.draws = draws
            marks.turned_hot = time.perf_counter() - timed.t0
            marks.before0 = marks.turned_hot + _BEFORE_AFTER_HOT_S
        producer.run(lambda t: t >= marks.before0)
        meter.busy()
        if how == "pin":
            _pin_by_hand(pool, producer, hot, window, marks, meter)
        else:
            _pin_by_balancer(pool, producer, hot, window, marks, meter)
        if marks.committed is not None:
            after0 = marks.committed + _SETTLE_S
            producer.run(lambda t: t >= after0)
            meter.busy()
            producer.run(lambda t: t >= after0 + window)
            marks.busy_after = [round(b, 3) for b in meter.busy()]
        pool.drain(o.timeout_s)
        used = machine.result()
        home = marks.home  # where the pin took the channel from
        dest = pool.worker_of(hot)
        left = sum(1 for c, g in zip(cids, group, strict=True)
                   if g == 1 and pool.worker_of(c) != home)
        placement = pool.placement()
        order = ledger.check(pool, o.timeout_s)
    finally:
        pool.close(timeout=min(10.0, o.timeout_s))
    out = _hot_summary(how, rate, workers, neighbour_share, timed, marks, home, dest,
                       placement, order, window)
    out["neighbours"] = group.count(1)
    out["neighbours_moved_away"] = left  # by levelling (auto), before or after the pin
    out["machine"] = used
    return out


@dataclass
class _HotMarks:
    """Times (seconds since the run began) of a hot run's events, and what was measured then."""

    home: int  # the hot channel's worker before its pin (auto: as last seen before the move)
    before0: float = _WARMUP_S  # the "before" window opens
    turned_hot: float | None = None  # auto: the traffic turned hot (even before)
    started: float | None = None  # the pin was asked for (pin) or first seen moving (auto)
    committed: float | None = None
    pause_s: float | None = None
    error: str | None = None
    limited_by: str | None = None  # what set the calibrated rate: "load" or "machine"
    probe: dict[str, Any] | None = None
    busy_before: list[float] | None = None  # each worker's share of a CPU in the windows
    busy_after: list[float] | None = None


def _pin_by_hand(pool: ShardPool, producer: _Paced, hot: bytes, window: float,
                 marks: _HotMarks, meter: CpuMeter) -> None:
    """Traffic for the "before" window, then ``pool.pin`` from a helper thread while the
    producer goes on."""
    t0 = producer.timed.t0
    producer.run(lambda t: t >= marks.before0 + window)
    marks.busy_before = [round(b, 3) for b in meter.busy()]

    def pin() -> None:
        try:
            move = pool.pin(hot)
            marks.pause_s = move.pause_s if move is not None else None
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on unpinned
            marks.error = f"{type(exc).__name__}: {exc}"
        marks.committed = time.perf_counter() - t0
        producer.stop()

    marks.started = time.perf_counter() - t0
    helper = threading.Thread(target=pin, name="bench-pin", daemon=True)
    helper.start()
    producer.run(lambda t: False)  # until the pin is done
    helper.join()
    producer.stopped.clear()
    if marks.error is not None:
        marks.committed = None


def _pin_by_balancer(pool: ShardPool, producer: _Paced, hot: bytes, window: float,
                     marks: _HotMarks, meter: CpuMeter) -> None:
    """Traffic until the balancer has pinned the hot channel (at most 3 windows after the
    "before" window opened); the "before" window is what came before its move started."""
    t0 = producer.timed.t0
    hexid = hot.hex()
    deadline = marks.before0 + 3 * window

    def check(t: float) -> bool:
        if t >= deadline:
            return True
        placement = pool.placement()
        pin = [m for m in placement["moves"]["in_progress"] if hexid in m["channels"]]
        if marks.started is None and pin:
            marks.started = t
            marks.home = pin[0]["src"]
            marks.busy_before = [round(b, 3) for b in meter.busy()]
        elif marks.started is None and hexid not in placement["pins"]:
            # Levelling may have moved the channel's slot since the run began: the pin's
            # source is where the channel is now.
            marks.home = pool.worker_of(hot)
        if hexid in placement["pins"]:
            marks.committed = time.perf_counter() - t0
            if marks.started is None:
                marks.started = marks.committed
                marks.busy_before = [round(b, 3) for b in meter.busy()]
            return True
        return False

    last = [0.0]

    def until(t: float) -> bool:  # look at the placement every 50 ms
        if t - last[0] < 0.05:
            return False
        last[0] = t
        return check(t)

    producer.run(until)
    if marks.committed is None:
        marks.error = f"not pinned within {deadline:.0f} s"


def _hot_summary(how: str, rate: float, workers: int, neighbour_share: float, timed: _Timed,
                 marks: _HotMarks, home: int, dest: int, placement: dict[str, Any],
                 order: dict[str, Any], window: float) -> dict[str, Any]:
    before = (marks.before0,
              marks.started if marks.started is not None else marks.before0 + window)
    if how == "pin":
        before = (marks.before0, marks.before0 + window)
    after = ((marks.committed + _SETTLE_S, marks.committed + _SETTLE_S + window)
             if marks.committed is not None else None)
    groups: dict[str, Any] = {}
    for g, name in enumerate(_GROUPS):
        b = timed.window(*before, g)
        a = timed.window(*after, g) if after else []
        groups[name] = {
            "before": _lat(b), "after": _lat(a),
            "p99_ratio_before_over_after": ratio(_pct(b, 0.99), _pct(a, 0.99)),
        }
    trend = backlog_trend(timed, before, 1)
    return {
        "before_trend_p50_us": trend,
        "before_saturated": saturated(trend),
        "rate_limited_by": marks.limited_by,
        "probe": marks.probe,
        "busy_before": marks.busy_before,
        "busy_after": marks.busy_after,
        "home_busy_before": _at_index(marks.busy_before, home),
        "home_busy_after": _at_index(marks.busy_after, home),
        "dest_busy_after": _at_index(marks.busy_after, dest),
        "how": how,
        "workers": workers,
        "rate": round(rate, 1),
        "neighbour_share_of_others": round(neighbour_share, 4),
        "hot_worker_before": home,
        "hot_worker_after": dest,
        "pinned": marks.committed is not None,
        "error": marks.error,
        "pin_started_s": _r(marks.started),
        "pin_committed_s": _r(marks.committed),
        "turned_hot_s": _r(marks.turned_hot),
        "pinned_after_hot_s": (_r(marks.committed - marks.turned_hot)
                               if marks.committed is not None and marks.turned_hot is not None
                               else None),
        "pin_pause_s": marks.pause_s,
        "before_window_s": [round(x, 3) for x in before],
        "after_window_s": [round(x, 3) for x in after] if after else None,
        "groups": groups,
        "neighbours_p99_ratio": groups["neighbours"]["p99_ratio_before_over_after"],
        "dedicated": placement["levelling"]["dedicated"],
        "moves_committed": placement["moves"]["committed"],
        "order": order,
    }


def backlog_trend(timed: _Timed, window: tuple[float, float], group: int) -> list[float | None]:
    """p50 latency (µs) of ``group`` in the first and the last third of ``window``."""
    start, end = window
    third = (end - start) / 3
    return [_pct(timed.window(start, start + third, group), 0.5),
            _pct(timed.window(end - third, end, group), 0.5)]


def saturated(trend: Sequence[float | None]) -> bool:
    """A queue that grew through the window: its last third's p50 over :data:`GROWTH` × the first
    third's and over :data:`GROWTH_FLOOR_US`. Its p99 then measures the window's length, not the
    pool: a ratio against it is not a measurement."""
    first, last = trend
    return (first is not None and last is not None and last > GROWTH * first
            and last > GROWTH_FLOOR_US)


def _at_index(values: list[float] | None, i: int) -> float | None:
    return values[i] if values is not None and 0 <= i < len(values) else None


def _r(x: float | None) -> float | None:
    return round(x, 3) if x is not None else None


def _lat(samples_us: list[float]) -> dict[str, Any]:
    return {"count": len(samples_us), "p50_us": _pct(samples_us, 0.5),
            "p99_us": _pct(samples_us, 0.99)}


def hot_phase(setup: Setup, workers: int) -> dict[str, Any]:
    """The closed-loop capacity (the runs' start rate), then in each repeat a run pinned by hand
    (which calibrates the rate) and one the balancer pins (at that rate)."""
    o = setup.opts
    capacities = [capacity_run(setup, workers)]
    setup.capacity = capacities[-1]["capacity_msgs_per_s"]
    runs: dict[str, list[dict[str, Any]]] = {"pin": [], "auto": []}
    for r in range(o.repeats):
        rate: float | None = None
        for how in ("pin", "auto"):
            run = hot_run(setup, workers, how, rate)
            rate = run["rate"]
            runs[how].append(run)
            nb = run["groups"]["neighbours"]
            setup.say(
                f"hot repeat {r + 1}/{o.repeats}  {how:<4} {run['rate']:,.0f} msgs/s  "
                f"neighbours p99 {nb['before']['p99_us']} → {nb['after']['p99_us']} µs "
                f"(×{run['neighbours_p99_ratio']})  pinned {run['pinned']}  order "
                f"{'ok' if _order_ok(run['order']) else 'BROKEN'}"
            )
    out: dict[str, Any] = {
        "workers": workers, "hot_share": o.hot_share, "hot_load": o.hot_load,
        "capacity_msgs_per_s": round(median([c["capacity_msgs_per_s"] for c in capacities]), 1),
        "capacity_runs": capacities,
    }
    for how, rs in runs.items():
        out[how] = _hot_medians(rs)
    # The balancer pins within a few periods, so an auto run's own "before" window is short:
    # its "after" is also set against the pin runs' "before" (same traffic, rate and machine).
    out["auto_after_vs_pin_before_neighbours_p99"] = ratio(out["pin"]["neighbours_before_p99_us"],
                                                           out["auto"]["neighbours_after_p99_us"])
    out["runs"] = runs
    return out


def _at(run: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = run
    for k in keys:
        value = value[k]
    return value


def _hot_medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(path: Callable[[dict[str, Any]], Any]) -> float | None:
        vals = [v for r in runs if (v := path(r)) is not None]
        return round(median(vals), 3) if vals else None

    out: dict[str, Any] = {"pinned": sum(1 for r in runs if r["pinned"]), "runs": len(runs),
                           "rate": med(lambda r: r["rate"])}
    for g, when, q in itertools.product(_GROUPS, ("before", "after"), ("p50_us", "p99_us")):
        out[f"{g}_{when}_{q}"] = med(functools.partial(_at, keys=("groups", g, when, q)))
    out["neighbours_p99_ratio"] = med(lambda r: r["neighbours_p99_ratio"])
    out["neighbours_p99_ratio_of_medians"] = ratio(out["neighbours_before_p99_us"],
                                                   out["neighbours_after_p99_us"])
    out["pin_committed_s"] = med(lambda r: r["pin_committed_s"])
    out["pinned_after_hot_s"] = med(lambda r: r["pinned_after_hot_s"])
    out["neighbours"] = med(lambda r: r["neighbours"])
    out["neighbours_moved_away"] = med(lambda r: r["neighbours_moved_away"])
    for k in ("home_busy_before", "home_busy_after", "dest_busy_after"):
        out[k] = med(functools.partial(_at, keys=(k,)))
    out["rate_limited_by_machine"] = sum(1 for r in runs if r["rate_limited_by"] == "machine")
    out["before_saturated"] = sum(1 for r in runs if r["before_saturated"])
    steady = [r["neighbours_p99_ratio"] for r in runs
              if not r["before_saturated"] and r["neighbours_p99_ratio"] is not None]
    out["neighbours_p99_ratio_unsaturated"] = round(median(steady), 3) if steady else None
    out.update(_others(runs))
    return out


# --------------------------------------------------------------------------------- phase: pause


def pause_run(setup: Setup, workers: int) -> dict[str, Any]:
    """Moves of 1 and 64 slots under steady open-loop load (see the module docstring)."""
    o = setup.opts
    n = max(2, o.n_channels)
    cids = channel_ids(n, o.seed, "pause")
    draws = _draw([1.0 / n] * n, o.seed + 2)
    rate0 = PROBE_LOAD * _capacity(setup)
    ledger = Ledger(cids)
    pool = setup.pool(workers, "off", ledger)
    loaded = sorted({slot_of(c, setup.slots) for c in cids})
    moves: list[dict[str, Any]] = []
    try:
        machine = MachineMeter(pool)
        timed = _Timed(time.perf_counter())
        producer = _Paced(pool, ledger, draws, [0] * n, rate0, timed)
        busy, probed = _probe(pool, producer, _WARMUP_S / 2)
        rate, limited_by = calibrated_rate(rate0, sum(busy) / len(busy), PAUSE_LOAD,
                                           probed["bench_cpus"], probed["other_cpus"],
                                           available_cpus())
        producer.set_rate(rate)
        producer.run(lambda t: t >= producer.base_t + _SETTLE_S)
        meter = CpuMeter(pool)
        helper = threading.Thread(
            target=_mover, args=(pool, loaded, workers, o, moves, producer), name="bench-mover",
            daemon=True,
        )
        moves0 = time.perf_counter() - timed.t0
        helper.start()
        producer.run(lambda t: False)
        helper.join()
        busy_moving = [round(b, 3) for b in meter.busy()]
        pool.drain(o.timeout_s)
        used = machine.result()
        placement = pool.placement()["moves"]
        order = ledger.check(pool, o.timeout_s)
    finally:
        pool.close(timeout=min(10.0, o.timeout_s))
    summary = _pause_summary(rate, workers, moves, placement, order, timed, moves0)
    return {**summary, "rate_limited_by": limited_by, "busy_during_moves": busy_moving,
            "probe": {"rate": round(rate0, 1), "busy": [round(b, 3) for b in busy], **probed},
            "machine": used}


def _mover(pool: ShardPool, loaded: list[int], workers: int, o: BenchOptions,
           moves: list[dict[str, Any]], producer: _Paced) -> None:
    """``pause_moves`` moves of each size, alternating; then stop the producer."""
    rng = random.Random(o.seed)
    try:
        for k, size in itertools.product(range(o.pause_moves), MOVE_SIZES):
            src = k % workers
            dst = (k + 1) % workers
            mine = [s for s in loaded if pool.worker_of_slot(s) == src]
            slots = rng.sample(mine, min(size, len(mine)))
            if not slots:
                continue
            t = time.perf_counter()
            try:
                move = pool.move_slots(slots, dst)
                moves.append({"size": size, "slots": len(slots), "state": move.state,
                              "pause_s": move.pause_s, "call_s": time.perf_counter() - t,
                              "held": move.held})
            except Exception as exc:  # noqa: BLE001 - an aborted move is a figure here
                moves.append({"size": size, "slots": len(slots), "state": "refused",
                              "error": f"{type(exc).__name__}: {exc}",
                              "call_s": time.perf_counter() - t})
            time.sleep(0.2)
    finally:
        producer.stop()


def _pause_summary(rate: float, workers: int, moves: list[dict[str, Any]],
                   placement: dict[str, Any], order: dict[str, Any],
                   timed: _Timed, moves0: float = 0.0) -> dict[str, Any]:
    by_size: dict[str, Any] = {}
    for size in MOVE_SIZES:
        mine = [m for m in moves if m["size"] == size]
        ok = [m for m in mine if m["state"] == "committed"]
        pauses = [m["pause_s"] * 1000 for m in ok if m.get("pause_s") is not None]
        calls = [m["call_s"] * 1000 for m in ok]
        by_size[str(size)] = {
            "moves": len(mine),
            "committed": len(ok),
            "not_committed": [m.get("error") or m["state"] for m in mine if m not in ok][:3],
            "slots_per_move": median([m["slots"] for m in mine]) if mine else None,
            "pause_p50_ms": _pct(pauses, 0.5),
            "pause_p99_ms": _pct(pauses, 0.99),
            "pause_max_ms": round(max(pauses), 3) if pauses else None,
            "call_p50_ms": _pct(calls, 0.5),
            "call_p99_ms": _pct(calls, 0.99),
            "held_p50": median([m["held"] for m in ok]) if ok else None,
        }
    lat = [lat * 1e6 for t, lat, _ in timed.rows if t >= moves0]
    return {
        "workers": workers,
        "rate": round(rate, 1),
        "load": PAUSE_LOAD,
        "by_size": by_size,
        "pool_pause_p50_s": placement["pause_p50_s"],
        "pool_pause_p99_s": placement["pause_p99_s"],
        "latency_during_us": latency_summary([int(x * 1000) for x in lat]),
        "order": order,
    }


# ---------------------------------------------------------------------------------- the scenario


def run_levelling_bench(opts: BenchOptions, say: Progress) -> dict[str, Any]:
    """The levelling scenario (see the module docstring); the JSON-ready report.
    ``report["ok"]`` is False if any run lost or reordered a message or failed one.

    Raises:
        ShardPoolError / TimeoutError: a pool run failed.
    """
    wall0 = time.perf_counter()
    iters = calibrate_cost(opts.message_cost_us)
    setup = Setup(opts, iters, say)
    say(f"levelling: {opts.workers} workers, {opts.message_cost_us:g} µs per message "
        f"({iters} SHA-256 rounds), phases {', '.join(opts.phase_list)}")
    report: dict[str, Any] = {
        "version": 1,
        "workload": "levelling",
        "machine": machine_info(),
        "options": asdict(opts),
        "cost_iters": iters,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    setup.slots = load_config(Path(opts.config) if opts.config else None).pool.slots
    if "zipf" in opts.phase_list:
        report["zipf"] = zipf_phase(setup, opts.workers)
    if "hot" in opts.phase_list:
        report["hot"] = hot_phase(setup, opts.workers)
    if "pause" in opts.phase_list:
        capacity = capacity_run(setup, opts.workers)
        setup.capacity = capacity["capacity_msgs_per_s"]
        report["pause"] = {**pause_run(setup, opts.workers), "capacity": capacity}
        by = report["pause"]["by_size"]
        say("pause  " + "  ".join(f"{k} slot(s): p50 {v['pause_p50_ms']} ms, p99 "
                                  f"{v['pause_p99_ms']} ms" for k, v in by.items()))
    report["cpu_us_per_msg"] = round(setup.cpu_us_per_msg, 1) if setup.cpu_us_per_msg else None
    report["ok"] = all(_order_ok(r["order"]) for r in _every_run(report))
    report["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report["elapsed_s"] = round(time.perf_counter() - wall0, 2)
    say(f"done in {report['elapsed_s']:.1f} s")
    return report


def _every_run(report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for phase in ("zipf", "hot"):
        for runs in report.get(phase, {}).get("runs", {}).values():
            out += runs
    if "pause" in report:
        out.append(report["pause"])
    out += report.get("hot", {}).get("capacity_runs", [])
    if "capacity" in report.get("pause", {}):
        out.append(report["pause"]["capacity"])
    return out


# ----------------------------------------------------------------- scaling: levelling off vs auto


EFFICIENCY_TARGET = 0.85
"""The CPU-bound efficiency the issue asks of levelling up to 15 workers."""


def efficiency_points(runs: dict[int, dict[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Per worker count and mode, from zipf runs (``runs[workers][mode]``, the 1-worker runs under
    ``"off"``, repeat ``r`` of each at index ``r``): medians of the steady messages/s (the second
    half of each run, after levelling has acted), ``speedup`` over 1 worker, ``efficiency`` =
    speedup ÷ workers, and ``efficiency_paired`` (the median of the same ratio taken repeat by
    repeat)."""
    base = [r["steady_msgs_per_s"] or r["msgs_per_s"] for r in runs.get(1, {}).get("off", [])]
    base_med = median(base) if base else None
    points = []
    for w in sorted(runs):
        for mode in ("off", "auto"):
            rs = runs[w].get(mode, [])
            if not rs:
                continue
            rates = [r["steady_msgs_per_s"] or r["msgs_per_s"] for r in rs]
            med = median(rates)
            speedup = med / base_med if base_med else None
            pairs = [x / (w * b) for x, b in zip(rates, base, strict=False) if b]
            late = [r["cpu_max_over_mean_late"] for r in rs if r["cpu_max_over_mean_late"]]
            points.append({
                "workers": w,
                "mode": mode,
                "repeats": len(rs),
                "steady_msgs_per_s": round(med, 1),
                "msgs_per_s": round(median([r["msgs_per_s"] for r in rs]), 1),
                "speedup": round(speedup, 3) if speedup else None,
                "efficiency": round(speedup / w, 3) if speedup else None,
                "efficiency_paired": round(median(pairs), 3) if pairs else None,
                "cpu_max_over_mean_late": round(median(late), 4) if late else None,
                "moves_committed": median([r["moves_committed"] for r in rs]),
                "slots_moved": median([r["slots_moved"] for r in rs]),
                "worker_cpu_us_per_message": median(
                    [r["worker_cpu_us_per_message"] or 0.0 for r in rs]),
                "other_cpus": median([r.get("machine", {}).get("other_cpus", 0.0) for r in rs]),
            })
    return points


def efficiency_targets(points: list[dict[str, Any]], up_to: int = 15) -> dict[str, Any]:
    """The issue's target per mode: efficiency >= :data:`EFFICIENCY_TARGET` at every worker count
    from 2 up to ``up_to``; the lowest efficiency measured there, and whether it was met."""
    out: dict[str, Any] = {}
    for mode in ("off", "auto"):
        effs = [(p["workers"], p["efficiency"]) for p in points
                if p["mode"] == mode and 1 < p["workers"] <= up_to
                and p["efficiency"] is not None]
        if not effs:
            continue
        w, low = min(effs, key=lambda x: x[1])
        out[f"efficiency_{mode}_up_to_{up_to}"] = {
            "target": EFFICIENCY_TARGET, "value": low, "at_workers": w,
            "met": low >= EFFICIENCY_TARGET,
        }
    return out


def format_scaling(doc: dict[str, Any]) -> str:
    """The scaling document as a table for a terminal."""
    o = doc["options"]
    m = doc["machine"]
    lines = [
        f"levelling scaling: zipf s={o['zipf_s']:g} over {o['channels']:,} channels, "
        f"{o['message_cost_us']:g} µs of CPU per message, closed loop, runs of "
        f"{o['run_s']:g} s, {o['repeats']} repeats; machine {m['cpus']} CPUs, "
        f"Python {m['python']}",
        f"  {'workers':>7} {'rebalance':<9} {'steady msgs/s':>13} {'speed-up':>9} "
        f"{'efficiency':>10} {'(paired)':>9} {'CPU max/mean':>12} {'moves':>6} "
        f"{'other CPUs':>10}",
    ]
    for p in doc["points"]:
        lines.append(
            f"  {p['workers']:>7} {p['mode']:<9} {p['steady_msgs_per_s']:>13,.0f} "
            f"{_f(p['speedup'], '.2f'):>9} {_f(p['efficiency'], '.3f'):>10} "
            f"{_f(p['efficiency_paired'], '.3f'):>9} {_f(p['cpu_max_over_mean_late'], '.3f'):>12} "
            f"{_f(p['moves_committed'], '.0f'):>6} {_f(p['other_cpus'], '.2f'):>10}"
        )
    for name, t in doc.get("targets", {}).items():
        lines.append(f"  {name}: {t['value']} at {t['at_workers']} workers (target >= "
                     f"{t['target']}) {'met' if t['met'] else 'MISSED'}")
    if not doc.get("complete"):
        lines.append("  (incomplete: cut short)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- the text


def format_levelling_report(report: dict[str, Any]) -> str:
    """The levelling report as text for a terminal."""
    o, m = report["options"], report["machine"]
    lines = [
        f"shardpool bench (levelling): {o['workers']} workers, {o['message_cost_us']:g} µs of "
        f"CPU per message, {o['repeats']} repeats, runs of {o['run_s']:g} s, "
        f"pool.rebalance_interval_s = {o['rebalance_interval_s']:g}, grace "
        f"{o['rebalance_grace_s']:g} s",
        f"machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']} (the front, the "
        f"producer and the workers share them); load average {report.get('loadavg_start')} "
        f"at the start, {report.get('loadavg_end')} at the end",
    ]
    if "zipf" in report:
        lines += ["", *_zipf_lines(report["zipf"])]
    if "hot" in report:
        lines += ["", *_hot_lines(report["hot"])]
    if "pause" in report:
        lines += ["", *_pause_lines(report["pause"])]
    lines += ["", *_order_lines(report)]
    lines += ["", f"verdict: {'OK - order kept' if report['ok'] else 'FAILED - order broken'}"
                  f"   (bench took {report['elapsed_s']:.1f} s)"]
    return "\n".join(lines)


def _f(x: Any, spec: str = "") -> str:
    return "-" if x is None else format(x, spec)


def _zipf_lines(z: dict[str, Any]) -> list[str]:
    r = z["ratios"]
    lines = [
        f"zipf: s={z['zipf_s']:g} over {z['channels']:,} channels (hottest "
        f"{z['hottest_channel_share']:.1%}), closed loop; static hash max/mean "
        f"{z['static_max_over_mean']}, best possible "
        f"{z['ideal_max_over_mean']}",
        f"  {'rebalance':<10}{'msgs/s':>9}{'steady':>9}{'CPU max/mean':>22}{'moves':>7}"
        f"{'slots':>7}{'back':>6}{'last move':>11}{'settled':>9}{'pause p50/p99 ms':>19}",
    ]
    for mode in ("off", "auto"):
        s = z[mode]
        pause = (f"{_f(s['pause_p50_s'] and s['pause_p50_s'] * 1000, '.1f')}/"
                 f"{_f(s['pause_p99_s'] and s['pause_p99_s'] * 1000, '.1f')}")
        lines.append(
            f"  {mode:<10}{_f(s['msgs_per_s'], ',.0f'):>9}{_f(s['steady_msgs_per_s'], ',.0f'):>9}"
            f"{_f(s['cpu_max_over_mean_early'], '.3f'):>11} → "
            f"{_f(s['cpu_max_over_mean_late'], '.3f'):<6}{_f(s['moves_committed'], '.0f'):>8}"
            f"{_f(s['slots_moved'], '.0f'):>7}{_f(s['slots_moved_back'], '.0f'):>6}"
            f"{_f(s['last_move_s'], '.1f'):>10}s{_f(s['settled_s'], '.1f'):>8}s{pause:>19}"
        )
    lines.append(
        f"  auto ÷ off: msgs/s {_f(r['msgs_per_s_auto_over_off'])} (paired "
        f"{_f(r['msgs_per_s_paired'])}), steady {_f(r['steady_msgs_per_s_auto_over_off'])} "
        f"(paired {_f(r['steady_msgs_per_s_paired'])}), late CPU max/mean "
        f"{_f(r['cpu_max_over_mean_late_auto_over_off'])} (paired "
        f"{_f(r['cpu_max_over_mean_late_paired'])})"
    )
    most = max(z["off"]["other_cpus_max"] or 0.0, z["auto"]["other_cpus_max"] or 0.0)
    lines.append(f"  other work on the machine: off {_f(z['off']['other_cpus_median'], '.2f')}, "
                 f"auto {_f(z['auto']['other_cpus_median'], '.2f')} CPUs (median of the runs; "
                 f"most {most:.2f})")
    return lines


def _hot_lines(h: dict[str, Any]) -> list[str]:
    lines = [f"hot channel: {h['hot_share']:.0%} of the traffic, open loop at a rate calibrated "
             f"in each pin run for its worker to be {h['hot_load']:.0%} busy (of a CPU) before "
             f"the pin, unless the machine had less to give (start rate from the closed-loop "
             f"capacity, {_f(h['capacity_msgs_per_s'], ',.0f')} msgs/s); latency submit → done, "
             f"µs (medians)"]
    for how, label in (("pin", "pool.pin"), ("auto", "rebalance=auto")):
        s = h[how]
        when = (f"{_f(s['pinned_after_hot_s'], '.1f')} s after the channel turned hot"
                if how == "auto" else f"at {_f(s['pin_committed_s'], '.1f')} s")
        lines.append(
            f"  {label:<15} {_f(s['rate'], ',.0f')} msgs/s, pinned {s['pinned']}/{s['runs']}, "
            f"{when}, {_f(s['neighbours'], '.0f')} neighbours "
            f"({_f(s['neighbours_moved_away'], '.0f')} moved away by levelling)"
        )
        lines.append(
            f"    its worker busy {_f(s['home_busy_before'], '.0%')} before, "
            f"{_f(s['home_busy_after'], '.0%')} after; the worker it went to "
            f"{_f(s['dest_busy_after'], '.0%')} after"
            + (f"; rate limited by the machine in {s['rate_limited_by_machine']} run(s)"
               if how == "pin" else "")
        )
        for g in _GROUPS:
            lines.append(
                f"    {g:<11} before p50 {_f(s[f'{g}_before_p50_us'], ',.0f'):>8} p99 "
                f"{_f(s[f'{g}_before_p99_us'], ',.0f'):>8}   after p50 "
                f"{_f(s[f'{g}_after_p50_us'], ',.0f'):>8} p99 "
                f"{_f(s[f'{g}_after_p99_us'], ',.0f'):>8}"
            )
        lines.append(f"    neighbours' p99 before ÷ after: {_f(s['neighbours_p99_ratio'])} "
                     f"(of the medians {_f(s['neighbours_p99_ratio_of_medians'])}; target ≥ 5); "
                     f"'before' saturated in {s['before_saturated']}/{s['runs']} run(s), ratio of "
                     f"the others {_f(s['neighbours_p99_ratio_unsaturated'])}")
        lines.append(f"    other work on the machine: {_f(s['other_cpus_median'], '.2f')} CPUs "
                     f"(median of the runs, most {_f(s['other_cpus_max'], '.2f')})")
    lines.append(f"  auto's 'after' against the pin runs' 'before' (neighbours' p99): "
                 f"{_f(h['auto_after_vs_pin_before_neighbours_p99'])}")
    return lines


def _pause_lines(p: dict[str, Any]) -> list[str]:
    busy = p.get("busy_during_moves") or []
    lines = [f"pause per move: {p['workers']} workers, uniform traffic open loop at "
             f"{p['rate']:,.0f} msgs/s (calibrated for the workers {p['load']:.0%} busy; "
             f"limited by {p.get('rate_limited_by')}; during the moves they were "
             f"{', '.join(f'{b:.0%}' for b in busy)} busy)"]
    for size, s in p["by_size"].items():
        lines.append(
            f"  {size:>2} slot(s): {s['committed']}/{s['moves']} committed, pause p50 "
            f"{_f(s['pause_p50_ms'], '.2f')} ms p99 {_f(s['pause_p99_ms'], '.2f')} ms, call p50 "
            f"{_f(s['call_p50_ms'], '.2f')} ms p99 {_f(s['call_p99_ms'], '.2f')} ms, held "
            f"{_f(s['held_p50'], '.0f')} msgs"
        )
    if "machine" in p:
        lines.append(f"  other work on the machine: {p['machine']['other_cpus']:.2f} CPUs")
    return lines


def _order_lines(report: dict[str, Any]) -> list[str]:
    runs = _every_run(report)
    seq = {k: sum(r["order"]["sequence_errors"][k] for r in runs) for k in ORDER_COUNTERS}
    return [
        f"order: {len(runs)} runs, {sum(r['order']['messages'] for r in runs):,} messages, "
        f"{sum(r['order']['violations'] for r in runs)} out of order, "
        f"{seq['gaps']} gaps / {seq['duplicates']} duplicates / {seq['reorders']} reorders, "
        f"{sum(r['order']['failures'] for r in runs)} failures, "
        f"{sum(r['order']['channels_mismatched'] for r in runs)} channels whose last message "
        f"≠ the last sent"
    ]
