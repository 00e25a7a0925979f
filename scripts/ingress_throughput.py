"""Throughput of external producers through the ingress vs. the in-process API, same run.

Starts one backend (:class:`shardpool.service.Service`: pool + ingress + control) in this
process, then alternates, ``--repeats`` times: ``in-process`` (``pool.submit_bytes`` for every
message, then ``drain``), ``in-proc+done`` (the same with a per-message ``on_done`` callback) and
``ingress xK`` (K spawned producer processes sending their share through
:class:`shardpool.client.Client` and waiting for every reply). Reports msgs/s per path (median of
the repeats) and each path's ratio to the in-process figure. The measuring code is
:mod:`shardpool.bench.ingress_run` (which ``shardpool bench`` uses for its ceilings row too).

Usage: ``python3 scripts/ingress_throughput.py [--messages 200000] [--workers 2] [--producers 1,2]
[--repeats 3] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "shardpool" / "__init__.py").is_file():
    # Measure this checkout, whatever copy of shardpool is installed (spawned producers inherit
    # this path).
    sys.path.insert(0, str(_CHECKOUT))

from shardpool.bench.ingress_run import measure_ingress  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--messages", type=int, default=200_000, help="messages per round (default 200000)"
    )
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--producers", default="1,2", help="producer counts to measure (default 1,2)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds per path; the median is reported"
    )
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.producers.split(",") if x]

    def progress(line: str) -> None:
        if not args.json:
            print(line, file=sys.stderr, flush=True)

    report = measure_ingress(args.messages, workers=args.workers, producers=counts,
                             repeats=args.repeats, progress=progress)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.messages:,} Lightning messages per round, {args.workers} workers, "
          f"median of {args.repeats}")
    print(f"{'path':<14} {'msgs/s':>12} {'vs in-process':>14}")
    for name, p in report["paths"].items():
        print(f"{name:<14} {p['median_msgs_per_s']:>12,.0f} {p['ratio_to_in_process']:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
