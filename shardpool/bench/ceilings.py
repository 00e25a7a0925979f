"""The ceilings section (issue 13): every figure of shardpool as a ratio to a baseline measured
in the same run.

| row | shardpool | baseline | target |
|---|---|---|---|
| ``forwarding_1w`` | 1 worker, pre-encoded (``submit_many_bytes``), msgs/s | the one-pass ceiling
  harness (:func:`~shardpool.bench.baselines.run_one_pass`) | ratio ≥ 0.8 |
| ``dicts_1w`` | 1 worker, dicts (``pool.submit``), msgs/s | the one-pass harness encoding dicts
  (``run_one_pass(dicts=True)``) | ratio ≥ 0.7 |
| ``mp_queue_2w`` | 2 workers, pre-encoded (``submit_many_bytes``), msgs/s | a
  ``multiprocessing.Queue`` per worker, one put per message | ratio ≥ 10 (×) |
| ``call_rtt`` | idle round trip ``pool.call``, p50 µs | bare PUSH→PULL→PUSH ping-pong p50
  (:func:`~shardpool.bench.baselines.run_ping_pong`) | ratio ≤ 1.5 |
| ``ingress_1p`` | 1 producer process through the ingress, msgs/s | in-process ``submit_bytes``
  on the same backend and handler (:mod:`~shardpool.bench.ingress_run`) | ratio ≥ 0.8 |
| ``recovery`` | SIGKILL → result of a request made right after, median ms
  (:mod:`~shardpool.bench.recovery_run`) | none | ≤ 50 ms |

:func:`measure_ceilings` runs the asked rows' contenders ``repeats`` times, interleaved in a
rotating order within each round (so a slow spell of the shared machine hits all of them), the
recovery once (it has no baseline); :func:`ceilings_section` turns the runs into the report's
section (medians, ratio of the medians, median of the per-round ratios, target and whether it
was met) and :func:`ceiling_lines` into text. Targets are reported, never enforced.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .baselines import RoundTripResult, round_trip_result, run_mp_queue, run_one_pass, run_ping_pong
from .handlers import TRIVIAL_HANDLER
from .report import median, paired, ratio
from .runs import run_pool

__all__ = [
    "CEILING_ROWS",
    "CeilingRow",
    "CeilingRuns",
    "call_round_trip",
    "ceiling_lines",
    "ceilings_section",
    "measure_ceilings",
    "pool_dicts_rate",
]


@dataclass(frozen=True)
class CeilingRow:
    """One row of the table: what is measured, against what, and its target.

    ``target_of`` says what the target bounds: the ``ratio`` (shardpool ÷ baseline) or, for a
    row without a baseline, the shardpool ``value`` itself; ``better`` whether higher or lower
    meets it.
    """

    key: str
    path: str
    unit: str
    baseline: str | None
    target: float
    better: Literal["higher", "lower"]
    target_of: Literal["ratio", "value"] = "ratio"

    @property
    def target_text(self) -> str:
        """The target as text, e.g. ``>= 0.8``, ``>= 10x`` or ``<= 50 ms``."""
        op = ">=" if self.better == "higher" else "<="
        if self.target_of == "value":
            return f"{op} {self.target:g} {self.unit}"
        return f"{op} {self.target:g}{'x' if self.target >= 2 else ''}"

    def met(self, ratio_value: float | None, value: float | None) -> bool | None:
        """Whether the target is met (None: not measured)."""
        v = ratio_value if self.target_of == "ratio" else value
        if v is None:
            return None
        return v >= self.target if self.better == "higher" else v <= self.target


CEILING_ROWS: tuple[CeilingRow, ...] = (
    CeilingRow("forwarding_1w", "1 worker, pre-encoded (submit_many_bytes)", "msgs/s",
               "one-pass ceiling harness (bytes)", 0.8, "higher"),
    CeilingRow("dicts_1w", "1 worker, dicts (pool.submit)", "msgs/s",
               "one-pass ceiling harness encoding dicts", 0.7, "higher"),
    CeilingRow("mp_queue_2w", "2 workers, pre-encoded (submit_many_bytes)", "msgs/s",
               "multiprocessing.Queue per worker, one put per message", 10.0, "higher"),
    CeilingRow("call_rtt", "idle round trip, pool.call, p50", "us",
               "bare PUSH->PULL->PUSH ping-pong over ipc://, p50", 1.5, "lower"),
    CeilingRow("ingress_1p", "ingress, 1 producer process", "msgs/s",
               "in-process submit_bytes, same backend and handler", 0.8, "higher"),
    CeilingRow("recovery", "recovery after SIGKILL (kill -> next result), median", "ms",
               None, 50.0, "lower", target_of="value"),
)
"""Every row, in the order of the table."""

ROW_KEYS = tuple(r.key for r in CEILING_ROWS)

RECOVERY_LOAD_RATE = 50_000.0
"""msgs/s of the recovery row's background load (paced, so that the drain before each kill ends
quickly; a quarter or less of what a 2-core machine's pool takes)."""
RECOVERY_LOAD_MESSAGES = 20_000
"""Distinct messages the recovery row's load cycles through."""


@dataclass
class CeilingRuns:
    """What :func:`measure_ceilings` measured: per row, shardpool's and the baseline's figure of
    each round (msgs/s, or µs for ``call_rtt``, or ms for ``recovery``), and per row details."""

    messages: int
    repeats: int
    shardpool: dict[str, list[float]] = field(default_factory=dict)
    baseline: dict[str, list[float]] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


def pool_dicts_rate(
    stream: Sequence[tuple[bytes, Any]], workers: int, *, batch_size: int = 256,
    max_inflight: int = 16384, timeout_s: float = 120.0,
) -> float:
    """msgs/s of ``pool.submit(channel_id, message)`` (the front encodes each message) for every
    pair of ``stream``, then ``drain``, on a fresh pool running the trivial handler (start-up
    outside the clock; the pool closed before returning).

    Raises:
        ShardPoolError subclasses (start failure, DrainTimeout, ...).
    """
    from ..pool import ShardPool

    pool = ShardPool(TRIVIAL_HANDLER, workers=workers, batch_size=batch_size,
                     max_inflight=max_inflight)
    try:
        submit = pool.submit
        t0 = time.perf_counter()
        for cid, message in stream:
            submit(cid, message)
        pool.drain(timeout_s)
        elapsed = time.perf_counter() - t0
    finally:
        pool.close(timeout=min(10.0, timeout_s))
    return len(stream) / elapsed if elapsed > 0 else 0.0


def call_round_trip(
    rounds: int = 1000, timeout: float = 30.0, *, warmup: int = 50, channel_id: bytes = b"\x01" * 32
) -> RoundTripResult:
    """p50/p99 of ``pool.call`` on an idle pool (1 worker, trivial handler): ``rounds``
    sequential calls with a small dict message after ``warmup`` untimed ones; start-up outside
    the clock, the pool closed before returning. Result named ``pool_call``.

    Raises:
        ValueError: ``rounds < 1``. TimeoutError: a call took longer than ``timeout`` seconds.
        ShardPoolError subclasses from the pool.
    """
    from ..pool import ShardPool

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    clock = time.perf_counter_ns
    samples: list[int] = []
    with ShardPool(TRIVIAL_HANDLER, workers=1) as pool:
        call = pool.call
        for k in range(warmup + rounds):
            t0 = clock()
            call(channel_id, {"type": "ping", "seq": k}, timeout)
            if k >= warmup:
                samples.append(clock() - t0)
    return round_trip_result("pool_call", samples)


def measure_ceilings(
    encoded: Sequence[tuple[bytes, bytes]],
    decoded: Sequence[tuple[bytes, Any]],
    *,
    repeats: int = 3,
    rows: Sequence[str] = ROW_KEYS,
    batch_size: int = 256,
    timeout_s: float = 120.0,
    rtt_rounds: int = 1000,
    ingress_workers: int = 2,
    recovery_kills: int = 5,
    recovery_interval_s: float = 0.3,
    say: Callable[[str], None] | None = None,
) -> CeilingRuns:
    """Measure the ``rows`` asked (keys of :data:`CEILING_ROWS`), ``repeats`` interleaved rounds.

    ``encoded`` holds ``(channel_id, CBOR payload)`` pairs and ``decoded`` the same messages as
    Python objects (the dict rows); the throughput rows run on all of them, the ingress row on
    as many messages of its own fresh traffic (:func:`~shardpool.bench.ingress_run.traffic`)
    through a backend of ``ingress_workers`` workers started once. ``rtt_rounds`` round trips
    per round for ``call_rtt``; ``recovery_kills`` kills ``recovery_interval_s`` apart, once.

    Raises:
        ValueError: an unknown row, ``repeats < 1`` or no messages for a throughput row.
        ShardPoolError / TimeoutError / RuntimeError: a run failed (every process it started is
            reaped first).
    """
    unknown = [r for r in rows if r not in ROW_KEYS]
    if unknown or repeats < 1:
        raise ValueError(f"rows must be among {ROW_KEYS} and repeats >= 1, got {rows}, {repeats}")
    if not encoded and set(rows) - {"call_rtt", "recovery"}:
        raise ValueError("the throughput rows need messages")
    out = CeilingRuns(len(encoded), repeats)
    for key in rows:
        out.shardpool[key] = []
        out.baseline[key] = []
    say = say or (lambda _: None)
    pool = functools.partial(run_pool, handler=TRIVIAL_HANDLER, batch_size=batch_size,
                             timeout_s=timeout_s, many=True)
    steps: list[tuple[str, str, Callable[[], float]]] = []
    if "forwarding_1w" in rows:
        steps += [
            ("forwarding_1w", "shardpool", lambda: pool(encoded, 1).msgs_per_s),
            ("forwarding_1w", "baseline", lambda: run_one_pass(
                encoded, 1, batch_size=batch_size, timeout=timeout_s).msgs_per_s),
        ]
    if "dicts_1w" in rows:
        steps += [
            ("dicts_1w", "shardpool", lambda: pool_dicts_rate(
                decoded, 1, batch_size=batch_size, timeout_s=timeout_s)),
            ("dicts_1w", "baseline", lambda: run_one_pass(
                decoded, 1, batch_size=batch_size, timeout=timeout_s, dicts=True).msgs_per_s),
        ]
    if "mp_queue_2w" in rows:
        steps += [
            ("mp_queue_2w", "shardpool", lambda: pool(encoded, 2).msgs_per_s),
            ("mp_queue_2w", "baseline", lambda: run_mp_queue(
                encoded, 2, timeout=timeout_s).msgs_per_s),
        ]
    if "call_rtt" in rows:
        steps += [
            ("call_rtt", "shardpool", lambda: call_round_trip(rtt_rounds, timeout_s).p50_us),
            ("call_rtt", "baseline", lambda: run_ping_pong(rtt_rounds, timeout_s).p50_us),
        ]
    if "ingress_1p" in rows:
        _measure_with_ingress(out, steps, len(encoded), ingress_workers, timeout_s, say)
    else:
        _rounds(out, steps, say)
    if "recovery" in rows:
        _measure_recovery(out, recovery_kills, recovery_interval_s, timeout_s, say)
    return out


def _rounds(out: CeilingRuns, steps: list[tuple[str, str, Callable[[], float]]],
            say: Callable[[str], None]) -> None:
    """``out.repeats`` rounds of ``steps``, each round rotated by one step more."""
    for r in range(out.repeats):
        shift = r % len(steps) if steps else 0
        for key, side, fn in steps[shift:] + steps[:shift]:
            value = fn()
            (out.shardpool if side == "shardpool" else out.baseline)[key].append(value)
            row = next(x for x in CEILING_ROWS if x.key == key)
            shown = f"{value:>12,.0f} msgs/s" if row.unit == "msgs/s" else f"{value:>10,.1f} us"
            say(f"ceilings round {r + 1}/{out.repeats}  {key:<14} {side:<10} {shown}")


def _measure_with_ingress(
    out: CeilingRuns, steps: list[tuple[str, str, Callable[[], float]]], messages: int,
    workers: int, timeout_s: float, say: Callable[[str], None],
) -> None:
    """Start one ingress backend, add its two contenders to ``steps``, run the rounds on it."""
    from .ingress_run import IngressBackend, in_process_rate, ingress_rate

    seeds = iter(range(2, 10_000))
    with IngressBackend(workers) as be:
        steps = [*steps,
                 ("ingress_1p", "shardpool", lambda: ingress_rate(
                     be.endpoint, messages, 1, next(seeds), timeout_s)),
                 ("ingress_1p", "baseline", lambda: in_process_rate(
                     be.pool, messages, next(seeds), timeout_s))]
        _rounds(out, steps, say)
        out.details["ingress_1p"] = {"workers": be.workers, "handler": be.handler,
                                     "messages": messages}


def _measure_recovery(out: CeilingRuns, kills: int, interval_s: float, timeout_s: float,
                      say: Callable[[str], None]) -> None:
    from .recovery_run import recovery_report

    say(f"ceilings: recovery, {kills} SIGKILLs of worker 0 under load, {interval_s:g} s apart")
    rep = recovery_report(workers=2, kills=kills, interval=interval_s, cost=False,
                          load_messages=RECOVERY_LOAD_MESSAGES, load_rate=RECOVERY_LOAD_RATE,
                          timeout=timeout_s)
    ms = [x * 1000.0 for x in rep["recovery_end_to_end_s"]["all"]]
    out.shardpool["recovery"] = ms
    front = rep["recovery_front_s"]
    out.details["recovery"] = {
        "workers": rep["workers"], "kills": kills, "interval_s": interval_s,
        "load_msgs_per_s": RECOVERY_LOAD_RATE,
        "restarts": rep["restarts"],
        "front_median_ms": round(front["median"] * 1000.0, 1) if front else None,
        "front_max_ms": round(front["max"] * 1000.0, 1) if front else None,
        "end_to_end_max_ms": round(max(ms), 1),
    }
    say(f"ceilings: recovery median {median(ms):,.1f} ms (kill -> next result)")


def ceilings_section(runs: CeilingRuns) -> dict[str, Any]:
    """The report's ``ceilings`` section: ``messages``, ``repeats`` and ``rows`` (one per row
    measured, in table order) with ``path``, ``unit``, ``shardpool`` (median), ``shardpool_runs``,
    ``baseline`` (its name), ``baseline_value`` (median), ``baseline_runs``, ``ratio`` (of the
    medians), ``ratio_paired`` (median of the per-round ratios), ``target`` (text),
    ``target_value``, ``target_of``, ``better``, ``met`` and the row's ``details``."""
    rows: dict[str, Any] = {}
    for row in CEILING_ROWS:
        if row.key not in runs.shardpool:
            continue
        ours, base = runs.shardpool[row.key], runs.baseline.get(row.key, [])
        value = round(median(ours), 1) if ours else None
        base_value = round(median(base), 1) if base else None
        r = ratio(value, base_value)
        rows[row.key] = {
            "path": row.path,
            "unit": row.unit,
            "shardpool": value,
            "shardpool_runs": [round(x, 1) for x in ours],
            "baseline": row.baseline,
            "baseline_value": base_value,
            "baseline_runs": [round(x, 1) for x in base],
            "ratio": r,
            "ratio_paired": paired(ours, base) if base else None,
            "target": row.target_text,
            "target_value": row.target,
            "target_of": row.target_of,
            "better": row.better,
            "met": row.met(r, value),
            "details": runs.details.get(row.key, {}),
        }
    return {"messages": runs.messages, "repeats": runs.repeats, "rows": rows}


def _figure(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "msgs/s":
        return f"{value:,.0f} msgs/s"
    return f"{value:,.1f} {unit}"


def ceiling_lines(section: dict[str, Any]) -> list[str]:
    """The ceilings section as text: a header and one line per row (shardpool, baseline, ratio
    of the medians, paired ratio, target and whether it was met), then what each baseline is."""
    lines = [
        f"ceilings (same run, median of {section['repeats']} interleaved rounds, "
        f"{section['messages']:,} messages per throughput run; targets reported, not enforced)",
        f"  {'path':<44}{'shardpool':>17}{'baseline':>17}{'ratio':>8}{'paired':>8}  target",
    ]
    notes = []
    for key, row in section["rows"].items():
        verdict = {True: "met", False: "MISSED", None: "-"}[row["met"]]
        rt = "-" if row["ratio"] is None else f"{row['ratio']:.3g}"
        rp = "-" if row["ratio_paired"] is None else f"{row['ratio_paired']:.3g}"
        lines.append(
            f"  {row['path'][:44]:<44}{_figure(row['shardpool'], row['unit']):>17}"
            f"{_figure(row['baseline_value'], row['unit']):>17}{rt:>8}{rp:>8}  "
            f"{row['target']} {verdict}"
        )
        if row["baseline"]:
            notes.append(f"{key}: baseline = {row['baseline']}")
        d = row["details"]
        if key == "recovery" and d:
            notes.append(f"recovery: {d['kills']} kills under {d['load_msgs_per_s']:,.0f} msgs/s "
                         f"of load, front's own figure median "
                         f"{d['front_median_ms']} ms; end to end max {d['end_to_end_max_ms']} ms")
    lines.extend(f"  {note}" for note in notes)
    return lines
