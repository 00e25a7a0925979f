"""A producer that never reads its replies cannot grow the backend's memory
(``ingress.max_pending_per_producer``), and does not slow a producer that behaves."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cbor2
import psutil
import pytest
import zmq
from backend_tools import backend_process
from service_handlers import backend_sections

from shardpool import protocol as P
from shardpool.client import Client
from shardpool.control import ControlClient

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(150)]

MAX_PENDING = 2000
REPLY_BYTES = 2048  # the handler echoes the payload, so each reply carries this much
MESSAGES = 50_000  # from the producer that does not read: ~100 MB of replies
PER_FRAME = 100


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def _wait_status(ctl: ControlClient, cond: Any, timeout: float) -> dict[str, Any]:
    """Ask for the backend's status until ``cond(ingress stats)`` holds (each ask waits for
    its answer; ``timeout`` seconds in all)."""
    deadline = time.monotonic() + timeout
    while True:
        ing = ctl.request("status")["ingress"]
        if cond(ing):
            return ing  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, f"never held; last ingress status {ing}"


class _Steady(threading.Thread):
    """A well-behaved producer: reads its replies; must get all of them, in channel order."""

    def __init__(self, endpoint: str, messages: int) -> None:
        super().__init__(name="steady", daemon=True)
        self.endpoint = endpoint
        self.messages = messages
        self.problems: list[str] = []
        self.ok = 0

    def run(self) -> None:
        try:
            with Client(self.endpoint, timeout=60.0) as client:
                sent = {}
                for i in range(self.messages):
                    cid = b"steady-%d" % (i % 30)
                    sent[client.send_bytes(cid, b"%d" % i)] = (cid, i)
                last: dict[bytes, int] = {}
                for r in client.results(timeout=60.0):
                    cid, i = sent.pop(r.corr)
                    if not r.ok or r.value != b"%d" % i or i <= last.get(cid, -1):
                        self.problems.append(f"{cid!r} #{i}: {r.status} {r.value!r}")
                    last[cid] = i
                    self.ok += 1
                if sent:
                    self.problems.append(f"{len(sent)} replies missing")
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.problems.append(f"{type(exc).__name__}: {exc}")


def flood_without_reading(
    ingress: str, control: str, backend_pid: int, messages: int
) -> dict[str, Any]:
    """Send ``messages`` 2 KiB messages from a producer that reads nothing until the backend
    has dealt with all of them (a second producer runs alongside and reads), measure the
    backend's RSS growth, then read everything and account for every message."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvhwm = 1  # what it would buffer for itself is small: the pressure reaches the backend
    sock.connect(ingress)
    steady = _Steady(ingress, 3000)
    try:
        with Client(ingress, timeout=30.0) as warm:  # allocator and pools warm before measuring
            for i in range(3000):
                warm.send_bytes(b"warm-%d" % (i % 30), b"w" * REPLY_BYTES)
            assert all(r.ok for r in warm.results(timeout=30.0))
        with ControlClient(control, timeout=10.0) as ctl:
            base_messages = _wait_status(ctl, lambda ing: ing["pending"] == 0, 30.0)["messages"]
            rss0 = _rss(backend_pid)
            steady.start()
            payload = b"x" * REPLY_BYTES
            deadline = time.monotonic() + 60.0
            for start in range(0, messages, PER_FRAME):
                frame = P.encode_submit(
                    [[c, b"nr-%d" % (c % 100), payload] for c in range(start, start + PER_FRAME)]
                )
                while not sock.poll(100, zmq.POLLOUT):
                    assert time.monotonic() < deadline, "the backend stopped reading"
                sock.send(frame)
            steady.join(60.0)
            assert not steady.is_alive() and steady.problems == [], steady.problems
            assert steady.ok == 3000
            # Everything read, every accepted message answered (its reply held or sent).
            total = base_messages + messages + 3000
            ing = _wait_status(
                ctl,
                lambda ing: ing["messages"] + ing.get("refused_messages", 0) >= total
                and ing["pending"] == 0,
                60.0,
            )
            growth = _rss(backend_pid) - rss0
        # Now it reads: every message it sent is accounted for.
        ok = pending_refused = frames_refused = 0
        rejected: dict[str, int] = {}
        seen = 0
        deadline = time.monotonic() + 60.0
        while seen < messages:
            assert sock.poll(max(0.0, deadline - time.monotonic()) * 1000), f"{seen} of {messages}"
            msg = cbor2.loads(sock.recv())
            if msg[1] == P.ERROR:
                assert msg[2]["error"] == P.E_TOO_MANY_PENDING, msg[2]
                pending_refused += msg[2]["messages"]
                frames_refused += msg[2]["frames"]
                seen += msg[2]["messages"]
                continue
            for _corr, status, value in msg[2]:
                seen += 1
                if status == P.OK:
                    ok += 1
                else:
                    assert status == P.REJECTED, (status, value)
                    rejected[value["error"]] = rejected.get(value["error"], 0) + 1
        assert seen == messages
        return {
            "rss_growth_bytes": growth,
            "ok": ok,
            "rejected": rejected,
            "refused_messages": pending_refused,
            "refused_frames": frames_refused,
            "held_replies_at_peak": ing.get("held_replies"),
        }
    finally:
        if steady.ident is not None:
            steady.join(60.0)
        sock.close(linger=0)
        ctx.term()


def test_a_producer_that_never_reads_cannot_grow_the_backend(tmp_path: Path) -> None:
    sections = backend_sections(
        tmp_path,
        pool={"workers": 1, "handler": "handlers:echo_bytes", "payload": "raw"},
        ingress={"max_pending_per_producer": MAX_PENDING},
    )
    with backend_process(tmp_path, sections) as backend:
        figures = flood_without_reading(
            sections["ingress"]["endpoint"],
            sections["control"]["endpoint"],
            backend.proc.pid,
            MESSAGES,
        )
    print(figures)
    # Held: at most MAX_PENDING replies, plus ZeroMQ's few frames; unbounded it is ~100 MB.
    bound = 4 * MAX_PENDING * REPLY_BYTES + (16 << 20)
    assert figures["rss_growth_bytes"] < bound, figures
    assert figures["ok"] >= MAX_PENDING
    # The excess was refused by name, never dropped: per item, or in frames refused whole.
    refused = figures["rejected"].get(P.E_TOO_MANY_PENDING, 0) + figures["refused_messages"]
    assert refused > 0 and figures["ok"] + refused == MESSAGES, figures
    assert set(figures["rejected"]) <= {P.E_TOO_MANY_PENDING}
