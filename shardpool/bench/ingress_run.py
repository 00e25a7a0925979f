"""Throughput of external producers through the ingress vs. the in-process API, in the same run.

One backend (:class:`~shardpool.service.Service`: pool + ingress + control, in this process, see
:class:`IngressBackend`) serves every round; the paths measured on it:

* ``in-process`` (:func:`in_process_rate`): this process calls ``pool.submit_bytes`` for every
  message (the bytes fast path, fire and forget), then ``pool.drain()``;
* ``in-proc+done`` (:func:`in_process_replies_rate`): the same with a per-message ``on_done``
  callback (the correlation cost the ingress pays too, without the socket hop);
* ``ingress xK`` (:func:`ingress_rate`): K producer processes (spawned, running
  :func:`producer`) each send their share through :class:`shardpool.client.Client` over the
  ingress socket and wait for every reply.

Every round uses fresh seeded Lightning traffic (:func:`traffic`, fresh channels, so the default
state-machine handler accepts it) pre-encoded before the clock starts, so only submission and
processing are timed; a round ends when the pool has drained (in-process) or when the last
producer has every reply. :func:`measure_ingress` runs the rounds and builds the report that
``scripts/ingress_throughput.py`` prints; ``shardpool bench`` uses the same functions for its
ceilings row "ingress, 1 producer process".
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..demo.traffic import encode_stream

__all__ = [
    "IngressBackend",
    "in_process_rate",
    "in_process_replies_rate",
    "ingress_rate",
    "measure_ingress",
    "producer",
    "traffic",
]

PEERS = 50
"""Peers of every round's traffic (2,000 channel slots over them)."""

_GO = "go"
_READY = "ready"


def traffic(messages: int, seed: int) -> list[tuple[bytes, bytes]]:
    """``messages`` pre-encoded ``(channel_id, CBOR payload)`` Lightning pairs, seeded."""
    return encode_stream(PEERS, max(1, 2000 // PEERS), messages, seed)


# ------------------------------------------------------------------------------------ producer


def producer(endpoint: str, messages: int, seed: int, conn: Any, timeout: float) -> None:
    """Producer process: connect, build its traffic, say READY on ``conn``, wait for GO, send
    everything, collect every reply, send its figures (a dict: ``sent``, ``ok``, ``not_ok``,
    ``elapsed_s`` in seconds) on ``conn``. Returns without sending if GO does not come within
    ``timeout`` seconds. Raises what :class:`~shardpool.client.Client` raises (the process then
    exits non-zero, which its parent reports)."""
    from ..client import Client

    stream = traffic(messages, seed)
    with Client(endpoint, timeout=timeout) as client:
        conn.send(_READY)
        if not conn.poll(timeout) or conn.recv() != _GO:
            return
        t0 = time.perf_counter()
        for cid, payload in stream:
            client.send_bytes(cid, payload)
        ok = not_ok = 0
        for reply in client.results(timeout=timeout):
            if reply.ok:
                ok += 1
            else:
                not_ok += 1
        elapsed = time.perf_counter() - t0
    conn.send({"sent": len(stream), "ok": ok, "not_ok": not_ok, "elapsed_s": elapsed})


# ------------------------------------------------------------------------------------ backend


class IngressBackend:
    """A :class:`~shardpool.service.Service` with ``workers`` workers and its ingress and control
    on ipc:// endpoints in a private temporary directory; a context manager (stopped and the
    directory removed on exit). ``handler`` None keeps the config's default handler.

    Raises (on entering):
        what :meth:`Service.start <shardpool.service.Service.start>` raises.
    """

    def __init__(self, workers: int, handler: str | None = None) -> None:
        self.workers = workers
        self.handler = handler
        self._dir: str | None = None
        self._svc: Any = None

    def __enter__(self) -> IngressBackend:
        from ..config import config_from_dict
        from ..service import Service

        self._dir = tempfile.mkdtemp(prefix="sp-thr-")
        pool: dict[str, Any] = {"workers": self.workers}
        if self.handler is not None:
            pool["handler"] = self.handler
        cfg = config_from_dict({
            "pool": pool,
            "ingress": {"endpoint": f"ipc://{self._dir}/in"},
            "control": {"endpoint": f"ipc://{self._dir}/ctl"},
        })
        try:
            svc = Service(cfg, env={})
            svc.start()
        except BaseException:
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._svc = svc
        self.handler = cfg.pool.handler
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._svc is not None:
                self._svc.stop()
        finally:
            self._svc = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def pool(self) -> Any:
        """The backend's :class:`~shardpool.pool.ShardPool`."""
        return self._svc.pool

    @property
    def endpoint(self) -> str:
        """The ingress endpoint producers connect to."""
        return str(self._svc.ingress_endpoint)


# ------------------------------------------------------------------------------------ the paths


def in_process_rate(pool: Any, messages: int, seed: int, timeout: float = 300.0) -> float:
    """msgs/s of ``submit_bytes`` for every message of fresh traffic, then ``drain``.

    Raises:
        DrainTimeout: not drained within ``timeout`` seconds; what ``submit_bytes`` raises.
    """
    stream = traffic(messages, seed)
    submit = pool.submit_bytes
    t0 = time.perf_counter()
    for cid, payload in stream:
        submit(cid, payload)
    pool.drain(timeout)
    return messages / (time.perf_counter() - t0)


def in_process_replies_rate(pool: Any, messages: int, seed: int, timeout: float = 300.0) -> float:
    """:func:`in_process_rate` with a per-message ``on_done`` callback recording each outcome.

    Raises:
        RuntimeError: a message was lost or failed. DrainTimeout: as :func:`in_process_rate`.
    """
    stream = traffic(messages, seed)
    submit = pool.submit_bytes
    outcomes: list[Any] = []
    record = outcomes.append

    def done(value: Any, error: BaseException | None) -> None:
        record(error)

    t0 = time.perf_counter()
    for cid, payload in stream:
        submit(cid, payload, on_done=done)
    pool.drain(timeout)
    rate = messages / (time.perf_counter() - t0)
    if len(outcomes) != messages or any(outcomes):
        raise RuntimeError("in-process round lost or failed messages")
    return rate


def ingress_rate(
    endpoint: str, messages: int, producers: int, seed: int, timeout: float = 300.0
) -> float:
    """msgs/s of ``producers`` spawned producer processes sending ``messages // producers``
    messages each through the ingress at ``endpoint``, from GO to the last producer's last reply.

    Readiness is a handshake (each producer says READY on a pipe once connected and its traffic
    built); every wait has the deadline ``timeout`` (seconds, the whole round); every producer is
    reaped, also when this raises.

    Raises:
        ValueError: ``producers < 1`` or fewer messages than producers.
        TimeoutError: a producer did not say READY or report in time.
        RuntimeError: a producer exited early, or messages were lost or failed.
    """
    from .baselines import _reap

    if producers < 1 or messages < producers:
        raise ValueError(f"need producers >= 1 and messages >= producers, got {producers}, "
                         f"{messages}")
    share = messages // producers
    deadline = time.monotonic() + timeout
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    conns: list[Any] = []
    try:
        for k in range(producers):
            mine, theirs = ctx.Pipe()
            conns.append(mine)
            p = ctx.Process(target=producer,
                            args=(endpoint, share, seed * 100 + k, theirs, timeout),
                            name=f"shardpool-producer-{k}", daemon=True)
            p.start()
            procs.append(p)
            theirs.close()
        for conn, p in zip(conns, procs, strict=True):
            _expect(conn, p, deadline, lambda m: m == _READY, "READY")
        t0 = time.perf_counter()
        for conn in conns:
            conn.send(_GO)
        results = [_expect(conn, p, deadline, lambda m: isinstance(m, dict), "its figures")
                   for conn, p in zip(conns, procs, strict=True)]
        elapsed = time.perf_counter() - t0
    finally:
        _reap(procs, 5.0)
        for conn in conns:
            conn.close()
    bad = sum(r["not_ok"] for r in results)
    got = sum(r["ok"] for r in results)
    if bad or got != share * producers:
        raise RuntimeError(f"ingress round lost or failed messages: ok {got}, not ok {bad}")
    return share * producers / elapsed


def _expect(conn: Any, proc: Any, deadline: float, good: Callable[[Any], bool], what: str) -> Any:
    """The next message on ``conn`` from producer ``proc``, waited for until ``deadline``
    (``time.monotonic()`` seconds).

    Raises:
        TimeoutError: nothing came in time. RuntimeError: the producer exited first, or sent
            something else than ``what``.
    """
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"producer {proc.name} did not send {what} in time")
        ready = multiprocessing.connection.wait([conn, proc.sentinel], remaining)
        if conn in ready:
            try:
                msg = conn.recv()
            except EOFError:
                raise RuntimeError(f"producer {proc.name} exited before {what}") from None
            if not good(msg):
                raise RuntimeError(f"producer {proc.name} sent {msg!r} instead of {what}")
            return msg
        if proc.sentinel in ready:
            proc.join(1.0)
            raise RuntimeError(f"producer {proc.name} exited with code {proc.exitcode} "
                               f"before {what}")


# ------------------------------------------------------------------------------------ rounds


@contextlib.contextmanager
def _maybe(backend: IngressBackend | None, workers: int) -> Iterator[IngressBackend]:
    if backend is not None:
        yield backend
    else:
        with IngressBackend(workers) as started:
            yield started


def measure_ingress(
    messages: int,
    *,
    workers: int = 2,
    producers: Sequence[int] = (1, 2),
    repeats: int = 3,
    replies: bool = True,
    timeout: float = 300.0,
    backend: IngressBackend | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``repeats`` rounds of every path (in-process, with ``replies`` in-proc+done, then ingress
    with each producer count), each round on fresh traffic, on ``backend`` (or a backend with
    ``workers`` workers and the default handler, started here and stopped before returning).

    Returns the report: ``messages_per_round``, ``workers``, ``handler``, ``repeats`` and per
    path (``in-process``, ``in-proc+done``, ``ingress xK``) ``median_msgs_per_s``, ``runs`` and
    ``ratio_to_in_process`` (of the medians) and ``ratio_paired`` (median of the per-round
    ratios). ``progress`` gets one line per round.

    Raises:
        what :func:`in_process_rate`, :func:`in_process_replies_rate` and :func:`ingress_rate`
        raise, and what starting the backend raises.
    """
    from .report import median, paired

    rates: dict[str, list[float]] = {"in-process": []}
    if replies:
        rates["in-proc+done"] = []
    rates.update({f"ingress x{k}": [] for k in producers})
    with _maybe(backend, workers) as be:
        seed = 1
        for r in range(repeats):
            seed += 1
            rates["in-process"].append(in_process_rate(be.pool, messages, seed, timeout))
            if replies:
                seed += 1
                rates["in-proc+done"].append(
                    in_process_replies_rate(be.pool, messages, seed, timeout))
            for k in producers:
                seed += 1
                rates[f"ingress x{k}"].append(
                    ingress_rate(be.endpoint, messages, k, seed, timeout))
            if progress is not None:
                progress(f"ingress round {r + 1}/{repeats}: " + ", ".join(
                    f"{name} {v[-1]:,.0f}/s" for name, v in rates.items()))
        handler = be.handler
        n_workers = be.workers
    base = statistics.median(rates["in-process"])
    return {
        "messages_per_round": messages,
        "workers": n_workers,
        "handler": handler,
        "repeats": repeats,
        "paths": {
            name: {
                "median_msgs_per_s": round(median(v), 1),
                "runs": [round(x, 1) for x in v],
                "ratio_to_in_process": round(median(v) / base, 3),
                "ratio_paired": paired(v, rates["in-process"]),
            }
            for name, v in rates.items()
        },
    }
