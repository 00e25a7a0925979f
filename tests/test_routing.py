"""Routing: stable across processes and runs, total over valid ids, strict about invalid ones
(through protocol.item_problem, the one check of channel ids and payloads, tested here too)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardpool import protocol as P
from shardpool.errors import ChannelIdError, PayloadTooLarge
from shardpool.routing import MAX_CHANNEL_ID_BYTES, Router, check_channel_id, slot_of

PINNED_IDS = [
    bytes(32),
    b"\xff" * 32,
    hashlib.sha256(b"channel-1").digest(),
    b"a",
    b"x" * 64,
]


def test_pinned_slots_and_workers() -> None:
    # A regression guard: changing the hash, seed or slot mapping would move every channel of
    # every deployed node to another worker.
    assert [slot_of(c, 4096) for c in PINNED_IDS] == [3317, 1927, 1855, 3675, 366]
    assert [Router(4096, 4).worker_of(c) for c in PINNED_IDS] == [1, 3, 3, 3, 2]
    assert [Router(4096, 7).worker_of(c) for c in PINNED_IDS] == [6, 2, 0, 0, 2]


def test_same_worker_in_another_process() -> None:
    # Python's hash() of bytes is salted per process; ours must not be.
    code = (
        "import hashlib;from shardpool.routing import Router;"
        "ids=[bytes(32), b'\\xff'*32, hashlib.sha256(b'channel-1').digest(), b'a', b'x'*64];"
        "print([Router(4096,4).worker_of(i) for i in ids])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    )
    assert out.stdout.strip() == str([Router(4096, 4).worker_of(c) for c in PINNED_IDS])


@settings(max_examples=300, deadline=None)
@given(
    cid=st.binary(min_size=1, max_size=MAX_CHANNEL_ID_BYTES),
    workers=st.integers(min_value=1, max_value=64),
)
def test_every_id_routes_to_exactly_one_worker(cid: bytes, workers: int) -> None:
    slots = 4096
    router = Router(slots, workers)
    w = router.worker_of(cid)
    assert 0 <= w < workers
    # Deterministic: a second router (another process would build the same) agrees.
    assert Router(slots, workers).worker_of(cid) == w
    # Exactly one owner: the slot table names a single worker for the id's slot.
    owners = [i for i in range(workers) if router.table[slot_of(cid, slots)] == i]
    assert owners == [w]


def test_default_table_spreads_slots_evenly() -> None:
    router = Router(4096, 12)
    counts = [router.table.count(w) for w in range(12)]
    assert max(counts) - min(counts) <= 1


def test_custom_slot_table_is_checked() -> None:
    with pytest.raises(ValueError, match="3 entries"):
        Router(4, 2, table=[0, 1, 0])
    with pytest.raises(ValueError, match="worker 5"):
        Router(2, 2, table=[0, 5])
    assert Router(2, 2, table=[1, 1]).worker_of(b"anything") == 1


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (b"", "1..64 bytes long, got 0 bytes"),
        (b"x" * 65, "got 65 bytes"),
        ("text", "must be a byte string of 1..64 bytes, got str of length 4"),
        (12, "got integer 12"),
        (None, "got None"),
    ],
)
def test_bad_channel_ids(bad: object, words: str) -> None:
    with pytest.raises(ChannelIdError, match=words):
        check_channel_id(bad)


def test_bytearray_ids_are_accepted_as_bytes() -> None:
    assert check_channel_id(bytearray(b"abc")) == b"abc"
    assert type(check_channel_id(memoryview(b"abc"))) is bytes


@pytest.mark.parametrize(
    ("cid", "payload", "code"),
    [
        (b"c", b"p" * 10, None),
        (b"x" * MAX_CHANNEL_ID_BYTES, b"", None),
        ("c", b"p", P.E_BAD_CHANNEL_ID),
        (bytearray(b"c"), b"p", P.E_BAD_CHANNEL_ID),  # a decoded frame never holds one
        (b"", b"p", P.E_EMPTY_CHANNEL_ID),
        (b"x" * 65, b"p", P.E_CHANNEL_ID_TOO_LONG),
        (b"", 7, P.E_EMPTY_CHANNEL_ID),  # the channel id's problem is named first
        (b"c", "p", P.E_BAD_PAYLOAD),
        (b"c", b"p" * 11, P.E_PAYLOAD_TOO_LARGE),
    ],
)
def test_item_problem_names_the_first_problem(cid: object, payload: object, code: str) -> None:
    problem = P.item_problem(cid, payload, 10)
    assert (problem and problem.code) == code
    if problem is not None:
        assert problem.code in P.ITEM_ERRORS and problem.message


def test_item_problem_without_a_limit_takes_any_length() -> None:
    assert P.item_problem(b"c", b"p" * 100_000, None) is None


def test_check_item_raises_the_problem_and_copies_buffers() -> None:
    assert P.check_item(bytearray(b"c"), memoryview(b"pp"), 2) == (b"c", b"pp")
    with pytest.raises(ChannelIdError):
        P.check_item(b"", b"p", 2)
    with pytest.raises(PayloadTooLarge, match="3 bytes, over transport.max_message_bytes = 2"):
        P.check_item(b"c", b"ppp", 2)
    with pytest.raises(TypeError, match="got str of length 1"):
        P.check_item(b"c", "p", 2)
