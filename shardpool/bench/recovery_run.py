"""Recovery after SIGKILL, and what crash safety costs in throughput.

:func:`measure_recovery` runs a pool under a steady background load (a producer thread streaming
pre-encoded messages over 2,000 channels), SIGKILLs worker 0 every ``interval`` seconds, and
measures for each kill:

* ``front``: the front's own figure, from noticing the death (process sentinel) to the
  successor's READY with the unacknowledged window re-sent (seconds);
* ``end_to_end``: from the kill to the result of a request made right after it on a channel of
  the killed worker (it waits behind the replayed messages: what a caller actually sees;
  seconds).

:func:`measure_cost` measures closed-loop throughput of the same pool without kills and with a
kill every ``interval`` seconds, side by side, median of ``repeats``. :func:`recovery_report`
does both on a pool of its own (:func:`recovery_pool`) and returns the report that
``scripts/recovery.py`` prints; ``shardpool bench`` uses :func:`recovery_report` (without the
throughput part) for its ceilings row "recovery after SIGKILL".
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from typing import Any

from ..pool import ShardPool
from .stream import make_stream

__all__ = [
    "RECOVERY_HANDLER",
    "answer_seq",
    "measure_cost",
    "measure_recovery",
    "recovery_pool",
    "recovery_report",
]

RECOVERY_HANDLER = "shardpool.bench.recovery_run:answer_seq"
"""The handler of the recovery pools (by reference, so that spawned workers import it)."""


def answer_seq(channel: Any, seq: int, message: Any, redelivered: bool) -> Any:
    """The handler: returns ``seq``, so that a request has something to wait for."""
    return seq


def recovery_pool(workers: int) -> ShardPool:
    """A pool of ``workers`` workers running :data:`RECOVERY_HANDLER` that restarts a killed
    worker at once, as often as it takes (no back-off), with 0.2 s heartbeats.

    Raises:
        what :class:`~shardpool.pool.ShardPool` raises on start.
    """
    return ShardPool(
        RECOVERY_HANDLER, workers=workers, max_restarts=10_000, restart_backoff_s=0.0,
        restart_backoff_max_s=0.0, heartbeat_interval_s=0.2,
    )


def _kill_worker0(pool: ShardPool) -> None:
    pid = pool.worker_pids()[0]
    if pid is not None:
        os.kill(pid, signal.SIGKILL)


def measure_recovery(
    pool: ShardPool, kills: int, interval: float, *, load_messages: int = 100_000,
    load_rate: float | None = None, timeout: float = 60.0,
) -> dict[str, list[float]]:
    """``kills`` SIGKILLs of worker 0 under background load, ``interval`` seconds apart; the
    ``front`` and ``end_to_end`` recovery times of each (seconds, see the module docstring).

    The load cycles through ``load_messages`` pre-encoded messages: as fast as the pool takes
    them (``load_rate`` None, chunks of 1,000), or paced at ``load_rate`` msgs/s in bursts of
    1/200 s. Before each kill the pool is drained, which under a saturating load can take long
    on a busy machine (the drain waits for a moment with nothing in flight); a paced load below
    the pool's capacity leaves such moments every burst.

    Raises:
        TimeoutError: a drain or the probe request did not finish within ``timeout`` seconds.
        ShardPoolError subclasses: the pool broke.
    """
    probe = next(bytes([i]) * 32 for i in range(256) if pool.worker_of(bytes([i]) * 32) == 0)
    stop = threading.Event()
    stream = make_stream(load_messages, 2000)
    chunk = 1000 if load_rate is None else max(1, int(load_rate / 200))
    pause = None if load_rate is None else chunk / load_rate

    def load() -> None:
        due = time.perf_counter()
        while not stop.is_set():
            for i in range(0, len(stream), chunk):
                if stop.is_set():
                    return
                pool.submit_many_bytes(stream[i : i + chunk])
                if pause is not None:
                    due += pause
                    # pacing an open-loop load, not synchronisation
                    stop.wait(max(0.0, due - time.perf_counter()))

    producer = threading.Thread(target=load, name="recovery-load", daemon=True)
    producer.start()
    end_to_end = []
    try:
        for _ in range(kills):
            stop.wait(interval)  # pacing between kills, not synchronisation
            pool.drain(timeout=timeout)
            t0 = time.perf_counter()
            _kill_worker0(pool)
            pool.request(probe, {"probe": True}).result(timeout=timeout)
            end_to_end.append(time.perf_counter() - t0)
    finally:
        stop.set()
        producer.join(timeout)
    front = list(pool.stats()["workers"][0]["recovery_s"])
    return {"front": front, "end_to_end": end_to_end}


def _killer(pool: ShardPool, stop: threading.Event, interval: float) -> None:
    """Kill worker 0 every ``interval`` seconds until ``stop`` is set."""
    while not stop.wait(interval):
        _kill_worker0(pool)


def measure_cost(
    pool: ShardPool, repeats: int, interval: float, *, messages: int = 300_000,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Closed-loop msgs/s of ``messages`` through ``pool`` without kills and with worker 0
    killed every ``interval`` seconds, interleaved, median of ``repeats`` each, and their ratio.

    Raises:
        DrainTimeout: a run did not drain within ``timeout`` seconds.
    """
    stream = make_stream(messages, 2000)
    calm: list[float] = []
    chaotic: list[float] = []
    for _ in range(repeats):
        for bucket, kill in ((calm, False), (chaotic, True)):
            stop = threading.Event()
            k = threading.Thread(target=_killer, args=(pool, stop, interval), daemon=True)
            t0 = time.perf_counter()
            if kill:
                k.start()
            try:
                pool.submit_many_bytes(stream)
                pool.drain(timeout=timeout)
                bucket.append(len(stream) / (time.perf_counter() - t0))
            finally:
                stop.set()
                if kill:
                    k.join(10)
    return {
        "no_kills_msgs_per_s": statistics.median(calm),
        "with_kills_msgs_per_s": statistics.median(chaotic),
        "ratio": statistics.median(chaotic) / statistics.median(calm),
        "kill_interval_s": interval,
    }


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "max": max(values), "all": values}


def recovery_report(
    *, workers: int = 2, kills: int = 8, interval: float = 1.0, repeats: int = 3,
    cost: bool = True, load_messages: int = 100_000, load_rate: float | None = None,
    cost_messages: int = 300_000, timeout: float = 60.0,
) -> dict[str, Any]:
    """:func:`measure_recovery` (and with ``cost`` :func:`measure_cost`) on a fresh
    :func:`recovery_pool`, closed before returning (``load_messages`` and ``load_rate`` as
    :func:`measure_recovery`). The report: ``workers``, ``kills``, ``load_rate``,
    ``restarts`` (as the pool counted them), ``recovery_front_s`` and ``recovery_end_to_end_s``
    (``median``, ``max``, ``all``; seconds) and ``throughput`` (:func:`measure_cost`'s, or None).

    Raises:
        ValueError: ``kills < 1``. Otherwise what the measuring functions raise.
    """
    if kills < 1:
        raise ValueError(f"kills must be >= 1, got {kills}")
    with recovery_pool(workers) as pool:
        rec = measure_recovery(pool, kills, interval, load_messages=load_messages,
                               load_rate=load_rate, timeout=timeout)
        thr = (measure_cost(pool, repeats, interval, messages=cost_messages, timeout=timeout)
               if cost else None)
        restarts = pool.stats()["restarts"]
    return {
        "workers": workers,
        "kills": kills,
        "load_rate": load_rate,
        "restarts": restarts,
        "recovery_front_s": _spread(rec["front"]) if rec["front"] else None,
        "recovery_end_to_end_s": _spread(rec["end_to_end"]),
        "throughput": thr,
    }
