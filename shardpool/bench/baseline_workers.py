"""The worker processes of the baselines (module level, so that spawn can import them by
reference), and the words they and their front exchange.

Each worker tells its front READY once it can receive, DONE with its count after the end of the
stream, and leaves on EXIT (the bare harness) or at the end of its queue (the mp.Queue pool). A
worker whose parent is gone exits on its own.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import cbor2
import zmq

__all__ = ["DONE", "END", "EXIT", "READY", "queue_worker", "zmq_worker"]

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
    """Bare-harness worker: PULL batches, decode frame and payloads, call the handler, report."""
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
            for cid, payload in zip(it, it, strict=True):
                handle(counts, cid, loads(payload))
        push.send(cbor2.dumps([DONE, index, sum(counts.values()), len(counts)]))
        # Closing with linger=0 right now could discard DONE; the front says EXIT once it has it.
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
