"""The real traffic's state machine: valid traffic gives no violation, every injected fault is
detected at its message with its named violation, and the handler agrees with a serial replay.
No processes."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from shardpool.demo import wire
from shardpool.demo.handler import WireLightningHandler
from shardpool.demo.real import (
    REAL_VIOLATION_CODES,
    RealChannelState,
    replay_wire,
    verifications,
)
from shardpool.demo.realtraffic import FAULT_KINDS, Fault, generate_wire, iter_wire

VALID = generate_wire(30, 5, 4_000, 21, close_fraction=0.3)


def _first_violations(stream: list[tuple[bytes, bytes]]) -> dict[bytes, tuple[int, str]]:
    """Each channel's first violation: (stream index, code)."""
    states: dict[bytes, RealChannelState] = {}
    first: dict[bytes, tuple[int, str]] = {}
    for i, (cid, msg) in enumerate(stream):
        state = states.setdefault(cid, RealChannelState(cid))
        code = state.apply(msg)
        if code is not None and cid not in first:
            first[cid] = (i, code)
    return first


def test_valid_real_traffic_has_no_violation_and_verifies_real_signatures() -> None:
    states, violations = replay_wire(VALID)
    assert violations == {}
    assert verifications(states) > 1_000
    assert all(not s.force_closed for s in states.values())
    assert sum(s.closed for s in states.values()) > 0  # cooperative closes are in the traffic


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_every_injected_fault_is_detected_with_its_named_violation(kind: str) -> None:
    record: list[Fault] = []
    probability = 0.5 if kind == "update_after_shutdown" else 0.05
    stream = generate_wire(15, 5, 2_000, 22, close_fraction=0.5, faults={kind: probability},
                           record=record)
    assert record, f"no {kind} fault was injected"
    assert {f.kind for f in record} == {kind}
    # Exactly the faulty channels see a violation, first at the fault, with the fault's code.
    first = _first_violations(stream)
    assert {f.channel_id: (f.index, f.expected) for f in record} == first
    for f in record:
        assert f.expected in REAL_VIOLATION_CODES
    if kind == "out_of_order":
        # A commitment that overtook its update: what the receiver sees depends on the update.
        assert {f.expected for f in record} == {
            "empty_commitment", "commitment_mismatch", "bad_commitment_signature"}


def test_faults_are_seeded_and_optional() -> None:
    a: list[Fault] = []
    b: list[Fault] = []
    faults = dict.fromkeys(FAULT_KINDS, 0.02)
    assert generate_wire(5, 5, 800, 4, faults=faults, record=a) == \
        generate_wire(5, 5, 800, 4, faults=faults, record=b)
    assert a == b
    assert list(iter_wire(5, 5, 300, 4)) == generate_wire(5, 5, 300, 4)
    with pytest.raises(ValueError, match="unknown fault kind 'nope'"):
        iter_wire(1, 1, 1, 0, faults={"nope": 0.1})
    with pytest.raises(ValueError, match="within \\[0, 1\\]"):
        iter_wire(1, 1, 1, 0, faults={"wrong_secret": 2.0})


def _opened(cid: bytes) -> tuple[RealChannelState, list[bytes]]:
    """A state past its opening, and the rest of that channel's messages in VALID."""
    mine = [m for c, m in VALID if c == cid]
    state = RealChannelState(cid)
    for m in mine[:3]:
        assert state.apply(m) is None
    return state, mine[3:]


def test_what_a_node_refuses_before_and_around_the_opening() -> None:
    cid = VALID[0][0]
    mine = [m for c, m in VALID if c == cid]
    assert RealChannelState(cid).apply(mine[3]) == "channel_not_ready"
    assert RealChannelState(bytes(32)).apply(mine[0]) == "wrong_channel"
    state, _ = _opened(cid)
    fresh = RealChannelState(cid)
    assert fresh.apply(mine[0]) is None and fresh.apply(mine[0]) == "unexpected_opening"
    assert state.apply(b"\x00\x80garbage") == "malformed"
    with pytest.raises(ValueError, match="32 bytes"):
        RealChannelState(b"short")


def test_a_revoke_with_the_wrong_secret_or_channel_is_refused() -> None:
    cid = next(c for c, m in VALID if wire.message_type(m) == "revoke_and_ack")
    state, rest = _opened(cid)
    for m in rest:
        if wire.message_type(m) != "revoke_and_ack":
            assert state.apply(m) is None
            continue
        fields = wire.decode(m)
        fields.pop("type")
        for change, code in (({"per_commitment_secret": b"\x07" * 32}, "bad_revocation_secret"),
                             ({"per_commitment_secret": bytes(32)}, "bad_revocation_secret"),
                             ({"channel_id": b"\x01" * 32}, "wrong_channel")):
            probe = RealChannelState(cid)
            for earlier in [x for c, x in VALID if c == cid][: 3 + rest.index(m)]:
                probe.apply(earlier)
            assert probe.apply(wire.encode("revoke_and_ack", fields | change)) == code
        return
    pytest.fail("no revoke_and_ack in the channel")


def _feed(handler: WireLightningHandler, stream: list[tuple[bytes, Any]]) -> dict[bytes, Any]:
    channels: dict[bytes, SimpleNamespace] = {}
    seqs: dict[bytes, int] = {}
    for cid, msg in stream:
        ch = channels.setdefault(cid, SimpleNamespace(id=cid, state=None))
        seq = seqs[cid] = seqs.get(cid, -1) + 1
        assert handler.handle(ch, seq, msg, False) is None
    return {cid: ch.state for cid, ch in channels.items()}


def test_the_wire_handler_matches_the_serial_replay_and_skips_duplicates() -> None:
    prefix = VALID[:2_000]
    handler = WireLightningHandler()
    handler.setup(0)
    states = _feed(handler, prefix)
    reference, _ = replay_wire(prefix)
    assert {c: s.digest() for c, s in states.items()} == \
        {c: s.digest() for c, s in reference.items()}
    cid, msg = prefix[-1]
    ch = SimpleNamespace(id=cid, state=states[cid])
    assert handler.handle(ch, states[cid].last_seq, msg, True) is None  # redelivered: skipped
    assert handler.duplicates == 1
    bad = handler.handle(SimpleNamespace(id=b"x" * 32, state=None), 0, b"\x00", False)
    assert bad == {"violation": "malformed", "type": None, "seq": 0}
    odd = handler.handle(SimpleNamespace(id=b"short", state=None), 0, prefix[0][1], False)
    assert odd is not None and odd["violation"] == "bad_channel"


def test_the_real_state_moves_exactly_through_the_handler_hooks() -> None:
    """Keys, points and HTLCs survive a snapshot/restore between two workers' handlers at every
    fifth message of each channel; the end state equals the serial replay, attribute by
    attribute."""
    prefix = VALID[:2_000]
    handlers = [WireLightningHandler(), WireLightningHandler()]
    channels: dict[bytes, SimpleNamespace] = {}
    where: dict[bytes, int] = {}
    seqs: dict[bytes, int] = {}
    for cid, msg in prefix:
        ch = channels.setdefault(cid, SimpleNamespace(id=cid, state=None))
        seq = seqs[cid] = seqs.get(cid, -1) + 1
        if seq % 5 == 4:
            data = handlers[where.get(cid, 0)].snapshot(ch)
            ch = channels[cid] = SimpleNamespace(id=cid, state=None)  # on the other worker
            where[cid] = 1 - where.get(cid, 0)
            handlers[where[cid]].restore(ch, data)
        assert handlers[where.get(cid, 0)].handle(ch, seq, msg, False) is None
    reference, _ = replay_wire(prefix)
    # (the replay has no pool sequence numbers: last_seq is the handler's own)
    assert {c: ch.state.to_record() | {"last_seq": -1} for c, ch in channels.items()} == {
        c: s.to_record() for c, s in reference.items()
    }
