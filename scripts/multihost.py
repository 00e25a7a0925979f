"""Throughput with workers on other hosts, against the same pool with every worker local.

The hosts are simulated on this machine with network namespaces (``tests/netns.py``: one
namespace per host, veth links to a bridge that holds the front's address, nothing routed
anywhere else; needs root). Each run, interleaved:

* ``local``: a pool of ``--workers`` local workers;
* ``remote``: ``--workers`` / 2 local workers and as many ``shardpool worker`` processes, one per
  namespace, over tcp with CURVE (keys pinned per worker), each with its share of the slots.

Both get the same traffic: ``--channels`` channels, ``--per-channel`` messages each, pre-encoded,
through ``submit_many_bytes``, then ``drain``. The handler is ``shardpool.bench.handlers:noop``
(the cost of moving messages, which is what remote workers add), or a CPU-costed one with
``--cpu-us``. Reported: msgs/s per run, medians, and the ratio of the medians (remote / local),
measured side by side on one machine: both sides share its cores, so the ratio says what the
tcp + CURVE link costs, not what more hosts would add.

Usage (root)::

    python3 scripts/multihost.py --runs 3 --json bench/results/multihost-2core.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from netns import Hosts  # noqa: E402

from shardpool import ShardPool  # noqa: E402
from shardpool.config import config_from_dict  # noqa: E402
from shardpool.security import generate_worker_keys  # noqa: E402

PORT = 5557


def _handler(args: argparse.Namespace) -> dict[str, Any]:
    if args.cpu_us:
        from shardpool.bench.handlers import calibrate_cost

        return {"handler": "shardpool.bench.handlers:CountingSpinHandler", "payload": "raw",
                "handler_options": {"cost_iters": calibrate_cost(args.cpu_us)}}
    return {"handler": "shardpool.bench.handlers:noop"}


def _traffic(args: argparse.Namespace) -> list[tuple[bytes, bytes]]:
    """Each channel's message number (1, 2, ...) as 8 bytes: raw for the CPU-costed handler
    (which checks their order), an opaque payload for noop."""
    return [
        (b"mh-%05d" % c, (i + 1).to_bytes(8, "big"))
        for i in range(args.per_channel)
        for c in range(args.channels)
    ]


def _measure(pool: ShardPool, traffic: list[tuple[bytes, bytes]]) -> float:
    t0 = time.perf_counter()
    pool.submit_many_bytes(traffic)
    pool.drain(300)
    return len(traffic) / (time.perf_counter() - t0)


def run_local(args: argparse.Namespace, traffic: list[tuple[bytes, bytes]]) -> float:
    cfg = config_from_dict({"pool": {"workers": args.workers, **args.handler}})
    with ShardPool(config=cfg) as pool:
        return _measure(pool, traffic)


def run_remote(
    args: argparse.Namespace, traffic: list[tuple[bytes, bytes]], keys: Path
) -> tuple[float, list[int]]:
    remote = args.workers // 2
    ids = [f"h{n}" for n in range(1, remote + 1)]
    with Hosts(remote) as hosts:
        endpoint = f"tcp://{hosts.front_addr}:{PORT}"
        cfg = config_from_dict({
            "pool": {"workers": args.workers - remote, "max_concurrent_moves": 1024,
                     **args.handler},
            "remote": {
                "bind": endpoint,
                "workers": dict.fromkeys(ids, 1.0),
                "curve_public_key": str(keys / "front.key"),
                "curve_secret_key": str(keys / "front.key_secret"),
                "workers_dir": str(keys / "workers"),
            },
        })
        with ShardPool(config=cfg) as pool:
            procs = [
                hosts.popen(n, [sys.executable, "-m", "shardpool", "worker", "--connect",
                                endpoint, "--id", wid, "--front-key", str(keys / "front.key"),
                                "--secret-key", str(keys / f"{wid}.key_secret"),
                                "--log-level", "WARNING"], cwd=REPO)
                for n, wid in enumerate(ids, 1)
            ]
            try:
                _await_share(pool, args.workers)
                rate = _measure(pool, traffic)
                processed = [w.get("processed", 0) for w in pool.stats()["workers"]]
            finally:
                for p in procs:
                    p.terminate()
                for p in procs:
                    try:
                        p.wait(10)
                    except subprocess.TimeoutExpired:
                        p.kill()
                        p.wait(5)
    return rate, processed


def _await_share(pool: ShardPool, workers: int, timeout: float = 60.0) -> None:
    """Until every remote worker is ready and owns its share of the slots."""
    deadline = time.monotonic() + timeout
    while True:
        place = pool.placement()
        remote = place["remote"]["workers"]
        per = place["slots_per_worker"]
        if (
            all(w["state"] == "ready" for w in remote.values())
            and not place["moves"]["in_progress"]
            and min(per) >= 4096 // workers - 1
        ):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"remote workers did not join within {timeout} s: {place}")
        time.sleep(0.05)  # polling with a deadline


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workers", type=int, default=4, help="in all (half remote); default 4")
    p.add_argument("--channels", type=int, default=1000)
    p.add_argument("--per-channel", type=int, default=200)
    p.add_argument("--cpu-us", type=float, default=0.0, help="handler CPU cost per message")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    args.handler = _handler(args)  # calibrated once: both sides run the same cost
    traffic = _traffic(args)
    local: list[float] = []
    remote: list[float] = []
    processed: list[list[int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        for n in range(1, args.workers // 2 + 1):
            generate_worker_keys(keys, f"h{n}")
        for run in range(args.runs):
            local.append(run_local(args, traffic))
            rate, per_worker = run_remote(args, traffic, keys)
            remote.append(rate)
            processed.append(per_worker)
            print(f"run {run + 1}: local {local[-1]:,.0f} msgs/s, remote {rate:,.0f} msgs/s "
                  f"({rate / local[-1]:.2f}); processed per worker {per_worker}", flush=True)
    med_l, med_r = statistics.median(local), statistics.median(remote)
    result = {
        "messages": len(traffic),
        "workers": args.workers,
        "remote_workers": args.workers // 2,
        "cpu_us": args.cpu_us,
        "handler": args.handler,
        "local_msgs_per_s": local,
        "remote_msgs_per_s": remote,
        "per_run_ratio": [r / ll for r, ll in zip(remote, local, strict=True)],
        "median_local": med_l,
        "median_remote": med_r,
        "ratio_of_medians": med_r / med_l,
        "processed_per_worker": processed,
    }
    print(f"median: local {med_l:,.0f}, remote {med_r:,.0f} msgs/s; "
          f"remote / local {med_r / med_l:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
