"""Recovery after SIGKILL, and what crash safety costs in throughput.

Runs a pool under a steady background load, SIGKILLs worker 0 every ``--interval`` seconds and
measures, per kill, the front's recovery time and the end-to-end time a caller sees; then the
closed-loop throughput without kills and with a kill every ``--interval`` seconds, side by side,
median of ``--repeats``. The measuring code is :mod:`shardpool.bench.recovery_run` (which
``shardpool bench`` uses for its ceilings row too); this script prints its report.

Usage: ``python3 scripts/recovery.py [--kills 8] [--interval 1.0] [--workers 2]
[--load-rate 50000] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
if (_CHECKOUT / "shardpool" / "__init__.py").is_file():
    # Measure this checkout, whatever copy of shardpool is installed.
    sys.path.insert(0, str(_CHECKOUT))

from shardpool.bench.ceilings import RECOVERY_LOAD_RATE  # noqa: E402
from shardpool.bench.recovery_run import recovery_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between kills")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load-rate", type=float, default=RECOVERY_LOAD_RATE,
                    help="msgs/s of the background load during the kills; 0: as fast as the "
                    "pool takes them (then the drain before each kill can take long, since "
                    "the load never stops)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report = recovery_report(workers=args.workers, kills=args.kills, interval=args.interval,
                             repeats=args.repeats, load_rate=args.load_rate or None)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    f, e, cost = report["recovery_front_s"], report["recovery_end_to_end_s"], report["throughput"]
    print(f"kills: {args.kills} (restarts seen: {report['restarts']}), workers: {args.workers}")
    if f:
        print(f"recovery, front (death noticed -> successor READY, window re-sent): "
              f"median {f['median'] * 1000:.0f} ms, max {f['max'] * 1000:.0f} ms")
    print(f"recovery, end to end (kill -> result of a request made right after): "
          f"median {e['median'] * 1000:.0f} ms, max {e['max'] * 1000:.0f} ms")
    print(f"throughput without kills {cost['no_kills_msgs_per_s']:,.0f} msgs/s, with a kill "
          f"every {args.interval} s {cost['with_kills_msgs_per_s']:,.0f} msgs/s "
          f"(ratio {cost['ratio']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
