"""Routing: stable across processes and runs, total over valid ids, strict about invalid ones."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardpool.errors import ChannelIdError
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
        (b"", "1..64 bytes long, got 0"),
        (b"x" * 65, "got 65 bytes"),
        ("text", "must be bytes"),
        (12, "got int"),
        (None, "got NoneType"),
    ],
)
def test_bad_channel_ids(bad: object, words: str) -> None:
    with pytest.raises(ChannelIdError, match=words):
        check_channel_id(bad)


def test_bytearray_ids_are_accepted_as_bytes() -> None:
    assert check_channel_id(bytearray(b"abc")) == b"abc"
