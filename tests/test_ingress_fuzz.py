"""Fuzz the ingress of a running backend with thousands of generated frames, valid and invalid.

Every invalid frame must get exactly one ERROR reply with the right code, every invalid item one
REJECTED reply naming its problem, every valid message must be processed and answered in
per-channel order (poisoned ones answered FAILED), the backend must stay up, and its counters must
match what was sent. The backend runs in this process (workers are real processes); frames go
through a raw DEALER socket so that anything at all can be sent.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_handlers import in_process_backend

from shardpool import protocol as P
from shardpool.client import Client

pytestmark = pytest.mark.multiprocess

MAX_BYTES = 64  # transport.max_message_bytes of the fuzzed backend
CHANNELS = 4  # channels per example, so that items of one channel interleave with others

# -------------------------------------------------------------------------------- strategies

_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)

_item = st.one_of(
    st.tuples(st.just("good"), st.integers(0, CHANNELS - 1)),
    st.tuples(st.just("good"), st.integers(0, CHANNELS - 1)),
    st.tuples(st.just("good"), st.integers(0, CHANNELS - 1)),
    st.tuples(st.just("poison_cbor"), st.integers(0, CHANNELS - 1)),
    st.tuples(st.just("poison_fail"), st.integers(0, CHANNELS - 1)),
    st.tuples(st.just("not_list"), _junk.filter(lambda v: not isinstance(v, list))),
    st.tuples(st.just("short"), st.sampled_from([0, 1, 2, 4]), st.booleans()),
    st.tuples(
        st.just("bad_corr"),
        st.sampled_from([-1, -(2**70), 2**64, 2**70, "7", 1.5, True, False, None, b"1", [1]]),
        st.integers(0, CHANNELS - 1),
    ),
    st.tuples(
        st.just("bad_cid"),
        st.sampled_from(["chan", 7, None, b"", b"x" * 65, b"y" * 200, [b"a"], 1.0]),
    ),
    st.tuples(
        st.just("bad_payload"),
        st.one_of(
            st.sampled_from(["text", 3, None, [b"x"], {"i": 1}, True]),
            st.binary(min_size=MAX_BYTES + 1, max_size=MAX_BYTES + 40),
        ),
        st.integers(0, CHANNELS - 1),
    ),
)

_frame = st.one_of(
    st.tuples(st.just("submit"), st.lists(_item, max_size=8)),
    st.tuples(st.just("submit"), st.lists(_item, max_size=8)),
    st.tuples(st.just("submit"), st.lists(_item, max_size=8)),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=24)),
    st.tuples(
        st.just("shape"),
        st.one_of(
            _junk,
            st.lists(_junk, min_size=0, max_size=5),
            st.tuples(_junk, st.integers(0, 1), st.lists(_junk, max_size=2)).map(list),
            st.tuples(st.just(1), _junk, _junk).map(list),
            st.tuples(st.just(1), st.just(0), _junk.filter(lambda v: not isinstance(v, list))).map(
                list
            ),
        ),
    ),
    st.tuples(st.just("multipart"), st.integers(1, 3)),
    st.tuples(st.just("hello"), _junk),
)


def _frame_problem(data: bytes) -> str | None:
    """The error code a frame deserves per the protocol spec, or None if it is a valid frame
    (written from the spec in shardpool.protocol, independently of the ingress code)."""
    try:
        msg = cbor2.loads(data)
    except Exception:  # noqa: BLE001
        return P.E_BAD_CBOR
    if not isinstance(msg, list) or len(msg) != 3:
        return P.E_BAD_FRAME
    version, kind, body = msg
    if isinstance(version, bool) or version != 1 or not isinstance(version, int):
        return P.E_BAD_VERSION
    if isinstance(kind, bool) or not isinstance(kind, int) or kind not in (0, 1):
        return P.E_BAD_KIND
    if kind == 0 and not isinstance(body, list):
        return P.E_BAD_FRAME
    return None


# -------------------------------------------------------------------------------- the test


class _Expect:
    """Materialises abstract frame specs into bytes and records what each must produce."""

    def __init__(self, example: int) -> None:
        self.example = example
        self.items: dict[int, tuple[str, Any]] = {}  # corr → ("ok", (cid, i)) | (status, code)
        self.anon: collections.Counter[str] = collections.Counter()  # rejected without a corr
        self.errors: list[str] = []  # ERROR codes, in sending order
        self.hellos: list[Any] = []
        self.order: dict[bytes, list[int]] = collections.defaultdict(list)  # good i's per cid
        self.tally: collections.Counter[str] = collections.Counter()

    def cid(self, k: int) -> bytes:
        return b"fz%d-%d" % (self.example, k)


def _materialise(
    spec: tuple[Any, ...], exp: _Expect, corr_seq: Any, index_seq: dict[bytes, int]
) -> list[bytes]:
    kind = spec[0]
    if kind == "garbage":
        code = _frame_problem(spec[1])
        if code is None:
            return []  # a random frame that happens to be valid: not what this case is about
        exp.errors.append(code)
        exp.tally[code] += 1
        return [spec[1]]
    if kind == "shape":
        data = cbor2.dumps(spec[1])
        code = _frame_problem(data)
        if code is None:
            return []
        exp.errors.append(code)
        exp.tally[code] += 1
        return [data]
    if kind == "multipart":
        exp.errors.append(P.E_BAD_FRAME)
        exp.tally[P.E_BAD_FRAME] += 1
        return [P.encode_submit([]), *([b"extra"] * spec[1])]
    if kind == "hello":
        exp.hellos.append(spec[1])
        return [P.encode_hello(spec[1])]
    items = []
    for it in spec[1]:
        what = it[0]
        if what in ("good", "poison_cbor", "poison_fail"):
            corr = next(corr_seq)
            cid = exp.cid(it[1])
            if what == "good":
                i = index_seq.get(cid, 0)
                index_seq[cid] = i + 1
                payload = cbor2.dumps({"i": i})
                exp.items[corr] = ("ok", (cid, i))
                exp.order[cid].append(i)
                exp.tally["accepted"] += 1
            else:
                payload = b"\xff\xff" if what == "poison_cbor" else cbor2.dumps({"fail": True})
                exp.items[corr] = ("failed", P.E_HANDLER_FAILED)
                exp.tally["accepted"] += 1
                exp.tally["poison"] += 1
            items.append([corr, cid, payload])
        elif what == "not_list":
            items.append(it[1])
            exp.anon[P.E_BAD_ITEM] += 1
            exp.tally[P.E_BAD_ITEM] += 1
        elif what == "short":
            n, with_corr = it[1], it[2]
            lst: list[Any] = [b"x"] * n
            if n and with_corr:
                corr = next(corr_seq)
                lst[0] = corr
                exp.items[corr] = ("rejected", P.E_BAD_ITEM)
            else:
                exp.anon[P.E_BAD_ITEM] += 1
            items.append(lst)
            exp.tally[P.E_BAD_ITEM] += 1
        elif what == "bad_corr":
            items.append([it[1], exp.cid(it[2]), cbor2.dumps({"i": 0})])
            exp.anon[P.E_BAD_CORR] += 1
            exp.tally[P.E_BAD_CORR] += 1
        elif what == "bad_cid":
            corr = next(corr_seq)
            value = it[1]
            if isinstance(value, bytes):
                code = P.E_EMPTY_CHANNEL_ID if not value else P.E_CHANNEL_ID_TOO_LONG
            else:
                code = P.E_BAD_CHANNEL_ID
            items.append([corr, value, cbor2.dumps({"i": 0})])
            exp.items[corr] = ("rejected", code)
            exp.tally[code] += 1
        elif what == "bad_payload":
            corr = next(corr_seq)
            value = it[1]
            code = P.E_PAYLOAD_TOO_LARGE if isinstance(value, bytes) else P.E_BAD_PAYLOAD
            items.append([corr, exp.cid(it[2]), value])
            exp.items[corr] = ("rejected", code)
            exp.tally[code] += 1
    return [P.encode_submit(items)]


def _collect(sock: zmq.Socket[bytes], exp: _Expect, deadline: float) -> None:
    """Read replies until everything expected has arrived; check each against its expectation."""
    items = dict(exp.items)
    anon = collections.Counter(exp.anon)
    errors: list[str] = []
    hellos: list[Any] = []
    seen_i: dict[bytes, list[int]] = collections.defaultdict(list)
    last_seq: dict[bytes, int] = {}
    while items or +anon or len(errors) < len(exp.errors) or len(hellos) < len(exp.hellos):
        left = deadline - time.monotonic()
        assert left > 0, (
            f"replies missing: {len(items)} items, {dict(+anon)} anonymous, "
            f"errors {errors} of {exp.errors}"
        )
        if not sock.poll(min(left, 1.0) * 1000):
            continue
        msg = cbor2.loads(sock.recv())
        assert msg[0] == P.VERSION
        if msg[1] == P.ERROR:
            errors.append(msg[2]["error"])
            assert msg[2]["message"]
            continue
        if msg[1] == P.HELLO:
            hellos.append(msg[2])
            continue
        assert msg[1] == P.REPLIES
        for corr, status, value in msg[2]:
            if corr is None:
                assert status == P.REJECTED, value
                assert anon[value["error"]] > 0, f"unexpected anonymous rejection {value}"
                anon[value["error"]] -= 1
                continue
            assert corr in items, f"unexpected or duplicate reply for {corr}: {status} {value}"
            want, detail = items.pop(corr)
            if want == "ok":
                cid, i = detail
                assert status == P.OK, (status, value)
                seq, got_i = value
                assert got_i == i
                seen_i[cid].append(i)
                assert seq > last_seq.get(cid, -1)
                last_seq[cid] = seq
            elif want == "failed":
                assert status == P.FAILED and value["error"] == detail, (status, value)
            else:
                assert status == P.REJECTED, (status, value)
                assert value["error"] == detail, (value, detail)
                assert value["message"]
    assert errors == exp.errors
    assert hellos == exp.hellos
    # Per-channel order: every good message answered, in the order it was sent.
    assert dict(seen_i) == {c: o for c, o in exp.order.items() if o}


def test_fuzzed_frames_are_answered_and_valid_messages_processed_in_order(tmp_path: Path) -> None:
    with in_process_backend(
        tmp_path,
        pool={"handler": "service_handlers:indexed", "failure_policy": "skip"},
        transport={"max_message_bytes": MAX_BYTES},
    ) as svc:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(svc.ingress_endpoint)
        corr_seq = iter(range(10**9))
        totals: collections.Counter[str] = collections.Counter()
        frames_sent = [0]
        example = [0]
        try:

            @settings(
                max_examples=100,
                derandomize=True,
                database=None,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(st.lists(_frame, min_size=20, max_size=60))
            def check(specs: list[tuple[Any, ...]]) -> None:
                example[0] += 1
                exp = _Expect(example[0])
                index_seq: dict[bytes, int] = {}
                for spec in specs:
                    parts = _materialise(spec, exp, corr_seq, index_seq)
                    if parts:
                        sock.send_multipart(parts)
                        frames_sent[0] += 1
                _collect(sock, exp, time.monotonic() + 30.0)
                totals.update(exp.tally)
                totals["frames"] += len(exp.errors)

            check()
            assert frames_sent[0] >= 2000, frames_sent[0]
            print(f"{frames_sent[0]} frames, {example[0]} examples, totals {dict(totals)}")

            svc.pool.drain(30.0)
            ing = svc.ingress.stats()
            stats = svc.pool.stats()
            assert not svc.pool.broken and stats["state"] == "running"
            assert all(w["state"] == "ready" for w in stats["workers"])
            assert ing["frames"] == frames_sent[0]
            assert ing["accepted"] == totals["accepted"]
            assert stats["acknowledged"] == totals["accepted"]
            assert sum(w["failed"] for w in stats["workers"]) == totals["poison"]
            item_codes = [c for c in P.ITEM_ERRORS if totals[c]]
            frame_codes = [c for c in P.FRAME_ERRORS if totals[c]]
            assert ing["rejected"] == sum(totals[c] for c in item_codes)
            assert ing["frame_errors"] == sum(totals[c] for c in frame_codes)
            assert ing["errors"] == {c: totals[c] for c in item_codes + frame_codes}
            assert all(
                w.get(k, 0) == 0
                for w in stats["workers"]
                for k in ("gaps", "duplicates", "reorders")
            )
            # Every kind of bad input was actually exercised.
            for code in (
                P.E_BAD_CBOR,
                P.E_BAD_FRAME,
                P.E_BAD_VERSION,
                P.E_BAD_KIND,
                P.E_BAD_ITEM,
                P.E_BAD_CORR,
                P.E_BAD_CHANNEL_ID,
                P.E_EMPTY_CHANNEL_ID,
                P.E_CHANNEL_ID_TOO_LONG,
                P.E_BAD_PAYLOAD,
                P.E_PAYLOAD_TOO_LARGE,
            ):
                assert totals[code] > 0, code
            # Still serving normal producers.
            with Client(svc.ingress_endpoint, timeout=20.0) as client:
                assert client.call(b"after-fuzz", {"i": 0}, timeout=20.0)[1] == 0
        finally:
            sock.close(linger=0)
            ctx.term()
