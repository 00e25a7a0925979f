"""No frame can stop the ingress: values whose mere formatting raises or explodes, and failures
of the ingress's own code, are answered with a named error while the backend goes on serving."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
from backend_tools import raw_producer
from service_handlers import in_process_backend

from shardpool import protocol as P
from shardpool.client import Client

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(90)]

# 10**5000 has more digits than Python's int-to-str limit (4300): str() or repr() of it raises
# ValueError. As a CBOR bignum (tag 2/3) it is a frame of about 2 KB.
HUGE = 10**5000


def _bignum(value: int) -> cbor2.CBORTag:
    """``value`` as a CBOR bignum tag, built by hand (what any CBOR producer may send)."""
    magnitude = value if value >= 0 else -1 - value
    size = (magnitude.bit_length() + 7) // 8
    return cbor2.CBORTag(2 if value >= 0 else 3, magnitude.to_bytes(size))


def _shared_dag(levels: int) -> bytes:
    """A CBOR value of a few hundred bytes that decodes to ``[x, x]`` nested ``levels`` deep
    (shared-value tags 28/29): written out plainly it would be 2**levels leaves."""
    x: list[Any] = [b"leaf"]
    for _ in range(levels):
        x = [x, x]
    return cbor2.dumps(x, value_sharing=True)


class _Raw:
    """A raw DEALER producer: sends any bytes, reads frames with a deadline."""

    def __init__(self, endpoint: str) -> None:
        self.ctx, self.sock = raw_producer(endpoint)

    def ask(self, frame: bytes, timeout_s: float = 20.0) -> list[Any]:
        return cbor2.loads(self.ask_raw(frame, timeout_s))  # type: ignore[no-any-return]

    def ask_raw(self, frame: bytes, timeout_s: float = 20.0) -> bytes:
        self.sock.send(frame)
        assert self.sock.poll(timeout_s * 1000), "no answer: the ingress stopped"
        return self.sock.recv()

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


def _huge_frames() -> dict[str, tuple[bytes, str, str]]:
    """``field: (frame, kind of answer, error code)`` with 10**5000 (or its negative) there."""
    big, neg = _bignum(HUGE), _bignum(-HUGE)
    item = [[1, b"c", cbor2.dumps({"i": 0})]]
    return {
        "version": (cbor2.dumps([big, P.SUBMIT, item]), "error", P.E_BAD_VERSION),
        "negative version": (cbor2.dumps([neg, P.SUBMIT, item]), "error", P.E_BAD_VERSION),
        "kind": (cbor2.dumps([1, big, item]), "error", P.E_BAD_KIND),
        "body": (cbor2.dumps([1, P.SUBMIT, big]), "error", P.E_BAD_FRAME),
        "item": (cbor2.dumps([1, P.SUBMIT, [big]]), "rejected", P.E_BAD_ITEM),
        "corr": (cbor2.dumps([1, P.SUBMIT, [[big, b"c", b"\xa0"]]]), "rejected", P.E_BAD_CORR),
        "negative corr": (
            cbor2.dumps([1, P.SUBMIT, [[neg, b"c", b"\xa0"]]]),
            "rejected",
            P.E_BAD_CORR,
        ),
        "channel id": (
            cbor2.dumps([1, P.SUBMIT, [[1, big, b"\xa0"]]]),
            "rejected",
            P.E_BAD_CHANNEL_ID,
        ),
        "payload": (cbor2.dumps([1, P.SUBMIT, [[1, b"c", big]]]), "rejected", P.E_BAD_PAYLOAD),
        # Accepted (it is a byte string); the handler gets the bignum and fails on it.
        "payload contents": (
            cbor2.dumps([1, P.SUBMIT, [[1, b"c", cbor2.dumps(big)]]]),
            "failed",
            P.E_HANDLER_FAILED,
        ),
        "hello token": (cbor2.dumps([1, P.HELLO, big]), "hello", ""),
    }


def test_huge_integers_in_every_field_get_named_errors_and_the_backend_stays_up(
    tmp_path: Path,
) -> None:
    with in_process_backend(
        tmp_path, pool={"handler": "service_handlers:indexed", "failure_policy": "skip"}
    ) as svc:
        raw = _Raw(svc.ingress_endpoint)
        try:
            for field, (frame, answer, code) in _huge_frames().items():
                assert len(frame) < 2200, field  # a small frame
                msg = raw.ask(frame)
                assert svc.ingress.alive, f"ingress died on a huge {field}"
                if answer == "error":
                    assert msg[1] == P.ERROR and msg[2]["error"] == code, (field, msg)
                    text = msg[2]["message"]
                elif answer == "hello":
                    assert msg[1] == P.HELLO and msg[2] == HUGE, field
                    continue
                else:
                    assert msg[1] == P.REPLIES and len(msg[2]) == 1, (field, msg)
                    _corr, status, value = msg[2][0]
                    want = P.REJECTED if answer == "rejected" else P.FAILED
                    assert status == want and value["error"] == code, (field, msg)
                    text = value["message"]
                # The text describes the value instead of quoting its 5,001 digits.
                assert len(text) < 400, (field, text)
                if answer != "failed":
                    assert "integer of 16610 bits" in text, (field, text)
            # A shared-reference token of 40 levels echoes at its own size, at once.
            dag = cbor2.loads(_shared_dag(40))
            msg = raw.ask(cbor2.dumps([1, P.HELLO, dag], value_sharing=True))
            assert msg[1] == P.HELLO
            stats = svc.ingress.stats()
            assert stats["errors"][P.E_BAD_VERSION] == 2 and stats["internal_errors"] == 0
        finally:
            raw.close()
        _assert_serving(svc)


def test_a_failure_of_the_ingress_itself_is_answered_logged_and_survived(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with in_process_backend(
        tmp_path, pool={"handler": "service_handlers:indexed", "failure_policy": "skip"}
    ) as svc:
        ing = svc.ingress
        raw = _Raw(svc.ingress_endpoint)
        caplog.set_level(logging.ERROR, logger="shardpool.ingress")
        try:
            # A bug while reading one frame: that frame gets an ERROR, nothing else is touched.
            real_decode = P.decode

            def broken_decode(frame: bytes, max_items: int) -> tuple[int, Any]:
                if frame.endswith(b"boom"):
                    raise RuntimeError("decode bug")
                return real_decode(frame, max_items)

            monkeypatch.setattr(P, "decode", broken_decode)
            for _ in range(3):
                msg = raw.ask(cbor2.dumps([1, P.HELLO, "boom"]))
                assert msg[1] == P.ERROR and msg[2]["error"] == P.E_INTERNAL_ERROR, msg
            assert raw.ask(P.encode_hello(b"ok"))[2] == b"ok"
            # A bug while submitting one item: that item is rejected, the others are accepted.
            real_submit = ing._submit

            def broken_submit(pairs: list[tuple[bytes, bytes]], on_done: list[Any]) -> int:
                # As submit_chunk fails on a pair: the ones before it accepted, then it raises.
                if pairs[0][0] == b"bug":
                    raise RuntimeError("submit bug")
                k = next((i for i, (cid, _) in enumerate(pairs) if cid == b"bug"), len(pairs))
                return real_submit(pairs[:k], on_done[:k])

            monkeypatch.setattr(ing, "_submit", broken_submit)
            good = cbor2.dumps({"i": 0})
            raw.sock.send(P.encode_submit([[1, b"a", good], [2, b"bug", good], [3, b"b", good]]))
            got: dict[int, tuple[int, Any]] = {}
            deadline = time.monotonic() + 20.0
            while len(got) < 3:
                assert raw.sock.poll(max(0.0, deadline - time.monotonic()) * 1000)
                for corr, status, value in cbor2.loads(raw.sock.recv())[2]:
                    got[corr] = (status, value)
            assert got[1][0] == got[3][0] == P.OK
            assert got[2][0] == P.REJECTED and got[2][1]["error"] == P.E_INTERNAL_ERROR
            # A bug while sending replies: that reply is lost (and logged), the thread goes on.
            failures = ing.stats()["internal_errors"]
            monkeypatch.setattr(ing._outbox, "_encode", _raise)
            raw.sock.send(P.encode_submit([[4, b"a", cbor2.dumps({"i": 1})]]))
            deadline = time.monotonic() + 20.0
            while ing.stats()["internal_errors"] == failures:
                assert time.monotonic() < deadline, "the reply was never sent"
                assert not raw.sock.poll(10)  # paces the wait; nothing can arrive
            monkeypatch.undo()
            assert raw.ask(P.encode_hello(b"still"))[2] == b"still"
            assert ing.alive
            stats = ing.stats()
            # 3 frames + 1 item answered internal_error, + 1 reply that could not be encoded.
            assert stats["errors"][P.E_INTERNAL_ERROR] == 4
            assert stats["internal_errors"] == 5
            records = [r for r in caplog.records if "internal error" in r.getMessage()]
            assert records and all(r.exc_info for r in records)
            frames_logged = [r for r in records if "handling a frame" in r.getMessage()]
            assert len(frames_logged) == 1  # the second and third within the interval: held back
        finally:
            raw.close()
        _assert_serving(svc)


def _assert_serving(svc: Any) -> None:
    """The backend still processes a normal producer's message and shuts down cleanly."""
    with Client(svc.ingress_endpoint, timeout=20.0) as client:
        assert client.call(b"after", {"i": 0}, timeout=20.0)[1] == 0
    assert svc.stop() == 0


def test_frames_whose_decoding_would_take_quadratic_time_are_answered_at_once(
    tmp_path: Path,
) -> None:
    # Each frame is 300-400 KB; decoded naively one stalls the ingress thread for 5-15 s (a
    # decimal mantissa converted digit by digit; integer map keys chosen to share a hash
    # bucket), and a few MB for hours.
    mantissa = _bignum(int.from_bytes(b"\x01" + bytes(range(256)) * 1200))
    decimal_frame = cbor2.dumps([1, P.HELLO, cbor2.CBORTag(4, [1, mantissa])])
    buckets = 2**61 - 1  # hash(k * (2**61 - 1)) == 0 for every k
    n = 32_000
    colliding = b"".join(cbor2.dumps(k * buckets) + b"\x00" for k in range(1, n + 1))
    map_frame = cbor2.dumps([1, P.HELLO, None])[:-1] + b"\xb9" + n.to_bytes(2, "big") + colliding
    with in_process_backend(tmp_path) as svc:
        raw = _Raw(svc.ingress_endpoint)
        try:
            t0 = time.monotonic()
            # Echoed as the tag it is (the reply is read as bytes: decoding it here would be slow).
            reply = raw.ask_raw(decimal_frame, timeout_s=3.0)
            assert reply.startswith(b"\x84\x01\x01") and decimal_frame[-4000:] in reply
            msg = raw.ask(map_frame, timeout_s=3.0)
            assert msg[1] == P.ERROR and msg[2]["error"] == P.E_BAD_CBOR
            assert "map key" in msg[2]["message"]
            assert time.monotonic() - t0 < 3.0
            assert raw.ask(P.encode_hello(b"next"))[2] == b"next"
        finally:
            raw.close()


def _raise(*args: Any) -> Any:
    raise RuntimeError("reply bug")
