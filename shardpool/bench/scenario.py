"""The whole ``shardpool bench`` scenario (:func:`run_bench`), in phases.

One run answers the two questions shardpool exists for, on the same seeded Lightning traffic
(:mod:`shardpool.demo.traffic`):

* **Is the order kept?** The traffic goes through a pool running the BOLT #2 state machine
  (:class:`~shardpool.bench.handlers.DigestLightningHandler`). Every protocol violation the
  handler reports, every gap/duplicate/reorder the workers' sequence checks count, and every
  channel whose final state digest differs from a serial :func:`~shardpool.demo.channel.replay`
  of the stream is an order failure — all must be zero. The naive by-type dispatch (lnd issue
  8393) runs on a prefix of the same traffic and shows what happens without the guarantee;
  shardpool runs the same prefix with the same per-message delay (an ``async`` handler) for the
  side-by-side count.
* **How fast?** Throughput (median of repeats) of the pool with the Lightning handler and with a
  trivial handler, next to the per-item pyzmq+cbor2 harness and the naive
  ``multiprocessing.Queue``-per-worker pool from :mod:`shardpool.bench.baselines`, fed the very
  same ``(channel_id, CBOR payload)`` pairs, interleaved repeat by repeat (pool, bare, queue,
  pool, …) so the noise of a shared machine hits all of them alike; the ratios are the figures to
  compare. Latency is the time from ``submit_bytes`` to the message's ``on_done`` callback (its
  result arriving back in the front), measured open-loop at a fraction of the measured capacity
  (every message timed) and, separately, on a 1-in-N sample of the closed-loop run, where it is
  mostly queueing in the in-flight window.
* **How far from the ceilings?** :meth:`Scenario.ceilings` (with the baselines): each row of
  :mod:`~shardpool.bench.ceilings` — 1 worker pre-encoded and dicts against the one-pass ceiling
  harness, 2 workers against the mp.Queue pool, the idle ``pool.call`` round trip against a bare
  ping-pong, the ingress against in-process submits, the recovery after SIGKILL — as a ratio to
  its baseline measured in the same run.

The phases: :func:`make_traffic`, then :class:`Scenario`'s :meth:`~Scenario.throughput`,
:meth:`~Scenario.ceilings`, :meth:`~Scenario.latency` and :meth:`~Scenario.by_type`, then
:func:`~shardpool.bench.report.build_report`. Every pool and baseline start-up happens before its
clock starts. Every process started is reaped before a function returns or raises (the pool by
``close``, the baselines by their own cleanup).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..demo.bytype import run_by_type_dispatch
from ..demo.channel import replay
from ..demo.traffic import encode, generate
from .baselines import run_bare_zmq, run_mp_queue
from .handlers import (
    ASYNC_LIGHTNING_HANDLER,
    LIGHTNING_HANDLER,
    TRIVIAL_HANDLER,
    calibrate_cost,
    state_digest,
)
from .options import BenchOptions
from .report import Progress, build_report, latency_summary, median
from .runs import PoolRun, RunResult, run_pool

__all__ = ["Latency", "Scenario", "Throughput", "Traffic", "compare_by_type", "make_traffic",
           "run_bench"]


@dataclass(frozen=True)
class Traffic:
    """The scenario's traffic, in arrival order, and what a serial replay makes of it."""

    encoded: list[tuple[bytes, bytes]]  # (channel id, CBOR payload)
    decoded: list[tuple[bytes, Any]]  # (channel id, message)
    reference: dict[bytes, str]  # channel id -> state digest after a serial replay

    @property
    def channel_ids(self) -> list[bytes]:
        return list(self.reference)

    @property
    def payload_avg(self) -> float:
        """Mean encoded payload size (bytes)."""
        return sum(len(p) for _, p in self.encoded) / len(self.encoded)


@dataclass
class Throughput:
    """The interleaved throughput runs, one of each kind per repeat (baselines when asked)."""

    lightning: list[PoolRun] = field(default_factory=list)
    trivial: list[PoolRun] = field(default_factory=list)
    many: list[PoolRun] = field(default_factory=list)
    bare: list[RunResult] = field(default_factory=list)
    queue: list[RunResult] = field(default_factory=list)


@dataclass(frozen=True)
class Latency:
    """The latency phase: the open-loop figures, the closed-loop sample (closed mode only), and
    the runs made for it (counted for order, not for throughput)."""

    open_loop: dict[str, Any]
    saturated: dict[str, Any] | None
    runs: list[PoolRun]


def make_traffic(opts: BenchOptions) -> Traffic:
    """Generate the traffic of ``opts`` and its reference digests.

    Raises:
        RuntimeError: the generated stream is not valid when replayed serially (a generator bug).
    """
    decoded = generate(
        opts.n_peers, opts.channels_per_peer, opts.n_messages, opts.seed,
        close_fraction=opts.close_fraction,
    )
    encoded = encode(decoded)
    states, violations = replay(decoded)
    if violations:
        raise RuntimeError(f"the traffic is not valid when replayed serially: {violations}")
    reference = {cid: state_digest(st) for cid, st in states.items()}
    return Traffic(encoded, decoded, reference)


class Scenario:
    """The measuring phases of one bench, sharing its options, traffic and progress lines."""

    def __init__(self, opts: BenchOptions, traffic: Traffic, say: Progress) -> None:
        self.opts = opts
        self.traffic = traffic
        self.say = say
        # Calibrated once, here, before any worker starts: every run does the same work.
        self.cost_iters = calibrate_cost(opts.cpu_cost_us)
        self.lightning_options: dict[str, Any] = {"cpu_cost_us": float(opts.cpu_cost_us)}
        if self.cost_iters:
            self.lightning_options["cost_iters"] = self.cost_iters

    def _run_pool(self, stream: list[tuple[bytes, bytes]], **how: Any) -> PoolRun:
        o = self.opts
        return run_pool(
            stream, o.workers, batch_size=o.batch_size, max_inflight=o.window,
            config=o.config, timeout_s=o.timeout_s, **how,
        )

    # -- throughput ----------------------------------------------------------------------------

    def throughput(self) -> Throughput:
        """``repeats`` rounds of the Lightning run (and, with baselines, the trivial handler one
        message and one chunk per call, the bare harness and the mp.Queue pool), each round in
        another order: rotating it spreads slow phases of the machine over all contenders."""
        out = Throughput()
        steps: dict[str, Callable[[str, Throughput], None]] = {
            "lightning": self._lightning,
            "trivial": self._trivial,
            "bare": self._bare,
            "many": self._many,
            "queue": self._queue,
        }
        order = list(steps) if self.opts.baselines else ["lightning"]
        for r in range(self.opts.repeats):
            tag = f"repeat {r + 1}/{self.opts.repeats}"
            shift = r % len(order)
            for step in order[shift:] + order[:shift]:
                steps[step](tag, out)
        return out

    def _lightning(self, tag: str, out: Throughput) -> None:
        opens = self.opts.mode == "open"
        run = self._run_pool(
            self.traffic.encoded, handler=LIGHTNING_HANDLER,
            handler_options=self.lightning_options,
            rate=self.opts.rate if opens else None,
            sample_every=1 if opens else self.opts.sample_every,
            probe=self.traffic.channel_ids, name="shardpool",
        )
        ref = self.traffic.reference
        run = dataclasses.replace(
            run, digest_mismatches=sum(1 for c in ref if run.digests.get(c) != ref[c]),
            digests={}, hot_channels=run.hot_channels[:3],
        )
        out.lightning.append(run)
        self.say(
            f"{tag}  shardpool LightningHandler  {run.msgs_per_s:>12,.0f} msgs/s  "
            f"violations {run.violations}  digest mismatches {run.digest_mismatches}"
        )

    def _trivial(self, tag: str, out: Throughput) -> None:
        run = self._run_pool(self.traffic.encoded, handler=TRIVIAL_HANDLER,
                             name="shardpool_trivial")
        out.trivial.append(run)
        self.say(f"{tag}  shardpool trivial handler   {run.msgs_per_s:>12,.0f} msgs/s")

    def _many(self, tag: str, out: Throughput) -> None:
        run = self._run_pool(self.traffic.encoded, handler=TRIVIAL_HANDLER, many=True,
                             name="shardpool_trivial_many")
        out.many.append(run)
        self.say(f"{tag}  shardpool trivial, batched  {run.msgs_per_s:>12,.0f} msgs/s")

    def _bare(self, tag: str, out: Throughput) -> None:
        res = run_bare_zmq(self.traffic.encoded, self.opts.workers,
                           batch_size=self.opts.batch_size, timeout=self.opts.timeout_s)
        out.bare.append(res)
        self.say(f"{tag}  per-item pyzmq+cbor2 harn.  {res.msgs_per_s:>12,.0f} msgs/s")

    def _queue(self, tag: str, out: Throughput) -> None:
        res = run_mp_queue(self.traffic.encoded, self.opts.workers, timeout=self.opts.timeout_s)
        out.queue.append(res)
        self.say(f"{tag}  multiprocessing.Queue pool  {res.msgs_per_s:>12,.0f} msgs/s")

    # -- ceilings ------------------------------------------------------------------------------

    def ceilings(self) -> dict[str, Any]:
        """The ceilings section (:mod:`~shardpool.bench.ceilings`): every row on the first
        ``ceiling_messages`` messages of the traffic (pre-encoded and as dicts), ``repeats``
        interleaved rounds, the recovery once."""
        from .ceilings import ceilings_section, measure_ceilings

        o = self.opts
        n = min(o.ceiling_messages, len(self.traffic.encoded))
        self.say(f"ceilings: {n:,} messages per throughput run, {o.repeats} interleaved rounds")
        runs = measure_ceilings(
            self.traffic.encoded[:n], self.traffic.decoded[:n], repeats=o.repeats,
            batch_size=o.batch_size, timeout_s=o.timeout_s, rtt_rounds=o.rtt_rounds,
            ingress_workers=o.workers, recovery_kills=o.recovery_kills,
            recovery_interval_s=o.recovery_interval_s, say=self.say,
        )
        return ceilings_section(runs)

    # -- latency -------------------------------------------------------------------------------

    def latency(self, measured: Throughput) -> Latency:
        """Open mode: the Lightning runs timed every message already. Closed mode: one more
        open-loop run at ``latency_load`` of the median throughput, every message timed; the
        closed-loop runs' 1-in-``sample_every`` sample is the latency at saturation."""
        o = self.opts
        median_rate = median([r.msgs_per_s for r in measured.lightning])
        samples = [ns for run in measured.lightning for ns in run.latency_ns]
        if o.mode == "open":
            return Latency(
                {"mode": "open", "rate": o.rate, "messages": len(samples),
                 "achieved_msgs_per_s": round(median_rate, 1), "sampled": "every message",
                 "us": latency_summary(samples)},
                None, [],
            )
        rate = max(1.0, o.latency_load * median_rate)
        n = max(1, min(len(self.traffic.encoded), int(rate * o.latency_seconds)))
        self.say(f"latency: open-loop at {rate:,.0f} msgs/s ({o.latency_load:.0%} of the "
                 f"median throughput), {n:,} messages, every one timed")
        run = self._run_pool(
            self.traffic.encoded[:n], handler=LIGHTNING_HANDLER,
            handler_options=self.lightning_options, rate=rate, sample_every=1,
            name="shardpool_latency",
        )
        return Latency(
            {"mode": "open", "rate": round(rate, 1), "messages": n,
             "achieved_msgs_per_s": round(run.msgs_per_s, 1), "sampled": "every message",
             "us": latency_summary(run.latency_ns)},
            {"mode": "closed", "sampled": f"1 in {o.sample_every}",
             "us": latency_summary(samples)},
            [run],
        )

    # -- by-type dispatch ----------------------------------------------------------------------

    def by_type(self) -> dict[str, Any]:
        """The by-type dispatch on a prefix of the traffic, and shardpool on the same prefix
        with the same per-message delay (an async handler awaiting it); the report's section."""
        o = self.opts
        n = min(o.bytype_messages, len(self.traffic.decoded))
        prefix = list(self.traffic.decoded[:n])
        states, _ = replay(prefix)
        return compare_by_type(
            o, self.say, prefix,
            lambda channels: self._run_pool(
                self.traffic.encoded[:n], handler=ASYNC_LIGHTNING_HANDLER,
                handler_options={"delay_s": o.bytype_delay_s, **self.lightning_options},
                probe=channels, name="shardpool_same_traffic",
            ),
            {cid: state_digest(st) for cid, st in states.items()},
            f"AsyncLightningHandler(delay_s={o.bytype_delay_s:g})",
        )


def compare_by_type(
    opts: BenchOptions,
    say: Progress,
    prefix: list[tuple[bytes, Any]],
    run_ours: Callable[[list[bytes]], PoolRun],
    reference: dict[bytes, str],
    handler: str,
    **dispatch: Any,
) -> dict[str, Any]:
    """The by-type dispatch (lnd 8393) on ``prefix``, then ``run_ours(channels)`` — shardpool on
    the same messages with the same per-message delay, probing those channels — compared with
    ``reference`` (channel id → serial replay digest); the report's section. ``dispatch`` goes to
    :func:`~shardpool.demo.bytype.run_by_type_dispatch` (the state type, the type reader).

    Raises:
        TimeoutError / RuntimeError: the by-type run failed; as ``run_ours``.
    """
    say(f"by-type dispatch (lnd 8393): first {len(prefix):,} messages, "
        f"{opts.bytype_delay_s * 1e6:.0f} us per message")
    res = run_by_type_dispatch(prefix, delay_s=opts.bytype_delay_s, timeout=opts.timeout_s,
                               seed=opts.seed, **dispatch)
    ours = run_ours(list(reference))
    mismatches = sum(1 for c, d in reference.items() if ours.digests.get(c) != d)
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
        "msgs_per_s": (round(res["messages"] / res["elapsed_s"], 1)
                       if res["elapsed_s"] else None),
        "shardpool_same_traffic": {
            "handler": handler,
            "violations": ours.violations,
            "force_closed_channels": ours.violating_channels,
            "digest_mismatches": mismatches,
            "failures": ours.failures,
            "sequence_errors": ours.sequence_errors,
            "msgs_per_s": round(ours.msgs_per_s, 1),
        },
    }


def run_bench(opts: BenchOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Run the whole scenario of ``opts`` and return the report (JSON-ready; see
    :func:`~shardpool.bench.report.format_report` for its reading). ``report["ok"]`` is False if
    shardpool showed any order violation, sequence error, failure or digest mismatch.

    Raises:
        ValueError: an option is out of range.
        ShardPoolError / TimeoutError / RuntimeError: a pool or baseline run failed.
    """
    opts.check()
    say = progress or Progress(enabled=False)
    if opts.workload == "lightning-real":
        from .realbench import run_real_bench

        return run_real_bench(opts, say)
    if opts.workload == "levelling":
        from .levelling import run_levelling_bench

        return run_levelling_bench(opts, say)
    wall0 = time.perf_counter()
    say(
        f"traffic: {opts.n_messages:,} messages over {opts.n_peers * opts.channels_per_peer:,} "
        f"channel slots ({opts.n_peers:,} peers), seed {opts.seed}"
    )
    traffic = make_traffic(opts)
    say(f"traffic ready: {len(traffic.reference):,} channel ids, payload "
        f"{traffic.payload_avg:.0f} B on average")
    scenario = Scenario(opts, traffic, say)
    measured = scenario.throughput()
    ceilings = (scenario.ceilings() if opts.baselines and opts.ceiling_messages else None)
    latency = scenario.latency(measured)
    bytype = scenario.by_type() if opts.bytype_messages else None
    report = build_report(opts, traffic, measured, latency, bytype, scenario.cost_iters,
                          ceilings)
    report["elapsed_s"] = round(time.perf_counter() - wall0, 2)
    say(f"done in {report['elapsed_s']:.1f} s")
    return report
