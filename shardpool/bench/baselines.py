"""The baselines shardpool's benchmarks are compared against, measured in the same run.

* :func:`run_one_pass` — the *ceiling*: the least a ZeroMQ + CBOR pool can do. The caller's process
  is the front (route with :class:`~shardpool.routing.Router`, batch per worker, one PUSH per worker
  over ipc://); each frame is a CBOR array header followed by the concatenated items, the
  pre-encoded messages inserted raw, and each worker decodes a whole frame with ONE
  ``cbor2.loads`` and calls a trivial handler per message. ``dicts=True`` is the ceiling of a
  front that encodes: it takes ``(channel_id, dict)`` pairs and ``cbor2.dumps`` each message in
  the front loop. No acknowledgements, no in-flight window, no recovery: what shardpool adds is
  measured against it.
* :func:`run_per_item` (also :func:`run_bare_zmq`, its original name) — the *per-item harness*:
  the same front, but each payload travels as a CBOR byte string and the worker decodes it with a
  ``cbor2.loads`` of its own (~1 µs a message more than the ceiling: a design choice, not the
  ceiling).
* :func:`run_mp_queue` — the *naive alternative*: one ``Queue`` per worker, one message per ``put``.
* :func:`run_ping_pong` — the *round-trip floor*: a bare PUSH→PULL→PUSH ping-pong with one
  spawned process over ipc://, p50/p99 in µs (what ``pool.call`` on an idle pool is compared to).

They start real worker processes with the spawn start method, wait for a READY handshake from every
worker before the clock starts, stop the clock when the last worker has reported how many messages
its handler saw, and always reap every process they started (join with a deadline, then terminate,
then kill), also when they raise.

Frame layouts (one CBOR array per ZeroMQ frame, *flat*, two items per message):

* one-pass: ``[cid0, msg0, cid1, msg1, ...]``, each ``cid`` ``cbor2.dumps(channel_id)`` (cached per
  channel), each ``msg`` the message's CBOR encoding itself — built as a hand-made array header
  plus ``b"".join`` of the items (no re-encoding of the payloads);
* per-item: ``cbor2.dumps`` of the flat list ``[cid0, payload0, ...]``, each payload a CBOR byte
  string holding the pre-encoded message. Measured on the 2-core development machine (200k
  messages, ~190 B payloads, 2 workers, front side only: route + batch + encode, best of 9, two
  runs on a shared machine): ``cbor2.dumps`` of the flat list 2.3-3.4 M msgs/s; hand-built
  array header + concatenated items 2.1-2.8 M msgs/s for the nested ``[[cid, payload], ...]`` form
  and 2.2-2.6 M msgs/s for the flat one; ``cbor2.dumps`` of the nested form 1.5-1.9 M msgs/s.

The workers are in :mod:`shardpool.bench.baseline_workers`; the stream of the manual check in
:mod:`shardpool.bench.stream`. Run ``python -m shardpool.bench.baselines`` for a manual check (every
baseline, 1 and 2 workers, and the ping-pong).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import multiprocessing
import os
import queue as queue_mod
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
import multiprocess
import zmq

from ..routing import Router
from .baseline_workers import (
    DONE,
    END,
    EXIT,
    READY,
    one_pass_worker,
    ping_pong_worker,
    queue_worker,
    zmq_worker,
)
from .runs import RunResult
from .stream import make_stream

__all__ = [
    "SLOTS",
    "BaselineResult",
    "RoundTripResult",
    "array_header",
    "main",
    "round_trip_result",
    "run_bare_zmq",
    "run_mp_queue",
    "run_one_pass",
    "run_per_item",
    "run_ping_pong",
]

SLOTS = 4096
"""Slot count used to route in both baselines (the pool's default)."""

_SEND_RETRY_MS = 200
"""How long one blocked send waits before the front re-checks its deadline and worker liveness."""
_REPORT_POLL_S = 0.05
"""Seconds a queue ``get`` blocks before worker liveness is re-checked (detection delay)."""
_EXIT_GRACE_S = 5.0
"""How long finished workers get to exit on their own before they are terminated."""
_TERM_GRACE_S = 2.0
"""How long a terminated (SIGTERM) worker gets before it is killed (SIGKILL)."""


BaselineResult = RunResult
"""Outcome of one baseline run: ``elapsed_s`` (seconds) runs from the front's first routed message
to the last worker's done report; ``per_worker[i]`` is how many messages the handler of worker
``i`` was called with."""


# --------------------------------------------------------------------------------------------
# front side helpers


def _check_common(workers: int, timeout: float) -> None:
    """Raises ValueError for a worker count below 1 or a non-positive/non-finite timeout."""
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an int >= 1, got {workers!r}")
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")


def _raise_if_dead(procs: Sequence[Any], reported: set[int] | dict[int, Any], what: str) -> None:
    """Raises RuntimeError if a worker that has not reported ``what`` yet has exited."""
    for i, p in enumerate(procs):
        if i not in reported and not p.is_alive():
            raise RuntimeError(
                f"baseline worker {i} (pid {p.pid}) exited with code {p.exitcode} before {what}"
            )


def _reap(procs: Sequence[Any], grace_s: float) -> None:
    """Join every process within ``grace_s`` seconds, then terminate, then kill what is left.

    Never raises for a process that will not die; after SIGKILL + join it is gone.
    """
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    end = time.monotonic() + _TERM_GRACE_S
    for p in alive:
        p.join(max(0.0, end - time.monotonic()))
    for p in alive:
        if p.is_alive():
            p.kill()
            p.join(_TERM_GRACE_S)
    for p in procs:
        # close() releases the sentinel fd now rather than at garbage collection; ValueError:
        # still running after SIGKILL + join, nothing more can be done here.
        with contextlib.suppress(ValueError):
            p.close()


def _await_zmq_reports(
    sock: zmq.Socket[bytes], procs: Sequence[Any], kind: str, deadline: float
) -> tuple[dict[int, list[Any]], float]:
    """Wait for one ``kind`` report from every worker on ``sock``.

    Returns the reports by worker index and the ``perf_counter()`` time the last one arrived.

    Raises:
        TimeoutError: ``deadline`` (``time.monotonic()`` seconds) passed first.
        RuntimeError: a worker exited before sending its report.
    """
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    # Process sentinels become readable when the process ends: a dead worker wakes us at once.
    by_fd = {p.sentinel: i for i, p in enumerate(procs)}
    for fd in by_fd:
        poller.register(fd, zmq.POLLIN)
    got: dict[int, list[Any]] = {}
    last = time.perf_counter()
    while len(got) < len(procs):
        remaining = _time_left(deadline, got, len(procs), kind)
        events = dict(poller.poll(max(1, int(remaining * 1000))))
        if sock in events:
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                report = cbor2.loads(frame)
                if report[0] == kind:
                    got[report[1]] = report
                    last = time.perf_counter()
        for fd, i in list(by_fd.items()):
            if fd in events:
                if i not in got:
                    # Its sentinel fired, so it is ending even if waitpid() cannot tell yet.
                    p = procs[i]
                    p.join(1.0)
                    raise RuntimeError(
                        f"baseline worker {i} (pid {p.pid}) exited with code {p.exitcode} "
                        f"before {kind!r}"
                    )
                # a worker that reported and then exited is no failure; stop polling its sentinel
                poller.unregister(fd)
                del by_fd[fd]
    return got, last


def _time_left(deadline: float, got: Collection[int], workers: int, kind: str) -> float:
    """Seconds left until ``deadline`` (``time.monotonic()`` seconds).

    Raises:
        TimeoutError: none left; names the workers not in ``got`` (their ``kind`` report missing).
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        missing = sorted(set(range(workers)) - set(got))
        raise TimeoutError(f"baseline workers {missing} did not report {kind!r} in time")
    return remaining


def _send_blocked(
    sock: zmq.Socket[bytes], frame: bytes, procs: Sequence[Any], deadline: float
) -> None:
    """Retry a send that hit the high-water mark until it goes through.

    Raises:
        TimeoutError: ``deadline`` passed first.
        RuntimeError: a worker died (a dead worker never drains its pipe).
    """
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("zmq harness: a worker stopped draining its pipe in time")
        _raise_if_dead(procs, set(), "the end of the stream")
        try:
            sock.send(frame)
            return
        except zmq.Again:
            continue


# --------------------------------------------------------------------------------------------
# the baselines


Forward = Callable[
    [Sequence[tuple[bytes, Any]], Router, list["zmq.Socket[bytes]"], int, Sequence[Any], float],
    None,
]
"""A harness front: ``(stream, router, pushes, batch_size, procs, deadline)``; sends every
message's frame and then END on every push socket."""


def run_one_pass(
    stream: Sequence[tuple[bytes, Any]],
    workers: int,
    *,
    batch_size: int = 256,
    timeout: float = 120.0,
    dicts: bool = False,
) -> BaselineResult:
    """The ceiling harness: route, batch and forward messages over ZeroMQ ipc://, each frame
    decoded by its worker in one pass.

    ``stream`` holds ``(channel_id, cbor_payload)`` pairs (``dicts=False``: the payloads go into
    the frame as they are) or ``(channel_id, message)`` pairs (``dicts=True``: the front
    ``cbor2.dumps`` each message, in the loop, as a front fed Python objects must). Each pair is
    routed with ``Router(SLOTS, workers)`` and appended to its worker's batch as two CBOR items,
    the encoded channel id and the message; a full batch (``batch_size`` messages) goes out as ONE
    frame (array header + the items, see the module docstring), then a partial batch and an end
    marker per worker. Workers (spawned ``multiprocess`` processes, each with its own ZeroMQ
    context) bind a PULL on an endpoint in a private temporary directory, ``cbor2.loads`` each
    frame once, call a counting handler per message, and report their count on a PUSH to the
    front's PULL. The result is named ``one_pass`` (``one_pass_dicts`` with ``dicts``).

    Clock, deadline and cleanup as :func:`run_per_item`.

    Raises:
        ValueError: ``workers < 1``, ``batch_size < 1`` or a non-positive ``timeout``.
        TimeoutError: the run (start-up, READY, streaming, done reports) did not finish in
            ``timeout`` seconds.
        RuntimeError: a worker exited before it reported (e.g. a payload that is not CBOR).
        cbor2.CBOREncodeError: with ``dicts``, a message cannot be encoded.
    """
    name = "one_pass_dicts" if dicts else "one_pass"
    forward = _forward_one_pass_dicts if dicts else _forward_one_pass
    return _run_zmq_harness(name, stream, workers, batch_size, timeout, one_pass_worker, forward)


def run_per_item(
    stream: Sequence[tuple[bytes, bytes]],
    workers: int,
    *,
    batch_size: int = 256,
    timeout: float = 120.0,
) -> BaselineResult:
    """The per-item harness: route, batch and forward pre-encoded payloads over ZeroMQ ipc://,
    each payload decoded separately by its worker.

    The caller's process is the front. ``stream`` holds ``(channel_id, cbor_payload)`` pairs; each
    is routed with ``Router(SLOTS, workers)`` and appended to its worker's batch; a full batch
    (``batch_size`` messages) goes out as ONE frame (``cbor2.dumps`` of the flat list, each
    payload a CBOR byte string, see the module docstring), then a partial batch and an end marker
    per worker. Workers (spawned ``multiprocess`` processes, each with its own ZeroMQ context)
    bind a PULL on an endpoint in a private temporary directory, decode each frame and then each
    payload, call a counting handler, and report their count on a PUSH to the front's PULL. The
    result is named ``bare_zmq`` (the name it has always had in reports).

    The clock (``elapsed_s``, seconds) starts after every worker has sent READY, just before the
    first message is routed, and stops when the last worker's done report arrives. ``timeout``
    (seconds) bounds the whole run, worker start-up included. Every socket is closed with
    linger=0, every worker reaped and the temporary directory removed, also when this raises.

    Raises:
        ValueError: ``workers < 1``, ``batch_size < 1`` or a non-positive ``timeout``.
        TimeoutError: the run (start-up, READY, streaming, done reports) did not finish in time.
        RuntimeError: a worker exited before it reported (e.g. a payload that is not CBOR).
    """
    return _run_zmq_harness("bare_zmq", stream, workers, batch_size, timeout, zmq_worker,
                            _forward)


run_bare_zmq = run_per_item
"""The per-item harness under its original name (it was called "the ceiling" before the one-pass
harness existed); see :func:`run_per_item`."""


def _run_zmq_harness(
    name: str,
    stream: Sequence[tuple[bytes, Any]],
    workers: int,
    batch_size: int,
    timeout: float,
    worker: Callable[[int, str, str, int], None],
    forward: Forward,
) -> BaselineResult:
    """Start ``workers`` processes of ``worker``, wait for READY, time ``forward`` and the done
    reports, tell EXIT, reap; see :func:`run_per_item` for the clock, deadline and errors."""
    _check_common(workers, timeout)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    deadline = time.monotonic() + timeout
    router = Router(SLOTS, workers)
    spawn = multiprocess.get_context("spawn")
    rundir = tempfile.mkdtemp(prefix="shardpool-bare-")
    ctx = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []
    procs: list[Any] = []
    finished = False
    try:
        report = ctx.socket(zmq.PULL)
        sockets.append(report)
        report_ep = f"ipc://{rundir}/report"
        report.bind(report_ep)
        data_eps = [f"ipc://{rundir}/w{i}" for i in range(workers)]
        argsets = [(i, ep, report_ep, os.getpid()) for i, ep in enumerate(data_eps)]
        _spawn(spawn, worker, argsets, f"shardpool-{name.replace('_', '-')}", procs)
        _await_zmq_reports(report, procs, READY, deadline)
        pushes: list[zmq.Socket[bytes]] = []
        for ep in data_eps:
            s = ctx.socket(zmq.PUSH)
            sockets.append(s)
            # bounded blocking so a stalled or dead worker turns into an error, not a hang
            s.sndtimeo = _SEND_RETRY_MS
            s.connect(ep)
            pushes.append(s)
        t0 = time.perf_counter()
        forward(stream, router, pushes, batch_size, procs, deadline)
        dones, t1 = _await_zmq_reports(report, procs, DONE, deadline)
        finished = True
    finally:
        if finished:
            for s in sockets[1:]:
                # A worker that does not get it is terminated by _reap instead.
                with contextlib.suppress(zmq.ZMQError):
                    s.send(EXIT, zmq.NOBLOCK)
        # sockets stay open while workers exit so that EXIT reaches them; linger=0 afterwards
        _reap(procs, _EXIT_GRACE_S if finished else 0.0)
        for s in sockets:
            s.close(linger=0)
        ctx.term()
        shutil.rmtree(rundir, ignore_errors=True)

    return _result(name, workers, len(stream), t1 - t0, dones)


def array_header(items: int) -> bytes:
    """The CBOR head of a definite-length array of ``items`` items (major type 4).

    Raises:
        ValueError: ``items`` is negative or does not fit in 64 bits.
    """
    if items < 0 or items >= 1 << 64:
        raise ValueError(f"a CBOR array holds 0 to 2**64-1 items, got {items}")
    if items < 24:
        return bytes([0x80 | items])
    if items < 1 << 8:
        return b"\x98" + items.to_bytes(1, "big")
    if items < 1 << 16:
        return b"\x99" + items.to_bytes(2, "big")
    if items < 1 << 32:
        return b"\x9a" + items.to_bytes(4, "big")
    return b"\x9b" + items.to_bytes(8, "big")


def _send_frame(
    push: zmq.Socket[bytes], frame: bytes, procs: Sequence[Any], deadline: float
) -> None:
    """Send ``frame``, waiting (within ``deadline``) while the pipe is full.

    Raises:
        TimeoutError / RuntimeError: as :func:`_send_blocked`.
    """
    try:
        push.send(frame)
    except zmq.Again:
        _send_blocked(push, frame, procs, deadline)


def _flush_one_pass(
    bufs: list[list[bytes]], pushes: list[zmq.Socket[bytes]], procs: Sequence[Any],
    deadline: float,
) -> None:
    """Send each worker's partial batch (if any) and then END."""
    for w, buf in enumerate(bufs):
        if buf:
            _send_frame(pushes[w], array_header(len(buf)) + b"".join(buf), procs, deadline)
        _send_frame(pushes[w], END, procs, deadline)


def _forward_one_pass(
    stream: Sequence[tuple[bytes, Any]],
    router: Router,
    pushes: list[zmq.Socket[bytes]],
    batch_size: int,
    procs: Sequence[Any],
    deadline: float,
) -> None:
    """The one-pass front for pre-encoded payloads: route, append the cached encoded channel id
    and the payload as they are, send every full batch as array header + ``b"".join``, then the
    partial batches and END.

    Raises:
        TimeoutError: ``deadline`` (``time.monotonic()`` seconds) passed first.
        RuntimeError: a worker died while its pipe was full.
    """
    sends = [s.send for s in pushes]
    bufs: list[list[bytes]] = [[] for _ in pushes]
    limit = 2 * batch_size
    head = array_header(limit)
    join = b"".join
    worker_of = router.worker_of
    dumps = cbor2.dumps
    cids: dict[bytes, bytes] = {}
    monotonic = time.monotonic
    for cid, payload in stream:
        w = worker_of(cid)
        item = cids.get(cid)
        if item is None:
            item = cids[cid] = dumps(cid)
        buf = bufs[w]
        buf += (item, payload)
        if len(buf) >= limit:
            frame = head + join(buf)
            buf.clear()
            try:
                sends[w](frame)
            except zmq.Again:
                _send_blocked(pushes[w], frame, procs, deadline)
            if monotonic() > deadline:
                raise TimeoutError("one-pass harness: the stream was not sent before the deadline")
    _flush_one_pass(bufs, pushes, procs, deadline)


def _forward_one_pass_dicts(
    stream: Sequence[tuple[bytes, Any]],
    router: Router,
    pushes: list[zmq.Socket[bytes]],
    batch_size: int,
    procs: Sequence[Any],
    deadline: float,
) -> None:
    """:func:`_forward_one_pass` for Python messages: each is ``cbor2.dumps``-ed in the loop.

    Raises:
        TimeoutError / RuntimeError: as :func:`_forward_one_pass`.
        cbor2.CBOREncodeError: a message cannot be encoded.
    """
    sends = [s.send for s in pushes]
    bufs: list[list[bytes]] = [[] for _ in pushes]
    limit = 2 * batch_size
    head = array_header(limit)
    join = b"".join
    worker_of = router.worker_of
    dumps = cbor2.dumps
    cids: dict[bytes, bytes] = {}
    monotonic = time.monotonic
    for cid, message in stream:
        w = worker_of(cid)
        item = cids.get(cid)
        if item is None:
            item = cids[cid] = dumps(cid)
        buf = bufs[w]
        buf += (item, dumps(message))
        if len(buf) >= limit:
            frame = head + join(buf)
            buf.clear()
            try:
                sends[w](frame)
            except zmq.Again:
                _send_blocked(pushes[w], frame, procs, deadline)
            if monotonic() > deadline:
                raise TimeoutError("one-pass harness: the stream was not sent before the deadline")
    _flush_one_pass(bufs, pushes, procs, deadline)


@dataclass(frozen=True, slots=True)
class RoundTripResult:
    """Round-trip latencies of ``rounds`` sequential request/reply exchanges (warm-up excluded):
    ``p50_us``, ``p99_us`` and ``max_us`` in microseconds (nearest-rank percentiles)."""

    name: str
    rounds: int
    p50_us: float
    p99_us: float
    max_us: float


def round_trip_result(name: str, samples_ns: Sequence[int]) -> RoundTripResult:
    """The :class:`RoundTripResult` of round-trip samples given in nanoseconds.

    Raises:
        ValueError: no samples.
    """
    if not samples_ns:
        raise ValueError("no round-trip samples")
    ordered = sorted(samples_ns)
    n = len(ordered)

    def pct(q: float) -> float:
        return round(ordered[max(1, math.ceil(q * n)) - 1] / 1000.0, 1)

    return RoundTripResult(name, n, pct(0.5), pct(0.99), round(ordered[-1] / 1000.0, 1))


def run_ping_pong(
    rounds: int = 1000, timeout: float = 30.0, *, warmup: int = 50
) -> RoundTripResult:
    """The round-trip floor: a bare PUSH→PULL→PUSH ping-pong with one spawned process, ipc://.

    The caller binds a PULL for the replies in a private temporary directory and spawns a
    ``multiprocess`` process (its own ZeroMQ context) that binds a PULL for the pings and
    connects a PUSH back, then says READY. Each round encodes a small CBOR map, sends it, waits
    for the peer's CBOR reply (it decodes the ping and encodes ``[seq, None]``) and decodes it;
    the time of each round after ``warmup`` rounds is a sample. Result named ``ping_pong``.

    ``timeout`` (seconds) bounds the whole run, start-up included. Every socket is closed with
    linger=0, the process reaped and the directory removed, also when this raises.

    Raises:
        ValueError: ``rounds < 1``, ``warmup < 0`` or a non-positive ``timeout``.
        TimeoutError: the run did not finish in time.
        RuntimeError: the peer exited early or answered out of turn.
    """
    _check_common(1, timeout)
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    deadline = time.monotonic() + timeout
    spawn = multiprocess.get_context("spawn")
    rundir = tempfile.mkdtemp(prefix="shardpool-ping-")
    ctx = zmq.Context()
    sockets: list[zmq.Socket[bytes]] = []
    procs: list[Any] = []
    finished = False
    try:
        back = ctx.socket(zmq.PULL)
        sockets.append(back)
        back_ep, ping_ep = f"ipc://{rundir}/back", f"ipc://{rundir}/ping"
        back.bind(back_ep)
        _spawn(spawn, ping_pong_worker, [(ping_ep, back_ep, os.getpid())],
               "shardpool-ping-pong", procs)
        _await_zmq_reports(back, procs, READY, deadline)
        ping = ctx.socket(zmq.PUSH)
        sockets.append(ping)
        ping.sndtimeo = _SEND_RETRY_MS
        back.rcvtimeo = _SEND_RETRY_MS
        ping.connect(ping_ep)
        samples = _ping_rounds(ping, back, procs, warmup + rounds, warmup, deadline)
        _send_frame(ping, END, procs, deadline)
        _await_zmq_reports(back, procs, DONE, deadline)
        finished = True
    finally:
        if finished:
            with contextlib.suppress(zmq.ZMQError):
                sockets[1].send(EXIT, zmq.NOBLOCK)
        _reap(procs, _EXIT_GRACE_S if finished else 0.0)
        for s in sockets:
            s.close(linger=0)
        ctx.term()
        shutil.rmtree(rundir, ignore_errors=True)
    return round_trip_result("ping_pong", samples)


def _ping_rounds(
    ping: zmq.Socket[bytes], back: zmq.Socket[bytes], procs: Sequence[Any], total: int,
    warmup: int, deadline: float,
) -> list[int]:
    """``total`` ping-pong rounds; the round-trip times (ns) of those after the first ``warmup``.

    Raises:
        TimeoutError: ``deadline`` passed. RuntimeError: the peer died or answered out of turn.
    """
    dumps, loads, clock = cbor2.dumps, cbor2.loads, time.perf_counter_ns
    samples: list[int] = []
    for k in range(total):
        t0 = clock()
        _send_frame(ping, dumps({"type": "ping", "seq": k}), procs, deadline)
        while True:
            try:
                reply = back.recv()
                break
            except zmq.Again:
                if time.monotonic() > deadline:
                    raise TimeoutError("ping-pong: no reply before the deadline") from None
                _raise_if_dead(procs, set(), "its reply")
        seq = loads(reply)[0]
        t1 = clock()
        if seq != k:
            raise RuntimeError(f"ping-pong: reply {seq!r} to ping {k}")
        if k >= warmup:
            samples.append(t1 - t0)
    return samples


def _spawn(
    ctx: Any, target: Callable[..., None], argsets: list[tuple[Any, ...]], name: str,
    procs: list[Any],
) -> None:
    """Start one daemon process of ``target`` per argument tuple, named ``name-i``; each is
    appended to ``procs`` as soon as it is started, so that the caller reaps it whatever
    happens next."""
    for i, args in enumerate(argsets):
        p = ctx.Process(target=target, args=args, name=f"{name}-{i}", daemon=True)
        p.start()
        procs.append(p)


def _forward(
    stream: Sequence[tuple[bytes, Any]],
    router: Router,
    pushes: list[zmq.Socket[bytes]],
    batch_size: int,
    procs: Sequence[Any],
    deadline: float,
) -> None:
    """The per-item front: route each message, batch per worker, send every full batch as one frame
    (``cbor2.dumps`` of the flat list), then each partial batch and the end marker.

    Raises:
        TimeoutError: ``deadline`` (``time.monotonic()`` seconds) passed first.
        RuntimeError: a worker died while its pipe was full.
    """
    sends = [s.send for s in pushes]
    bufs: list[list[bytes]] = [[] for _ in pushes]
    limit = 2 * batch_size  # the flat list holds two items per message
    worker_of = router.worker_of
    dumps = cbor2.dumps
    monotonic = time.monotonic
    for cid, payload in stream:
        w = worker_of(cid)
        buf = bufs[w]
        buf += (cid, payload)
        if len(buf) >= limit:
            frame = dumps(buf)
            buf.clear()
            try:
                sends[w](frame)
            except zmq.Again:
                _send_blocked(pushes[w], frame, procs, deadline)
            if monotonic() > deadline:
                raise TimeoutError("per-item harness: the stream was not sent before the deadline")
    for w, buf in enumerate(bufs):
        for frame in ([dumps(buf)] if buf else []) + [END]:
            _send_frame(pushes[w], frame, procs, deadline)


def _result(
    name: str, workers: int, n: int, elapsed: float, dones: Any
) -> BaselineResult:
    """The result of a run from the workers' done reports (``dones[i][2]``: messages handled)."""
    return BaselineResult(name, workers, n, elapsed, [int(dones[i][2]) for i in range(workers)])


def run_mp_queue(
    stream: Sequence[tuple[bytes, bytes]],
    workers: int,
    *,
    timeout: float = 120.0,
    queue_impl: Literal["multiprocessing", "multiprocess"] = "multiprocessing",
) -> BaselineResult:
    """The naive alternative: one ``Queue`` per worker, one ``(channel_id, payload)`` per ``put``.

    Routing, readiness handshake, clock and reaping are as in :func:`run_per_item`; workers
    ``cbor2.loads`` each payload and call the same counting handler.

    ``queue_impl`` picks the library. The default is the standard library's ``multiprocessing``:
    what a user writing the naive version reaches for, and the faster of the two, so ratios against
    it are not flattered. ``"multiprocess"`` pickles through dill's pure-Python pickler (measured
    ~9 µs per put vs ~2 µs, ~3 µs per get vs ~0.25 µs) and is several times slower; its result is
    named ``mp_queue_dill``.

    Raises:
        ValueError: ``workers < 1``, a non-positive ``timeout`` or an unknown ``queue_impl``.
        TimeoutError: the run (start-up, READY, streaming, done reports) did not finish in
            ``timeout`` seconds.
        RuntimeError: a worker exited before it reported (e.g. a payload that is not CBOR).
    """
    _check_common(workers, timeout)
    if queue_impl == "multiprocessing":
        spawn: Any = multiprocessing.get_context("spawn")
        name = "mp_queue"
    elif queue_impl == "multiprocess":
        spawn = multiprocess.get_context("spawn")
        name = "mp_queue_dill"
    else:
        raise ValueError(
            f"queue_impl must be 'multiprocessing' or 'multiprocess', got {queue_impl!r}"
        )
    deadline = time.monotonic() + timeout
    router = Router(SLOTS, workers)
    inboxes: list[Any] = []
    reports: Any = None
    procs: list[Any] = []
    finished = False
    try:
        reports = spawn.Queue()
        for _ in range(workers):
            q = spawn.Queue()
            # After a worker is killed, the feeder thread's writes fail with EPIPE; stay quiet
            # about it, as concurrent.futures does for its call queue.
            q._ignore_epipe = True
            inboxes.append(q)
        _spawn(spawn, queue_worker, [(i, q, reports, os.getpid()) for i, q in enumerate(inboxes)],
               "shardpool-mp-queue", procs)
        _await_queue_reports(reports, procs, READY, deadline)

        puts = [q.put for q in inboxes]
        worker_of = router.worker_of
        monotonic = time.monotonic
        t0 = time.perf_counter()
        for k, item in enumerate(stream):
            puts[worker_of(item[0])](item)
            # put never blocks (unbounded queue); check the deadline now and then, not per message
            if not k & 4095 and monotonic() > deadline:
                raise TimeoutError("mp_queue: the stream was not sent before the deadline")
        for put in puts:
            put(None)
        dones, t1 = _await_queue_reports(reports, procs, DONE, deadline)
        finished = True
    finally:
        _reap(procs, _EXIT_GRACE_S if finished else 0.0)
        for q in inboxes:
            if finished:
                q.close()
                q.join_thread()  # everything was consumed, so the feeder ends at once
            else:
                # Nobody reads any more: close our read end so a feeder blocked on a full pipe
                # gets EPIPE and ends, instead of hanging on (and hanging interpreter exit).
                q.cancel_join_thread()
                q._reader.close()
                q.close()
        if reports is not None:
            reports.close()

    return _result(name, workers, len(stream), t1 - t0, dones)


def _await_queue_reports(
    reports: Any, procs: Sequence[Any], kind: str, deadline: float
) -> tuple[dict[int, tuple[Any, ...]], float]:
    """Wait for one ``kind`` report from every worker on the ``reports`` queue.

    Returns the reports by worker index and the ``perf_counter()`` time the last one arrived.

    Raises:
        TimeoutError: ``deadline`` (``time.monotonic()`` seconds) passed first.
        RuntimeError: a worker exited with a non-zero code before sending its report.
    """
    got: dict[int, tuple[Any, ...]] = {}
    last = time.perf_counter()
    while len(got) < len(procs):
        remaining = _time_left(deadline, got, len(procs), kind)
        try:
            report = reports.get(timeout=min(_REPORT_POLL_S, remaining))
        except queue_mod.Empty:
            # A worker that exited 0 has flushed its report into the pipe: keep reading. Any
            # other exit before reporting is a failure.
            for i, p in enumerate(procs):
                if i not in got and p.exitcode not in (None, 0):
                    raise RuntimeError(
                        f"baseline worker {i} (pid {p.pid}) exited with code {p.exitcode} "
                        f"before {kind!r}"
                    ) from None
            continue
        if report[0] == kind:
            got[report[1]] = report
            last = time.perf_counter()
    return got, last


# --------------------------------------------------------------------------------------------
# manual check


def main(argv: Sequence[str] | None = None) -> int:
    """Print every baseline (and the dill-pickling queue) for each worker count, then the
    ping-pong round trip; returns 0."""
    parser = argparse.ArgumentParser(
        prog="python -m shardpool.bench.baselines", description="Run shardpool's baselines once."
    )
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--channels", type=int, default=1_000)
    parser.add_argument("--payload-size", type=int, default=190, help="bytes per payload")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    # Run through the importable module even under ``-m``: spawn must find the worker functions
    # by reference, and dill would otherwise pickle ``__main__`` functions by value.
    mod = importlib.import_module("shardpool.bench.baselines")
    stream = make_stream(args.messages, args.channels, payload_size=args.payload_size)
    decoded = [(cid, cbor2.loads(p)) for cid, p in stream]
    size = sum(len(p) for _, p in stream) / max(1, len(stream))
    print(
        f"{len(stream)} messages over {args.channels} channels, payload {size:.0f} B avg, "
        f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
    )
    print(f"{'baseline':<16} {'workers':>7} {'msgs/s':>12} {'elapsed s':>10}  per worker")
    for w in args.workers:
        runs = [
            mod.run_one_pass(stream, w, batch_size=args.batch_size),
            mod.run_one_pass(decoded, w, batch_size=args.batch_size, dicts=True),
            mod.run_per_item(stream, w, batch_size=args.batch_size),
            mod.run_mp_queue(stream, w),
            mod.run_mp_queue(stream, w, queue_impl="multiprocess"),
        ]
        for r in runs:
            print(
                f"{r.name:<16} {r.workers:>7} {r.msgs_per_s:>12,.0f} {r.elapsed_s:>10.3f}  "
                f"{r.per_worker}"
            )
    rt = mod.run_ping_pong()
    print(f"ping-pong round trip, {rt.rounds} rounds: p50 {rt.p50_us:.1f} us, "
          f"p99 {rt.p99_us:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
