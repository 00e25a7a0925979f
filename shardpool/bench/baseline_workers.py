"""The worker processes of the baselines (module level, so that spawn can import them by
reference), and the words they and their front exchange.

Each worker tells its front READY once it can receive, DONE with its count after the end of the
stream, and leaves on EXIT (the zmq harnesses and the ping-pong peer) or at the end of its queue
(the mp.Queue pool). A worker whose parent is gone exits on its own.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import cbor2
import zmq

__all__ = [
    "DONE",
    "END",
    "EXIT",
    "READY",
    "one_pass_worker",
    "ping_pong_worker",
    "queue_worker",
    "zmq_worker",
]

READY = "ready"
DONE = "done"
END = b""
"""Data frame that ends the stream: an empty frame is never a valid CBOR batch."""
EXIT = b"exit"
"""Sent after every DONE arrived: lets a worker close with linger=0 without losing its DONE."""

ORPHAN_CHECK_S = 0.5
"""How often a worker checks whether its parent is gone (it then exits on its own)."""


def _count(counts: dict[bytes, int], channel_id: bytes, message: object) -> None:
    """The trivial handler: counts messages per channel."""
    counts[channel_id] = counts.get(channel_id, 0) + 1


def _exit_when_orphaned(parent_pid: int) -> None:
    """Start a daemon thread that ends this process when its parent is gone.

    A parent killed with SIGKILL runs no cleanup, and a worker blocked in ``recv``/``get`` would
    otherwise wait forever; being re-parented changes ``os.getppid()``.
    """

    def watch() -> None:
        while True:
            time.sleep(ORPHAN_CHECK_S)
            if os.getppid() != parent_pid:
                os._exit(70)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def zmq_worker(index: int, data_endpoint: str, report_endpoint: str, parent_pid: int) -> None:
    """Per-item harness worker: PULL batches, decode the frame, then each payload (a CBOR byte
    string holding the message) with its own ``cbor2.loads``, call the handler, report."""
    _serve_frames(index, data_endpoint, report_endpoint, parent_pid, one_pass=False)


def one_pass_worker(
    index: int, data_endpoint: str, report_endpoint: str, parent_pid: int
) -> None:
    """One-pass ceiling worker: PULL batches, decode each frame with ONE ``cbor2.loads`` (the
    messages are inline CBOR items, not byte strings), call the handler per pair, report."""
    _serve_frames(index, data_endpoint, report_endpoint, parent_pid, one_pass=True)


def _serve_frames(
    index: int, data_endpoint: str, report_endpoint: str, parent_pid: int, *, one_pass: bool
) -> None:
    """The loop of both zmq harness workers: READY, frames until END, DONE with the count, then
    wait for EXIT. Raises whatever ``cbor2.loads`` raises for a frame that is not CBOR (the
    process then exits non-zero, which its front reports)."""
    _exit_when_orphaned(parent_pid)
    ctx = zmq.Context()  # created here, not inherited: a ZeroMQ context never crosses a process
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.bind(data_endpoint)
        push.connect(report_endpoint)
        push.send(cbor2.dumps([READY, index]))
        counts: dict[bytes, int] = {}
        loads = cbor2.loads
        recv = pull.recv
        handle = _count
        while True:
            frame = recv()
            if not frame:
                break
            it = iter(loads(frame))
            if one_pass:
                for cid, message in zip(it, it, strict=True):
                    handle(counts, cid, message)
            else:
                for cid, payload in zip(it, it, strict=True):
                    handle(counts, cid, loads(payload))
        push.send(cbor2.dumps([DONE, index, sum(counts.values()), len(counts)]))
        # Closing with linger=0 right now could discard DONE; the front says EXIT once it has it.
        recv()
    finally:
        pull.close(linger=0)
        push.close(linger=0)
        ctx.term()


def ping_pong_worker(in_endpoint: str, out_endpoint: str, parent_pid: int) -> None:
    """Ping-pong peer: PULL on ``in_endpoint`` (bound here), PUSH to ``out_endpoint``. Sends
    READY, then answers every ping (a small CBOR map with a ``seq``) with the CBOR reply
    ``[seq, None]`` built after decoding it — what a worker does for a handler returning None —
    until an empty frame (END); sends DONE and waits for EXIT."""
    _exit_when_orphaned(parent_pid)
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    push = ctx.socket(zmq.PUSH)
    try:
        pull.bind(in_endpoint)
        push.connect(out_endpoint)
        push.send(cbor2.dumps([READY, 0]))
        loads, dumps, recv, send = cbor2.loads, cbor2.dumps, pull.recv, push.send
        while True:
            frame = recv()
            if not frame:
                break
            send(dumps([loads(frame)["seq"], None]))
        push.send(cbor2.dumps([DONE, 0, 0, 0]))
        recv()
    finally:
        pull.close(linger=0)
        push.close(linger=0)
        ctx.term()


def queue_worker(index: int, inbox: Any, reports: Any, parent_pid: int) -> None:
    """Naive worker: one ``get`` per message, decode the payload, call the handler, report."""
    _exit_when_orphaned(parent_pid)
    reports.put((READY, index))
    counts: dict[bytes, int] = {}
    loads = cbor2.loads
    get = inbox.get
    handle = _count
    while True:
        item = get()
        if item is None:
            break
        cid, payload = item
        handle(counts, cid, loads(payload))
    # The queue's feeder thread is joined at process exit, so DONE reaches the pipe before we die.
    reports.put((DONE, index, sum(counts.values()), len(counts)))
