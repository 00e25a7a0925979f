"""What the bench tells its user: progress lines, the JSON-ready report (:func:`build_report`)
and its text (:func:`format_report`), and the statistics they use.

Ratios are always of figures measured side by side in one run: the machines are shared and noisy.
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TextIO

from .options import available_cpus
from .runs import ORDER_COUNTERS, PoolRun, RunResult

if TYPE_CHECKING:
    from .options import BenchOptions
    from .scenario import Latency, Throughput, Traffic

__all__ = [
    "LATENCY_QUANTILES",
    "Progress",
    "build_report",
    "bytype_lines",
    "format_report",
    "latency_summary",
    "machine_info",
    "median",
    "paired",
    "ratio",
]

LATENCY_QUANTILES: tuple[tuple[str, float], ...] = (
    ("p50", 0.50),
    ("p90", 0.90),
    ("p99", 0.99),
    ("p99.9", 0.999),
)

Report = dict[str, Any]


class Progress:
    """Progress lines on a stream (stderr by default), each stamped with the seconds since start.

    ``enabled=False`` makes every call a no-op.
    """

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.enabled:
            print(f"[{time.perf_counter() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)


# ---------------------------------------------------------------------------------- statistics


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


def median(values: Sequence[float]) -> float:
    """The median, 0.0 for no values."""
    return float(statistics.median(values)) if values else 0.0


def paired(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Median of ``a[i] / b[i]`` over the pairs, 3 decimals (None when there is none): the ratio
    of runs made back to back, steadier than the ratio of the medians on a noisy machine."""
    pairs = [x / y for x, y in zip(a, b) if y > 0]  # noqa: B905 - a missing baseline: no pair
    return round(median(pairs), 3) if pairs else None


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to 3 decimals; None when either is missing or not finite, or ``b`` is not > 0."""
    if a is None or b is None or not (b > 0 and math.isfinite(a) and math.isfinite(b)):
        return None
    return round(a / b, 3)


def machine_info() -> dict[str, Any]:
    """The machine a report was measured on: CPUs available, Python version, platform."""
    return {
        "cpus": available_cpus(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


# ------------------------------------------------------------------------------ the JSON report


def _sum_seq(runs: Sequence[PoolRun]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for r in runs:
        total.update(r.sequence_errors)
    return {k: total.get(k, 0) for k in ORDER_COUNTERS}


def _rates(runs: Sequence[RunResult]) -> list[float]:
    return [r.msgs_per_s for r in runs]


def _baseline_summary(runs: Sequence[RunResult]) -> dict[str, Any]:
    return {
        "msgs_per_s": round(median(_rates(runs)), 1),
        "runs": [
            {"msgs_per_s": round(r.msgs_per_s, 1), "elapsed_s": round(r.elapsed_s, 4),
             "per_worker": list(r.per_worker)}
            for r in runs
        ],
    }


def _shardpool_section(
    opts: BenchOptions, traffic: Traffic, measured: Throughput, latency: Latency, cost_iters: int
) -> dict[str, Any]:
    """The Lightning runs (and the latency runs, for order): figures, balance and order."""
    runs = measured.lightning
    med_run = sorted(runs, key=lambda r: r.msgs_per_s)[len(runs) // 2]
    per_worker = med_run.per_worker
    total = sum(per_worker)
    mean = total / len(per_worker) if per_worker else 0.0
    every_run = runs + latency.runs
    by_code: Counter[str] = Counter()
    for run in every_run:
        by_code.update(run.violations_by_code)
    return {
        "handler": f"synthetic Lightning (cpu_cost_us={opts.cpu_cost_us:g})",
        "cost_iters": cost_iters,
        "workers": opts.workers,
        "mode": opts.mode,
        "msgs_per_s": round(median(_rates(runs)), 1),
        "runs": [r.summary() for r in runs],
        "per_worker": per_worker,
        "balance": {
            "shares": [round(p / total, 4) if total else 0.0 for p in per_worker],
            "max_over_mean": round(max(per_worker) / mean, 4) if mean else None,
        },
        "hot_channels": med_run.hot_channels,
        "violations": sum(by_code.values()),
        "violations_by_code": dict(sorted(by_code.items())),
        "force_closed_channels": sum(r.violating_channels for r in every_run),
        "failures": sum(r.failures for r in every_run),
        "sequence_errors": _sum_seq(every_run),
        "digest": {
            "channels_checked": len(traffic.reference) * len(runs),
            "mismatches": sum(r.digest_mismatches for r in runs),
        },
        "latency": latency.open_loop,
        "latency_saturated": latency.saturated,
    }


def _add_baselines(report: Report, measured: Throughput) -> None:
    """The trivial-handler runs, the baselines and the ratios between them."""
    trivial, many, bare, queue = (
        _rates(measured.trivial), _rates(measured.many), _rates(measured.bare),
        _rates(measured.queue),
    )
    lightning = median(_rates(measured.lightning))
    for key, runs, submit in (
        ("shardpool_trivial", measured.trivial, "submit_bytes, one call per message"),
        ("shardpool_trivial_many", measured.many,
         "submit_many_bytes, the whole stream in one call"),
    ):
        report[key] = {
            "handler": "noop (payload decoded by the worker)",
            "submit": submit,
            "msgs_per_s": round(median(_rates(runs)), 1),
            "runs": [r.summary() for r in runs],
            "sequence_errors": _sum_seq(runs),
        }
    report["baselines"]["bare_zmq"] = _baseline_summary(measured.bare)
    report["baselines"]["mp_queue"] = _baseline_summary(measured.queue)
    report["ratios"] = {
        "pool_over_bare": ratio(median(trivial), median(bare)),
        "pool_over_mp_queue": ratio(median(trivial), median(queue)),
        "pool_many_over_bare": ratio(median(many), median(bare)),
        "pool_many_over_mp_queue": ratio(median(many), median(queue)),
        "lightning_over_bare": ratio(lightning, median(bare)),
        "lightning_over_mp_queue": ratio(lightning, median(queue)),
    }
    # Per repeat (its runs ran back to back), then the median: steadier than the ratio of the
    # medians when the machine has slow spells.
    report["ratios_paired"] = {
        "pool_over_bare": paired(trivial, bare),
        "pool_over_mp_queue": paired(trivial, queue),
        "pool_many_over_bare": paired(many, bare),
        "pool_many_over_mp_queue": paired(many, queue),
    }
    _count_for_order(report["shardpool"], sum(r.failures for r in measured.trivial + measured.many),
                     _sum_seq(measured.trivial + measured.many))


def _count_for_order(section: dict[str, Any], failures: int, seq_errors: dict[str, int]) -> None:
    """Add other runs' failures and sequence errors to shardpool's order figures."""
    section["failures"] += failures
    for k, v in seq_errors.items():
        section["sequence_errors"][k] += v


def build_report(
    opts: BenchOptions,
    traffic: Traffic,
    measured: Throughput,
    latency: Latency,
    bytype: dict[str, Any] | None,
    cost_iters: int,
    ceilings: dict[str, Any] | None = None,
) -> Report:
    """The JSON-ready report of one bench (without ``elapsed_s``, which its caller adds);
    ``report["ok"]`` is False if shardpool showed any order violation, sequence error, failure
    or digest mismatch, in any of its runs. ``ceilings`` is the section of
    :func:`~shardpool.bench.ceilings.ceilings_section` (None: not measured)."""
    shardpool = _shardpool_section(opts, traffic, measured, latency, cost_iters)
    mix = Counter(msg["type"] for _, msg in traffic.decoded)
    report: Report = {
        "version": 1,
        "workload": "synthetic",
        "machine": machine_info(),
        "options": asdict(opts),
        "traffic": {
            "messages": len(traffic.encoded),
            "channel_slots": opts.n_peers * opts.channels_per_peer,
            "channel_ids": len(traffic.reference),
            "peers": opts.n_peers,
            "seed": opts.seed,
            "payload_bytes_avg": round(traffic.payload_avg, 1),
            "mix": dict(mix.most_common()),
        },
        "shardpool": shardpool,
        "baselines": {},
        "ratios": {},
        "ratios_paired": {},
    }
    if opts.baselines:
        _add_baselines(report, measured)
    if ceilings is not None:
        report["ceilings"] = ceilings
    same: dict[str, Any] = {"violations": 0, "digest_mismatches": 0}
    if bytype is not None:
        report["baselines"]["by_type"] = bytype
        same = bytype["shardpool_same_traffic"]
        _count_for_order(shardpool, same["failures"], same["sequence_errors"])
    report["ok"] = (
        shardpool["violations"] == 0
        and shardpool["failures"] == 0
        and shardpool["digest"]["mismatches"] == 0
        and not any(shardpool["sequence_errors"].values())
        and same["violations"] == 0
        and same["digest_mismatches"] == 0
    )
    return report


# ------------------------------------------------------------------------------- the text report


def _throughput_lines(report: Report) -> list[str]:
    sp = report["shardpool"]
    b = report["baselines"]
    rows: list[tuple[str, dict[str, Any] | None]] = [
        (f"shardpool, {sp['handler']}", sp),
        ("shardpool, trivial handler, submit_bytes", report.get("shardpool_trivial")),
        ("shardpool, trivial handler, submit_many_bytes", report.get("shardpool_trivial_many")),
        ("per-item pyzmq+cbor2 harness (run_bare_zmq)", b.get("bare_zmq")),
        ("multiprocessing.Queue per worker (naive)", b.get("mp_queue")),
    ]
    lines = [f"{'throughput (same traffic, interleaved runs)':<50}{'median msgs/s':>14}   each run"]
    for label, section in rows:
        if section is not None:
            each = " ".join(f"{r['msgs_per_s'] / 1000:,.0f}k" for r in section["runs"])
            lines.append(f"  {label:<48}{section['msgs_per_s']:>14,.0f}   {each}")
    r = report.get("ratios") or {}
    if r:
        lines.append(
            f"  ratios, trivial handler: shardpool÷bare {r['pool_over_bare']} "
            f"(submit_many_bytes {r['pool_many_over_bare']})   shardpool÷mp.Queue "
            f"{r['pool_over_mp_queue']} (submit_many_bytes {r['pool_many_over_mp_queue']})"
        )
        rp = report.get("ratios_paired") or {}
        if rp:
            lines.append(
                f"  same, median of per-repeat ratios: {rp['pool_over_bare']} "
                f"({rp['pool_many_over_bare']}) and {rp['pool_over_mp_queue']} "
                f"({rp['pool_many_over_mp_queue']})"
            )
        lines.append(
            f"  ratios, synthetic Lightning: shardpool÷bare {r['lightning_over_bare']}   "
            f"shardpool÷mp.Queue {r['lightning_over_mp_queue']}"
        )
    return lines


def _ceilings_lines(report: Report) -> list[str]:
    """The ceilings section and a blank line, or nothing when it was not measured."""
    section = report.get("ceilings")
    if not section:
        return []
    from .ceilings import ceiling_lines

    return [*ceiling_lines(section), ""]


def _percentiles(us: dict[str, Any]) -> str:
    return "  " + "  ".join(f"{k} {us[k]:,.0f}" for k in ("p50", "p90", "p99", "p99.9", "max"))


def _latency_lines(sp: dict[str, Any]) -> list[str]:
    lat = sp["latency"]
    lines = [
        f"latency submit→result, µs, open-loop at {lat['rate']:,.0f} msgs/s "
        f"({lat['us']['count']:,} messages, every one timed):",
        _percentiles(lat["us"]),
    ]
    sat = sp.get("latency_saturated")
    if sat:
        lines.append(f"latency at saturation, µs, closed-loop ({sat['sampled']} timed, "
                     f"{sat['us']['count']:,} samples; mostly queueing in the in-flight window):")
        lines.append(_percentiles(sat["us"]))
    return lines


def _order_lines(sp: dict[str, Any], bt: dict[str, Any] | None) -> list[str]:
    bal = sp["balance"]
    shares = "  ".join(f"w{i} {s:.1%}" for i, s in enumerate(bal["shares"]))
    lines = [f"per-worker balance (median run): {shares}   max/mean {bal['max_over_mean']}"]
    if sp["hot_channels"]:
        hot = ", ".join(f"{h}…={c}" for h, c in sp["hot_channels"][:3])
        lines.append(f"  hottest channels: {hot}")
    se = sp["sequence_errors"]
    dg = sp["digest"]
    lines.append(
        f"order: {sp['violations']} protocol violations, {sp['force_closed_channels']} "
        f"force-closed channels, {se['gaps']} gaps / {se['duplicates']} duplicates / "
        f"{se['reorders']} reorders, {sp['failures']} failures; final state = serial replay "
        f"on {dg['channels_checked'] - dg['mismatches']:,}/{dg['channels_checked']:,} "
        "channel checks"
    )
    if bt:
        lines.extend(bytype_lines(bt))
    return lines


def bytype_lines(bt: dict[str, Any]) -> list[str]:
    """The by-type section (:func:`~shardpool.bench.scenario.compare_by_type`) as text."""
    causes = ", ".join(f"{k} {v}" for k, v in sorted(bt["root_causes"].items(),
                                                        key=lambda kv: -kv[1]))
    same = bt["shardpool_same_traffic"]
    lines = [
        f"by-type dispatch (lnd 8393), first {bt['messages']:,} messages, "
        f"{bt['delay_s'] * 1e6:.0f} µs per message: {bt['violations']:,} violations, "
        f"{bt['force_closed_channels']:,}/{bt['channels']:,} channels force-closed"
    ]
    if causes:
        lines.append(f"  root causes: {causes}")
    lines.append(
        f"  shardpool, same traffic, {same['handler']}: {same['violations']} violations, "
        f"{same['force_closed_channels']} force-closed, {same['digest_mismatches']} "
        "digest mismatches"
    )
    return lines


def format_report(report: Report) -> str:
    """The human-readable report of :func:`~shardpool.bench.scenario.run_bench` (a multi-line
    string), of either workload."""
    if report.get("workload") == "lightning-real":
        from .realbench import format_real_report

        return format_real_report(report)
    if report.get("workload") == "levelling":
        from .levelling import format_levelling_report

        return format_levelling_report(report)
    o = report["options"]
    t = report["traffic"]
    sp = report["shardpool"]
    m = report["machine"]
    loop = ("closed-loop (max speed)" if o["mode"] == "closed"
            else f"open-loop at {sp['latency']['rate']:,.0f} msgs/s")
    lines = [
        f"shardpool bench: {t['messages']:,} messages, {t['channel_ids']:,} channels "
        f"({t['peers']:,} peers, seed {t['seed']}, payload {t['payload_bytes_avg']:.0f} B avg), "
        f"{o['workers']} workers, {o['repeats']} repeats, {loop}",
        f"machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}",
        "",
        *_throughput_lines(report),
        "",
        *_ceilings_lines(report),
        *_latency_lines(sp),
        "",
        *_order_lines(sp, report["baselines"].get("by_type")),
        "",
        f"verdict: {'OK - order kept' if report['ok'] else 'FAILED - order broken'}   "
        f"(bench took {report['elapsed_s']:.1f} s)",
    ]
    return "\n".join(lines)
