#!/usr/bin/env python3
"""CPU-bound efficiency versus worker count with load levelling off and on (JSON + summary).

Closed-loop traffic (as fast as backpressure allows) whose channel rates follow a Zipf law, run by
:class:`~shardpool.bench.handlers.CountingSpinHandler` (a fixed CPU cost per message, an order
check per channel) — the zipf phase of ``shardpool bench --workload levelling``, at each worker
count, with ``pool.rebalance = "off"`` and ``"auto"`` interleaved in a rotating order, and one
1-worker run per repeat (the baseline; levelling has nothing to do there). Each run lasts
``--run-seconds``; its throughput is taken over the second half (``steady``: after levelling has
acted). ``speedup = steady(w) / steady(1)``, ``efficiency = speedup / w`` (median of the repeats,
and paired: the ratio taken repeat by repeat). The target (the live-slot-moves issue): efficiency
≥ 0.85 up to 15 workers with levelling on. It is reported, never enforced.

The defaults suit a many-core machine: a Zipf exponent of 0.8 over 10,000 channels gives the
busiest worker 1.1-1.4× the mean under the static hash at 4-15 workers while the hottest channel
stays under one worker's share (so levelling can reach 1.0; with ``s = 1.1`` over 1,000 channels a
single channel exceeds a worker's share from 8 workers on, and no placement can help).

Usage::

    python3 scripts/levelling_scaling.py --workers 1 4 8 12 15 --out results/levelling-scaling.json
    python3 scripts/levelling_scaling.py --workers 1 2 --run-seconds 4 --repeats 1   # a smoke test

The JSON is rewritten after every run, so a run cut short keeps what it measured
(``"complete": false``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "shardpool" / "__init__.py").is_file():
    # Measure the code of the checkout this script belongs to, even where another copy is
    # installed (spawned workers inherit this path).
    sys.path.insert(0, str(_CHECKOUT))

from shardpool.bench.handlers import calibrate_cost  # noqa: E402
from shardpool.bench.levelling import (  # noqa: E402
    Setup,
    channel_ids,
    efficiency_points,
    efficiency_targets,
    format_scaling,
    ideal_max_over_mean,
    max_over_mean,
    static_shares,
    zipf_run,
    zipf_weights,
)
from shardpool.bench.options import BenchOptions  # noqa: E402
from shardpool.bench.report import Progress, machine_info  # noqa: E402


def measure(args: argparse.Namespace, save: Any) -> dict[str, Any]:
    """Every run (see the module docstring); ``save(doc)`` after each."""
    say = Progress(enabled=True)
    counts = sorted(set(args.workers))
    opts = BenchOptions(
        workload="levelling", workers=max(counts), channels=args.channels, zipf_s=args.zipf_s,
        message_cost_us=args.message_cost_us, run_s=args.run_seconds, repeats=args.repeats,
        seed=args.seed, max_inflight=args.max_inflight, timeout_s=args.timeout,
        rebalance_interval_s=args.rebalance_interval_s, rebalance_grace_s=args.rebalance_grace_s,
    )
    opts.check()
    iters = calibrate_cost(opts.message_cost_us)
    setup = Setup(opts, iters, say)
    weights = zipf_weights(opts.n_channels, opts.zipf_s)
    cids = channel_ids(opts.n_channels, opts.seed, "zipf")
    doc: dict[str, Any] = {
        "version": 1,
        "workload": "levelling-scaling",
        "machine": machine_info(),
        "options": {"workers": counts, "channels": opts.n_channels, "zipf_s": opts.zipf_s,
                    "message_cost_us": opts.message_cost_us, "run_s": opts.run_s,
                    "repeats": opts.repeats, "seed": opts.seed,
                    "max_inflight": opts.window,
                    "rebalance_interval_s": opts.rebalance_interval_s,
                    "rebalance_grace_s": opts.rebalance_grace_s},
        "cost_iters": iters,
        "static_max_over_mean": {str(w): max_over_mean(static_shares(cids, weights, w, 4096))
                                 for w in counts},
        "ideal_max_over_mean": {str(w): ideal_max_over_mean(weights, w) for w in counts},
        "runs": {},
        "points": [],
        "complete": False,
    }
    say(f"levelling scaling: workers {counts}, {opts.message_cost_us:g} µs per message "
        f"({iters} SHA-256 rounds), zipf s={opts.zipf_s:g} over {opts.n_channels:,} channels, "
        f"runs of {opts.run_s:g} s × {opts.repeats} repeats")
    runs: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for r in range(opts.repeats):
        for w in counts:
            modes = ["off"] if w == 1 else ["off", "auto"]
            if r % 2:
                modes.reverse()
            for mode in modes:
                run = zipf_run(setup, w, mode)
                runs.setdefault(w, {}).setdefault(mode, []).append(run)
                say(f"repeat {r + 1}/{opts.repeats}  w={w:<3} rebalance={mode:<4} steady "
                    f"{run['steady_msgs_per_s'] or 0:>10,.0f} msgs/s  CPU max/mean late "
                    f"{run['cpu_max_over_mean_late']}  moves {run['moves_committed']}  other "
                    f"CPUs {run['machine']['other_cpus']:.2f}")
                doc["runs"] = {str(k): v for k, v in runs.items()}
                doc["points"] = efficiency_points(runs)
                doc["targets"] = efficiency_targets(doc["points"])
                save(doc)
    doc["complete"] = True
    save(doc)
    return doc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8, 12, 15],
                   help="worker counts; 1 is always added as the baseline (default: 1 4 8 12 15)")
    p.add_argument("--run-seconds", type=float, default=8.0, help="seconds of each run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--channels", type=int, default=10_000)
    p.add_argument("--zipf-s", type=float, default=0.8)
    p.add_argument("--message-cost-us", type=float, default=200.0,
                   help="CPU microseconds the handler burns per message")
    p.add_argument("--max-inflight", type=int, default=1024,
                   help="per-worker in-flight window (small: a move waits for its old worker's "
                   "backlog, and the drain after each run stays short)")
    p.add_argument("--rebalance-interval-s", type=float, default=0.5)
    p.add_argument("--rebalance-grace-s", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per single run")
    p.add_argument("--out", type=Path, default=Path("results/levelling-scaling.json"))
    args = p.parse_args(argv)
    if min(args.workers) < 1 or args.repeats < 1 or args.run_seconds <= 0:
        p.error("--workers must be >= 1, --repeats >= 1, --run-seconds > 0")
    args.workers = sorted({1, *args.workers})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(doc: dict[str, Any]) -> None:
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(args.out)  # a reader (or a kill) never sees half a file

    t0 = time.perf_counter()
    doc = measure(args, save)
    print(format_scaling(doc))
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
