"""Throughput of external producers through the ingress vs. the in-process API, same run.

Starts one backend (:class:`shardpool.service.Service`: pool + ingress + control) in this
process, then alternates, ``--repeats`` times:

* ``in-process``: this process calls ``pool.submit_bytes`` for every message (the bytes fast
  path, fire and forget) and ``pool.drain()``;
* ``in-proc+done``: the same with a per-message ``on_done`` callback (the correlation cost the
  ingress pays too, without the socket hop);
* ``ingress xK``: K producer processes (this script with ``--producer``) each send their share
  through :class:`shardpool.client.Client` over the ingress socket and wait for every reply.

Every round uses fresh seeded Lightning traffic (``shardpool.demo.traffic.encode_stream``, fresh
channels) pre-encoded before the clock starts, so only submission and processing are timed; a
round ends when the pool has drained (in-process) or when the last producer has every reply.
Reports msgs/s per path (median of the repeats) and each path's ratio to the in-process figure.

Usage: ``python3 scripts/ingress_throughput.py [--messages 200000] [--workers 2] [--producers 1,2]
[--repeats 3] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# Measure this checkout, whatever copy of shardpool is installed.
sys.path.insert(0, str(REPO))

from shardpool.config import config_from_dict  # noqa: E402
from shardpool.demo.traffic import encode_stream  # noqa: E402

PEERS = 50


def _stream(messages: int, seed: int) -> list[tuple[bytes, bytes]]:
    return encode_stream(PEERS, max(1, 2000 // PEERS), messages, seed)


# ------------------------------------------------------------------------------------ producer


def producer_main(endpoint: str, messages: int, seed: int) -> None:
    """Producer process: connect, build its traffic, say ready, wait for "go", send everything,
    collect every reply, print a JSON line."""
    from shardpool.client import Client

    stream = _stream(messages, seed)
    with Client(endpoint, timeout=120.0) as client:
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return
        t0 = time.perf_counter()
        for cid, payload in stream:
            client.send_bytes(cid, payload)
        ok = not_ok = 0
        for reply in client.results(timeout=120.0):
            if reply.ok:
                ok += 1
            else:
                not_ok += 1
        elapsed = time.perf_counter() - t0
    print(
        json.dumps({"sent": len(stream), "ok": ok, "not_ok": not_ok, "elapsed_s": elapsed}),
        flush=True,
    )


# ------------------------------------------------------------------------------------ driver


def _in_process(svc: Any, messages: int, seed: int) -> float:
    stream = _stream(messages, seed)
    submit = svc.pool.submit_bytes
    t0 = time.perf_counter()
    for cid, payload in stream:
        submit(cid, payload)
    svc.pool.drain(300.0)
    return messages / (time.perf_counter() - t0)


def _in_process_replies(svc: Any, messages: int, seed: int) -> float:
    """In-process, but with a per-message ``on_done`` callback that records each outcome: the
    correlation work the ingress does too, without the socket hop and the producer process."""
    stream = _stream(messages, seed)
    submit = svc.pool.submit_bytes
    outcomes: list[Any] = []
    record = outcomes.append

    def done(value: Any, error: BaseException | None) -> None:
        record(error)

    t0 = time.perf_counter()
    for cid, payload in stream:
        submit(cid, payload, on_done=done)
    svc.pool.drain(300.0)
    rate = messages / (time.perf_counter() - t0)
    if len(outcomes) != messages or any(outcomes):
        raise RuntimeError("in-process round lost or failed messages")
    return rate


def _through_ingress(svc: Any, messages: int, producers: int, seed: int) -> float:
    share = messages // producers
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--producer",
                svc.ingress_endpoint,
                str(share),
                str(seed * 100 + k),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for k in range(producers)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"producer did not start: {line!r}")
        t0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            results.append(json.loads(out.strip().splitlines()[-1]))
        elapsed = time.perf_counter() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    bad = sum(r["not_ok"] for r in results)
    got = sum(r["ok"] for r in results)
    if bad or got != share * producers:
        raise RuntimeError(f"ingress round lost or failed messages: ok {got}, not ok {bad}")
    return share * producers / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--producer", nargs=3, metavar=("ENDPOINT", "MESSAGES", "SEED"), help=argparse.SUPPRESS
    )
    ap.add_argument(
        "--messages", type=int, default=200_000, help="messages per round (default 200000)"
    )
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--producers", default="1,2", help="producer counts to measure (default 1,2)")
    ap.add_argument(
        "--repeats", type=int, default=3, help="rounds per path; the median is reported"
    )
    ap.add_argument("--json", action="store_true", help="print JSON")
    args = ap.parse_args()
    if args.producer:
        producer_main(args.producer[0], int(args.producer[1]), int(args.producer[2]))
        return 0

    from shardpool.service import Service

    counts = [int(x) for x in args.producers.split(",") if x]
    with tempfile.TemporaryDirectory(prefix="sp-thr-") as d:
        cfg = config_from_dict(
            {
                "pool": {"workers": args.workers},
                "ingress": {"endpoint": f"ipc://{d}/in"},
                "control": {"endpoint": f"ipc://{d}/ctl"},
            }
        )
        svc = Service(cfg, env={})
        svc.start()
        rates: dict[str, list[float]] = {
            "in-process": [],
            "in-proc+done": [],
            **{f"ingress x{k}": [] for k in counts},
        }
        try:
            seed = 1
            for r in range(args.repeats):
                seed += 1
                rates["in-process"].append(_in_process(svc, args.messages, seed))
                seed += 1
                rates["in-proc+done"].append(_in_process_replies(svc, args.messages, seed))
                for k in counts:
                    seed += 1
                    rates[f"ingress x{k}"].append(_through_ingress(svc, args.messages, k, seed))
                if not args.json:
                    print(
                        f"round {r + 1}: "
                        + ", ".join(f"{name} {v[-1]:,.0f}/s" for name, v in rates.items()),
                        file=sys.stderr,
                    )
        finally:
            svc.stop()
    base = statistics.median(rates["in-process"])
    report = {
        "messages_per_round": args.messages,
        "workers": args.workers,
        "handler": cfg.pool.handler,
        "repeats": args.repeats,
        "paths": {
            name: {
                "median_msgs_per_s": statistics.median(v),
                "runs": v,
                "ratio_to_in_process": statistics.median(v) / base,
            }
            for name, v in rates.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"{args.messages:,} Lightning messages per round, {args.workers} workers, "
            f"median of {args.repeats}"
        )
        print(f"{'path':<14} {'msgs/s':>12} {'vs in-process':>14}")
        for name, p in report["paths"].items():
            print(f"{name:<14} {p['median_msgs_per_s']:>12,.0f} {p['ratio_to_in_process']:>13.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
