"""Wire codec: hand-assembled batch frames decode to exactly what was put in."""

from __future__ import annotations

import cbor2
from hypothesis import given, settings
from hypothesis import strategies as st

from shardpool import codec


def test_batch_roundtrip() -> None:
    items = [(b"c1", 0, cbor2.dumps({"a": 1})), (b"c2", 7, b""), (b"c1", 1, cbor2.dumps([1, 2]))]
    frame = codec.loads(codec.encode_batch(3, 100, True, items))
    assert frame[:4] == [codec.ToWorker.BATCH, 3, 100, True]
    assert [tuple(x) for x in frame[4:]] == items
    assert cbor2.loads(frame[4][2]) == {"a": 1}


@settings(max_examples=200, deadline=None)
@given(
    epoch=st.integers(0, 2**40),
    first=st.integers(0, 2**63),
    redelivered=st.booleans(),
    items=st.lists(
        st.tuples(st.binary(min_size=1, max_size=64), st.integers(0, 2**64 - 1), st.binary()),
        max_size=300,
    ),
)
def test_batch_roundtrip_property(
    epoch: int, first: int, redelivered: bool, items: list[tuple[bytes, int, bytes]]
) -> None:
    frame = codec.loads(codec.encode_batch(epoch, first, redelivered, items))
    assert frame[:4] == [codec.ToWorker.BATCH, epoch, first, redelivered]
    assert [tuple(x) for x in frame[4:]] == items


def test_item_pieces_match_encode_batch() -> None:
    # The front builds frames from these pieces on its hot path; they must agree with the
    # reference encoder byte for byte.
    cid, cseq, payload = b"chan", 5, b"\xa1\x61x\x01"
    piece = codec.item_prefix(cid) + codec.item_head(cseq, len(payload)) + payload
    assert codec.batch_header(1, 2, False, 1) + piece == codec.encode_batch(
        1, 2, False, [(cid, cseq, payload)]
    )
