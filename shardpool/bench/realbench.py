"""``shardpool bench --workload lightning-real``: what the pool does for a node's real work.

The traffic is :func:`~shardpool.demo.realtraffic.generate_wire`: BOLT #2 wire messages, every
commitment, funding and closing signature real, every revocation secret real. The handler
(:class:`~shardpool.bench.handlers.DigestWireHandler`, ``payload = "raw"``: the bytes travel as
the producer sent them) parses each message and checks it as a node does (signatures with
libsecp256k1, secrets against their points, amounts, ids, order).

One run measures, interleaved repeat by repeat in a rotating order so a slow spell of the shared
machine hits them alike:

* **serial** — one process doing the same work with no pool (parse + state machine + checks, in
  arrival order, in this process), each message timed: the baseline of the speed-up, and the CPU
  cost per message type;
* **shardpool at each worker count** (1, 2, 4, … up to ``--workers``): messages/s and
  signature verifications/s, their ratio to the serial run (of the medians, and the median of the
  per-repeat ratios), and the order check — violations, sequence errors, every channel's final
  state against the serial replay;
* **by-type dispatch** (lnd 8393) on a prefix of the same traffic, and shardpool on that prefix
  with the same per-message delay.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..demo import wire
from ..demo.real import OPENING_TYPES, RealChannelState, replay_wire, verifications
from ..demo.realtraffic import generate_wire
from .handlers import ASYNC_WIRE_HANDLER, WIRE_HANDLER, WIRE_PROBE, state_digest
from .options import BenchOptions
from .report import Progress, bytype_lines, machine_info, median, paired, ratio
from .runs import ORDER_COUNTERS, PoolRun, run_pool
from .scenario import compare_by_type

__all__ = ["RealTraffic", "format_real_report", "make_real_traffic", "run_real_bench",
           "serial_run", "worker_counts"]


@dataclass(frozen=True)
class RealTraffic:
    """The real traffic in arrival order and what a serial replay makes of it."""

    stream: list[tuple[bytes, bytes]]  # (channel id, BOLT #2 wire message)
    reference: dict[bytes, str]  # channel id -> state digest after the serial replay
    signatures: int  # signature verifications a receiver makes on the whole stream
    secret_checks: int  # revocation secrets it checks


@dataclass(frozen=True)
class SerialRun:
    """One serial pass: seconds, and per message type the messages and nanoseconds spent."""

    elapsed_s: float
    by_type: dict[str, tuple[int, int]]

    @property
    def msgs_per_s(self) -> float:
        return sum(n for n, _ in self.by_type.values()) / self.elapsed_s


def make_real_traffic(opts: BenchOptions) -> RealTraffic:
    """Generate the traffic of ``opts`` and its reference.

    Raises:
        RuntimeError: the stream is not valid when replayed serially (a generator bug).
    """
    stream = generate_wire(opts.n_peers, opts.channels_per_peer, opts.n_messages, opts.seed,
                           close_fraction=opts.close_fraction)
    states, violations = replay_wire(stream)
    if violations:
        raise RuntimeError(f"the traffic is not valid when replayed serially: {violations}")
    checks = sum(s.secret_checks for s in states.values() if isinstance(s, RealChannelState))
    return RealTraffic(stream, {c: state_digest(s) for c, s in states.items()},
                       verifications(states), checks)


def serial_run(stream: list[tuple[bytes, bytes]]) -> SerialRun:
    """Apply ``stream`` in this process, one message after the other, as a worker's handler
    would (decode, state machine, checks), timing each message (``perf_counter_ns``, ~0.1 µs).
    Never raises on bad messages."""
    states: dict[bytes, RealChannelState] = {}
    spent: dict[str, list[int]] = {}
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for cid, data in stream:
        start = clock()
        state = states.get(cid)
        if state is None:
            state = states[cid] = RealChannelState(cid)
        try:
            msg: Any = wire.decode(data)
        except wire.WireError:
            msg = None
        state.apply(msg)
        cell = spent.get(msg["type"] if msg else "undecodable")
        if cell is None:
            cell = spent[msg["type"] if msg else "undecodable"] = [0, 0]
        cell[0] += 1
        cell[1] += clock() - start
    elapsed = time.perf_counter() - t0
    return SerialRun(elapsed, {t: (n, ns) for t, (n, ns) in spent.items()})


def worker_counts(workers: int) -> list[int]:
    """1, 2, 4, … below ``workers``, then ``workers`` (2 → [1, 2]; 12 → [1, 2, 4, 8, 12])."""
    out = [1]
    while out[-1] * 2 < workers:
        out.append(out[-1] * 2)
    if workers > 1:
        out.append(workers)
    return out


class _Measured:
    """The interleaved runs: serial passes and pool runs per worker count."""

    def __init__(self, counts: list[int]) -> None:
        self.serial: list[SerialRun] = []
        self.pool: dict[int, list[PoolRun]] = {w: [] for w in counts}


def _measure(opts: BenchOptions, traffic: RealTraffic, say: Progress) -> _Measured:
    counts = worker_counts(opts.workers)
    out = _Measured(counts)
    channels = list(traffic.reference)

    def pool(w: int) -> Callable[[str], None]:
        def step(tag: str) -> None:
            run = run_pool(
                traffic.stream, w, handler=WIRE_HANDLER, payload="raw", probe=channels,
                probe_message=WIRE_PROBE, batch_size=opts.batch_size,
                max_inflight=opts.window, config=opts.config, timeout_s=opts.timeout_s,
                name=f"shardpool_{w}w",
            )
            ref = traffic.reference
            out.pool[w].append(PoolRun(**{
                **{f: getattr(run, f) for f in PoolRun.__dataclass_fields__},
                "digests": {}, "hot_channels": run.hot_channels[:3],
                "digest_mismatches": sum(1 for c in ref if run.digests.get(c) != ref[c]),
            }))
            say(f"{tag}  shardpool, {w} worker{'s' if w > 1 else ''}  {run.msgs_per_s:>10,.0f} "
                f"msgs/s  violations {run.violations}  "
                f"digest mismatches {out.pool[w][-1].digest_mismatches}")
        return step

    def serial(tag: str) -> None:
        run = serial_run(traffic.stream)
        out.serial.append(run)
        say(f"{tag}  one process, serially  {run.msgs_per_s:>10,.0f} msgs/s")

    steps = [serial, *(pool(w) for w in counts)]
    for r in range(opts.repeats):
        shift = r % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step(f"repeat {r + 1}/{opts.repeats}")
    return out


def _cost_by_type(runs: list[SerialRun]) -> dict[str, dict[str, float]]:
    """Per message type: its count and the median over the runs of its mean cost (µs)."""
    types = sorted({t for r in runs for t in r.by_type})
    out = {}
    for t in types:
        means = [r.by_type[t][1] / r.by_type[t][0] / 1000 for r in runs if t in r.by_type]
        out[t] = {"count": runs[0].by_type.get(t, (0, 0))[0], "us": round(median(means), 1)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["us"] * kv[1]["count"]))


def _point(w: int, runs: list[PoolRun], serial: list[float], sigs: int) -> dict[str, Any]:
    rates = [r.msgs_per_s for r in runs]
    msgs = median(rates)
    n = runs[0].messages
    return {
        "workers": w,
        "msgs_per_s": round(msgs, 1),
        "verifications_per_s": round(msgs * sigs / n, 1),
        "runs": [r.summary() for r in runs],
        "over_serial": ratio(msgs, median(serial)),
        "over_serial_paired": paired(rates, serial),
        "worker_cpu_us_per_message": round(
            median([r.worker_cpu_s / r.messages for r in runs]) * 1e6, 1),
        # The share of their cores the workers got: low means the machine was busy elsewhere.
        "worker_utilisation": round(
            median([r.worker_cpu_s / r.elapsed_s / w for r in runs if r.elapsed_s > 0]), 3),
    }


def _order(runs: list[PoolRun], traffic: RealTraffic) -> dict[str, Any]:
    by_code: Counter[str] = Counter()
    seq: Counter[str] = Counter()
    for r in runs:
        by_code.update(r.violations_by_code)
        seq.update(r.sequence_errors)
    return {
        "violations": sum(by_code.values()),
        "violations_by_code": dict(sorted(by_code.items())),
        "force_closed_channels": sum(r.violating_channels for r in runs),
        "failures": sum(r.failures for r in runs),
        "sequence_errors": {k: seq.get(k, 0) for k in ORDER_COUNTERS},
        "digest": {"channels_checked": len(traffic.reference) * len(runs),
                   "mismatches": sum(r.digest_mismatches for r in runs)},
    }


def _by_type(opts: BenchOptions, traffic: RealTraffic, say: Progress) -> dict[str, Any]:
    prefix = traffic.stream[: min(opts.bytype_messages, len(traffic.stream))]
    states, _ = replay_wire(prefix)
    return compare_by_type(
        opts, say, prefix,
        lambda channels: run_pool(
            prefix, opts.workers, handler=ASYNC_WIRE_HANDLER,
            handler_options={"delay_s": opts.bytype_delay_s}, payload="raw", probe=channels,
            probe_message=WIRE_PROBE, batch_size=opts.batch_size, config=opts.config,
            timeout_s=opts.timeout_s, name="shardpool_same_traffic",
        ),
        {cid: state_digest(st) for cid, st in states.items()},
        f"AsyncWireLightningHandler(delay_s={opts.bytype_delay_s:g})",
        new_state=RealChannelState, type_of=wire.message_type, inline=OPENING_TYPES,
    )


def run_real_bench(opts: BenchOptions, say: Progress) -> dict[str, Any]:
    """The whole lightning-real scenario (see the module docstring); the JSON-ready report.
    ``report["ok"]`` is False if any pool run showed a violation, sequence error, failure or
    digest mismatch.

    Raises:
        ShardPoolError / TimeoutError / RuntimeError: a pool or baseline run failed.
    """
    wall0 = time.perf_counter()
    say(f"traffic: {opts.n_messages:,} BOLT #2 wire messages over "
        f"{opts.n_peers * opts.channels_per_peer:,} channel slots ({opts.n_peers:,} peers), "
        f"seed {opts.seed}; signing them")
    traffic = make_real_traffic(opts)
    say(f"traffic ready: {len(traffic.reference):,} channel ids, {traffic.signatures:,} "
        f"signatures and {traffic.secret_checks:,} revocation secrets to check")
    measured = _measure(opts, traffic, say)
    bytype = _by_type(opts, traffic, say) if opts.bytype_messages else None
    serial_rates = [r.msgs_per_s for r in measured.serial]
    serial = median(serial_rates)
    n = len(traffic.stream)
    every = [r for runs in measured.pool.values() for r in runs]
    order = _order(every, traffic)
    mix = Counter(wire.message_type(m) or "undecodable" for _, m in traffic.stream)
    report: dict[str, Any] = {
        "version": 1,
        "workload": "lightning-real",
        "machine": machine_info(),
        "options": asdict(opts),
        "traffic": {
            "messages": n, "channel_ids": len(traffic.reference), "peers": opts.n_peers,
            "seed": opts.seed, "payload_bytes_avg": round(sum(len(m) for _, m in
                                                             traffic.stream) / n, 1),
            "mix": dict(mix.most_common()), "signatures": traffic.signatures,
            "secret_checks": traffic.secret_checks,
        },
        "serial": {
            "msgs_per_s": round(serial, 1),
            "verifications_per_s": round(serial * traffic.signatures / n, 1),
            "runs": [round(r, 1) for r in serial_rates],
            "cost_us_by_type": _cost_by_type(measured.serial),
        },
        "shardpool": {
            "handler": "DigestWireHandler (payload raw)",
            "points": [_point(w, runs, serial_rates, traffic.signatures)
                       for w, runs in measured.pool.items()],
            **order,
        },
        "baselines": {"by_type": bytype} if bytype else {},
    }
    same = bytype["shardpool_same_traffic"] if bytype else {}
    report["ok"] = (
        order["violations"] == 0 and order["failures"] == 0
        and order["digest"]["mismatches"] == 0 and not any(order["sequence_errors"].values())
        and same.get("violations", 0) == 0 and same.get("digest_mismatches", 0) == 0
        and not any(same.get("sequence_errors", {}).values())
    )
    report["elapsed_s"] = round(time.perf_counter() - wall0, 2)
    say(f"done in {report['elapsed_s']:.1f} s")
    return report


def format_real_report(report: dict[str, Any]) -> str:
    """The lightning-real report as text for a terminal."""
    t, s, sp, m, o = (report[k] for k in ("traffic", "serial", "shardpool", "machine",
                                           "options"))
    lines = [
        f"shardpool bench (lightning-real): {t['messages']:,} BOLT #2 wire messages, "
        f"{t['channel_ids']:,} channels ({t['peers']:,} peers, seed {t['seed']}, "
        f"{t['payload_bytes_avg']:.0f} B avg), {t['signatures']:,} signatures and "
        f"{t['secret_checks']:,} revocation secrets to check, {o['repeats']} repeats",
        f"machine: {m['cpus']} CPUs, Python {m['python']}, {m['platform']}",
        "",
        f"{'throughput (same traffic, interleaved runs)':<44}{'msgs/s':>10}{'verif./s':>11}"
        f"{'÷ serial':>10}{'paired':>8}   each run",
        f"  {'one process, serially (no pool)':<42}{s['msgs_per_s']:>10,.0f}"
        f"{s['verifications_per_s']:>11,.0f}{1.0:>10.2f}{'':>8}   "
        + " ".join(f"{r / 1000:,.1f}k" for r in s["runs"]),
    ]
    for p in sp["points"]:
        label = f"shardpool, {p['workers']} worker{'s' if p['workers'] > 1 else ''}"
        lines.append(
            f"  {label:<42}{p['msgs_per_s']:>10,.0f}{p['verifications_per_s']:>11,.0f}"
            f"{p['over_serial'] or 0:>10.2f}{p['over_serial_paired'] or 0:>8.2f}   "
            + " ".join(f"{r['msgs_per_s'] / 1000:,.1f}k" for r in p["runs"])
            + f"   (workers: {p['worker_cpu_us_per_message']:,.0f} µs CPU/msg, "
            f"{p['worker_utilisation']:.0%} of their cores)"
        )
    lines += ["", "CPU per message by type (serial runs, mean µs, median of repeats; count):"]
    lines += [f"  {k:<22}{v['us']:>9,.1f} µs  × {v['count']:,}"
              for k, v in s["cost_us_by_type"].items()]
    se, dg = sp["sequence_errors"], sp["digest"]
    lines += [
        "",
        f"order: {sp['violations']} protocol violations, {sp['force_closed_channels']} "
        f"force-closed channels, {se['gaps']} gaps / {se['duplicates']} duplicates / "
        f"{se['reorders']} reorders, {sp['failures']} failures; final state = serial replay on "
        f"{dg['channels_checked'] - dg['mismatches']:,}/{dg['channels_checked']:,} channel checks",
    ]
    bt = report["baselines"].get("by_type")
    if bt:
        lines += bytype_lines(bt)
    lines += ["", f"verdict: {'OK - order kept' if report['ok'] else 'FAILED - order broken'}"
                  f"   (bench took {report['elapsed_s']:.1f} s)"]
    return "\n".join(lines)
