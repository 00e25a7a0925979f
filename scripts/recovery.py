"""Recovery after SIGKILL, and what crash safety costs in throughput.

Runs a pool under a steady background load (a producer thread streaming pre-encoded messages over
2,000 channels), SIGKILLs worker 0 every ``--interval`` seconds, and measures for each kill:

* ``front``: the front's own figure, from noticing the death (process sentinel) to the successor's
  READY with the unacknowledged window re-sent;
* ``end_to_end``: from the kill to the result of a request made right after it on a channel of
  the killed worker (it waits behind the replayed messages: what a caller actually sees).

Then it measures closed-loop throughput of the same pool without kills and with a kill every
``--interval`` seconds, side by side in the same run, median of ``--repeats``.

Usage: ``python3 scripts/recovery.py [--kills 8] [--interval 1.0] [--workers 2] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from typing import Any

from shardpool import ShardPool
from shardpool.bench.stream import make_stream


def trivial(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """The handler: a value back, so a request has something to wait for."""
    return seq


def _kill_worker0(pool: ShardPool) -> None:
    pid = pool.worker_pids()[0]
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def measure_recovery(pool: ShardPool, kills: int, interval: float) -> dict[str, list[float]]:
    probe = next(bytes([i]) * 32 for i in range(256) if pool.worker_of(bytes([i]) * 32) == 0)
    stop = threading.Event()
    stream = make_stream(100_000, 2000)

    def load() -> None:
        while not stop.is_set():
            for i in range(0, len(stream), 1000):
                if stop.is_set():
                    return
                pool.submit_many_bytes(stream[i : i + 1000])

    producer = threading.Thread(target=load, daemon=True)
    producer.start()
    end_to_end = []
    try:
        for _ in range(kills):
            stop.wait(interval)  # pacing between kills, not synchronisation
            pool.drain(timeout=60)
            t0 = time.perf_counter()
            _kill_worker0(pool)
            pool.request(probe, {"probe": True}).result(timeout=60)
            end_to_end.append(time.perf_counter() - t0)
    finally:
        stop.set()
        producer.join(60)
    front = pool.stats()["workers"][0]["recovery_s"]
    return {"front": front, "end_to_end": end_to_end}


def _killer(pool: ShardPool, stop: threading.Event, interval: float) -> None:
    """Kill worker 0 every ``interval`` seconds until ``stop`` is set."""
    while not stop.wait(interval):
        _kill_worker0(pool)


def measure_cost(pool: ShardPool, repeats: int, interval: float) -> dict[str, Any]:
    stream = make_stream(300_000, 2000)
    calm, chaotic = [], []
    for _ in range(repeats):
        for bucket, kill in ((calm, False), (chaotic, True)):
            stop = threading.Event()
            k = threading.Thread(target=_killer, args=(pool, stop, interval), daemon=True)
            t0 = time.perf_counter()
            if kill:
                k.start()
            pool.submit_many_bytes(stream)
            pool.drain(timeout=120)
            bucket.append(len(stream) / (time.perf_counter() - t0))
            stop.set()
            if kill:
                k.join(10)
    return {
        "no_kills_msgs_per_s": statistics.median(calm),
        "with_kills_msgs_per_s": statistics.median(chaotic),
        "ratio": statistics.median(chaotic) / statistics.median(calm),
        "kill_interval_s": interval,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between kills")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with ShardPool(
        trivial, workers=args.workers, max_restarts=10_000, restart_backoff_s=0.0,
        restart_backoff_max_s=0.0, heartbeat_interval_s=0.2,
    ) as pool:
        rec = measure_recovery(pool, args.kills, args.interval)
        cost = measure_cost(pool, args.repeats, args.interval)
        restarts = pool.stats()["restarts"]
    report = {
        "workers": args.workers,
        "kills": args.kills,
        "restarts": restarts,
        "recovery_front_s": {
            "median": statistics.median(rec["front"]), "max": max(rec["front"]),
            "all": rec["front"],
        },
        "recovery_end_to_end_s": {
            "median": statistics.median(rec["end_to_end"]), "max": max(rec["end_to_end"]),
            "all": rec["end_to_end"],
        },
        "throughput": cost,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        f, e = report["recovery_front_s"], report["recovery_end_to_end_s"]
        print(f"kills: {args.kills} (restarts seen: {restarts}), workers: {args.workers}")
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
