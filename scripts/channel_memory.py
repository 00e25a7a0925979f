"""What per-channel records cost, and that ``pool.channel_idle_expiry_s`` releases them.

A node sees channels open and close for months. This streams ``--rounds`` rounds of
``--channels`` *new* channel ids each (one message per channel, stateless handler), waiting after
each round for the idle expiry, and reports per round: the records the front and the workers hold
and the resident memory (RSS, psutil) of the front process and of the workers, once with
``channel_idle_expiry_s = 0`` (never forget) and once with ``--expiry`` seconds, in the same run.

Without expiry records and memory grow with every round; with it they return to zero and memory
levels off (Python keeps freed memory for reuse, so RSS does not shrink, it stops growing).

Usage: ``python3 scripts/channel_memory.py [--channels 200000] [--rounds 3] [--workers 2]
[--expiry 1.0] [--json]``
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil

# Measure this checkout, whatever copy of shardpool is installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardpool import ShardPool  # noqa: E402


def stateless(channel: Any, seq: int, message: Any, redelivered: bool) -> None:
    """The handler: keeps nothing in ``channel.state``, so an idle channel may be forgotten."""
    return None


def _rss_mb(pids: list[int]) -> float:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 1e6


def _records(pool: ShardPool) -> tuple[int, int]:
    stats = pool.stats()
    return stats["channels"], sum(w["channels"] for w in stats["workers"])


def run(channels: int, rounds: int, workers: int, expiry: float) -> list[dict[str, Any]]:
    out = []
    payload = b"\xa0"  # an empty CBOR map
    with ShardPool(stateless, workers=workers, channel_idle_expiry_s=expiry) as pool:
        pids = [pid for pid in pool.worker_pids() if pid is not None]
        me = psutil.Process().pid
        for r in range(rounds):
            ids = [b"round%d-channel-%08d" % (r, c) for c in range(channels)]
            pool.submit_many_bytes((cid, payload) for cid in ids)
            pool.drain(timeout=600)
            del ids
            if expiry:
                # Idle channels go between 1x and 1.5x the expiry after their last message.
                deadline = time.monotonic() + 10 * expiry + 30
                while _records(pool) != (0, 0) and time.monotonic() < deadline:
                    # Waiting for the expiry timer to fire, not for readiness: polling is the point.
                    time.sleep(expiry / 4)
            gc.collect()
            front, held = _records(pool)
            out.append(
                {
                    "round": r + 1,
                    "channels_seen": channels * (r + 1),
                    "front_records": front,
                    "worker_records": held,
                    "front_rss_mb": round(_rss_mb([me]), 1),
                    "workers_rss_mb": round(_rss_mb(pids), 1),
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=200_000, help="new channels per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--expiry", type=float, default=1.0, help="channel_idle_expiry_s, seconds")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    result = {
        f"expiry {label}": run(args.channels, args.rounds, args.workers, expiry)
        for label, expiry in (("off", 0.0), (f"{args.expiry:g} s", args.expiry))
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for label, rows in result.items():
        print(f"channel_idle_expiry_s: {label}")
        print(f"  {'round':>5} {'seen':>9} {'front rec':>10} {'worker rec':>10} "
              f"{'front MB':>9} {'workers MB':>10}")
        for row in rows:
            print(
                f"  {row['round']:>5} {row['channels_seen']:>9} {row['front_records']:>10} "
                f"{row['worker_records']:>10} {row['front_rss_mb']:>9} {row['workers_rss_mb']:>10}"
            )


if __name__ == "__main__":
    main()
