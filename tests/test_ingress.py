"""The ingress's guarantees, one by one: backpressure without drops, per-channel reply order,
halted-channel notices, per-frame limits."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zmq
from backend_tools import raw_producer
from service_handlers import in_process_backend

from shardpool import protocol as P
from shardpool.client import Client, ReplyFailed
from shardpool.control import ControlClient

pytestmark = pytest.mark.multiprocess


def _wait_status(ctl: ControlClient, cond: Any, timeout: float = 20.0) -> dict[str, Any]:
    """Ask the control socket until ``cond(snapshot)`` holds (each try waits on a reply)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = ctl.request("status")
        if cond(snap):
            return snap
        assert time.monotonic() < deadline, f"condition never held; last status {snap}"


def test_backpressure_stops_reading_and_nothing_is_dropped(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 1, "handler": "handlers:gated"},
            transport={"max_inflight": 4, "batch_size": 4},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0) as client,
        ControlClient(svc.control_endpoint) as ctl,
    ):
        corrs = [client.send(b"gated", {"gate": str(gate), "i": i}) for i in range(40)]
        client.flush()
        # The worker's window (4) is full and the handler waits for the gate: the ingress has to
        # stop reading, so a handshake queued behind the messages cannot be answered.
        snap = _wait_status(ctl, lambda s: s["ingress"]["backpressure_waits"] > 0)
        assert snap["pool"]["inflight"] == 4
        with pytest.raises(TimeoutError):
            client.hello(timeout=0.5)
        gate.touch()
        replies = list(client.results(timeout=20.0))
        assert [r.corr for r in replies] == corrs
        assert [r.value for r in replies] == [[i, i] for i in range(40)]
        snap = ctl.request("status")
        assert snap["ingress"]["accepted"] == 40 and snap["ingress"]["rejected"] == 0


def test_flow_control_slows_the_producer(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with (
        in_process_backend(
            tmp_path,
            pool={"workers": 1, "handler": "handlers:gated"},
            transport={"max_inflight": 4, "batch_size": 4},
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0, max_outstanding=8) as client,
    ):
        for i in range(7):
            client.send(b"slow", {"gate": str(gate), "i": i})
        # The eighth message reaches max_outstanding: send waits for a reply, which cannot come
        # while the pool is stuck, and gives up after its timeout with the message still queued.
        with pytest.raises(TimeoutError):
            client.send(b"slow", {"gate": str(gate), "i": 7}, timeout=0.3)
        gate.touch()
        replies = list(client.results(timeout=20.0))
        assert [r.value[1] for r in replies] == list(range(8))


def test_replies_keep_per_channel_order_whatever_order_outcomes_arrive_in(tmp_path: Path) -> None:
    # "mixed" returns None for even messages and a value for odd ones; the pool reports those in
    # different parts of one acknowledgement, i.e. not in per-channel order. The ingress must.
    with (
        in_process_backend(
            tmp_path, pool={"workers": 1, "handler": "service_handlers:mixed"}
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0) as client,
    ):
        sent: dict[int, tuple[bytes, int]] = {}
        for i in range(3000):
            cid = b"m%d" % (i % 3)
            sent[client.send(cid, {"i": i})] = (cid, i)
        last: dict[bytes, int] = {}
        n = 0
        for r in client.results(timeout=20.0):
            assert r.ok
            cid, i = sent[r.corr]
            assert i > last.get(cid, -1), f"{cid!r}: reply for {i} after {last[cid]}"
            last[cid] = i
            assert r.value == (None if i % 2 == 0 else [i // 3, i])
            n += 1
        assert n == 3000


def test_halted_channel_gets_a_notice_then_its_final_reply(tmp_path: Path) -> None:
    with (
        in_process_backend(
            tmp_path, pool={"workers": 1, "handler": "handlers:fail_on", "failure_policy": "halt"}
        ) as svc,
        Client(svc.ingress_endpoint, timeout=20.0) as client,
    ):
        bad = client.request(b"h", {"fail": True, "i": 0})
        after = client.request(b"h", {"i": 1})
        other = client.call(b"other", {"i": 5}, timeout=20.0)
        assert other == 5  # other channels keep running
        with pytest.raises(TimeoutError):
            bad.result(timeout=0.3)  # parked, not finished...
        assert bad.halted is not None and bad.halted.status == "halted"  # ...and the producer knows
        assert bad.halted.value["type"] == "ValueError"
        assert not after.done()
        svc.pool.skip(b"h")
        with pytest.raises(ReplyFailed) as exc:
            bad.result(timeout=20.0)
        assert exc.value.status == "failed" and exc.value.info["policy"] == "skipped"
        assert after.result(timeout=20.0) == 1


def _recv(sock: zmq.Socket[bytes]) -> list[Any]:
    assert sock.poll(20_000), "no reply"
    return cbor2.loads(sock.recv())  # type: ignore[no-any-return]


def test_frame_limits_and_producer_limit(tmp_path: Path) -> None:
    with (
        in_process_backend(
            tmp_path,
            ingress={"max_producers": 1},
            pool={"handler": "handlers:echo_bytes", "payload": "raw"},
        ) as svc,
        ControlClient(svc.control_endpoint) as ctl,
    ):
        ctx, a = raw_producer(svc.ingress_endpoint)
        ctx2: Any = None
        b: Any = None
        try:
            a.send(P.encode_hello(1))
            assert _recv(a)[:3] == [P.VERSION, P.HELLO, 1]
            ctx2, b = raw_producer(svc.ingress_endpoint)
            too_many = [[i, b"c", b""] for i in range(svc.ingress.settings.max_items + 1)]
            a.send(P.encode_submit(too_many))
            msg = _recv(a)
            assert msg[1] == P.ERROR and msg[2]["error"] == P.E_TOO_MANY_ITEMS
            # b is a second producer while ingress.max_producers = 1: refused, a is not.
            _wait_status(ctl, lambda s: s["ingress"]["producers"] == 2)
            b.send(P.encode_submit([[0, b"c", b"x"]]))
            msg = _recv(b)
            assert msg[1] == P.ERROR and msg[2]["error"] == P.E_TOO_MANY_PRODUCERS
            a.send(P.encode_submit([[7, b"c", b"ok"]]))
            assert _recv(a) == [P.VERSION, P.REPLIES, [[7, P.OK, b"ok"]]]
        finally:
            for s, c in ((a, ctx), (b, ctx2)):
                if s is not None:
                    s.close(linger=0)
                    c.term()
